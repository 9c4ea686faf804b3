"""Builds, checks and lints the protobuf contracts in `proto/`.

One entry point for everything generated from the protos, so the Makefile, CI and
developers run the same steps:

    python scripts/proto.py generate   # gen/python + gen/descriptors (committed)
    python scripts/proto.py check      # fails when the committed generated tree is stale
    python scripts/proto.py lint       # buf lint (STANDARD + COMMENTS) and buf format
    python scripts/proto.py breaking [REF]  # buf breaking against REF (default main)

`breaking` compares with the commit where HEAD forked from REF (`git merge-base`): a branch
is checked against main, and main itself (HEAD at main) against its parent commit. A REF or
parent that cannot be found (a shallow clone, a clone without main) fails the step; REF
`none` (BUF_AGAINST=none) skips it on purpose.

Why images instead of a plain `buf lint`: protovalidate's `buf/validate/validate.proto`
is not shipped as text by any package reachable here, only as a serialized descriptor
inside the pinned `protovalidate` wheel. protoc accepts it through
`--descriptor_set_in`, and buf lints and compares protoc-built images, so both tools
see exactly the schema the code is generated from.
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GEN_DIR = ROOT / "gen"
VENV_BIN = Path(sys.executable).parent
# Extra files the Envoy transcoder needs in its descriptor set to render gRPC errors as
# JSON bodies (`convert_grpc_status`).
ENVOY_EXTRA_PROTOS = ["google/rpc/status.proto", "google/rpc/error_details.proto"]
DESCRIPTOR_SET = "descriptors/bilten_analytics.binpb"


def _site_packages() -> Path:
    return Path(grpc_tools.__file__).resolve().parent.parent


def _validate_descriptor_set(out: Path) -> Path:
    """Extracts buf/validate/validate.proto's descriptor from the protovalidate wheel."""
    import protovalidate

    src = Path(protovalidate.__file__).parent / "_gen/buf/validate/validate_pb.py"
    text = src.read_text()
    start = text.index("_DESC = file_desc(")
    call = ast.parse(text[start:].split("\n)\n", 1)[0] + "\n)").body[0]
    assert isinstance(call, ast.Assign) and isinstance(call.value, ast.Call)
    serialized = ast.literal_eval(call.value.args[0])
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    path = out / "validate.binpb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file_proto]).SerializeToString())
    return path


def _our_protos(proto_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))


def _protoc(args: list[str], proto_dir: Path, validate: Path) -> None:
    sp = _site_packages()
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--descriptor_set_in={validate}",
        f"-I{proto_dir}",
        f"-I{sp}",
        f"-I{sp / 'grpc_tools' / '_proto'}",
        *args,
    ]
    subprocess.run(cmd, check=True)


def _build_image(proto_dir: Path, out: Path, work: Path) -> None:
    validate = _validate_descriptor_set(work)
    _protoc(
        ["--include_imports", "--include_source_info", f"-o{out}", *_our_protos(proto_dir)],
        proto_dir,
        validate,
    )


def generate(target: Path) -> None:
    """Writes the whole generated tree under `target` (normally `gen/`)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        validate = _validate_descriptor_set(work)
        python_out = target / "python"
        if python_out.exists():
            shutil.rmtree(python_out)
        python_out.mkdir(parents=True)
        protos = _our_protos(PROTO_DIR)
        _protoc(
            [
                f"--python_out={python_out}",
                f"--grpc_python_out={python_out}",
                f"--plugin=protoc-gen-mypy={VENV_BIN / 'protoc-gen-mypy'}",
                f"--plugin=protoc-gen-mypy_grpc={VENV_BIN / 'protoc-gen-mypy_grpc'}",
                f"--mypy_out={python_out}",
                f"--mypy_grpc_out={python_out}",
                *protos,
            ],
            PROTO_DIR,
            validate,
        )
        # The runtime needs buf.validate's Python module; google.* comes from the pinned
        # googleapis-common-protos and protobuf wheels.
        _protoc([f"--python_out={python_out}", "buf/validate/validate.proto"], PROTO_DIR, validate)
        for package_dir in [p for p in python_out.rglob("*") if p.is_dir()]:
            (package_dir / "__init__.py").touch()
        descriptors = target / DESCRIPTOR_SET
        descriptors.parent.mkdir(parents=True, exist_ok=True)
        _protoc(
            ["--include_imports", f"-o{descriptors}", *protos, *ENVOY_EXTRA_PROTOS],
            PROTO_DIR,
            validate,
        )


def _diff_trees(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    problems = [f"only in committed: {a / n}" for n in cmp.left_only]
    problems += [f"missing from committed: {b / n}" for n in cmp.right_only]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    problems += [f"stale: {a / n}" for n in mismatch + errors]
    for sub in cmp.common_dirs:
        problems += _diff_trees(a / sub, b / sub)
    return problems


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh)
        problems = _diff_trees(GEN_DIR, fresh)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("generated code is stale: run `make generate` and commit", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


def lint() -> int:
    buf = str(VENV_BIN / "buf")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.binpb"
        _build_image(PROTO_DIR, image, Path(tmp))
        lint_rc = subprocess.run(
            [buf, "lint", str(image), "--config", str(ROOT / "buf.yaml"), "--path", "bilten"],
            check=False,
        ).returncode
    format_rc = subprocess.run([buf, "format", "-d", "--exit-code", str(PROTO_DIR)], check=False)
    if lint_rc == 0 and format_rc.returncode == 0:
        print("buf lint and buf format: clean")
    return lint_rc or format_rc.returncode


def _git(repo: Path, *args: str) -> str | None:
    """`git -C repo args`'s output, or None when it fails."""
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False)
    return done.stdout.decode().strip() if done.returncode == 0 else None


class MissingBaseline(Exception):
    """The commit to compare against cannot be found."""


def breaking_baseline(ref: str, repo: Path = ROOT) -> str | None:
    """The commit whose proto/ HEAD's must stay compatible with: where HEAD forked from
    `ref` (tried as given, then as origin/<ref>), or HEAD's parent when HEAD is on `ref`
    already. None only for a repository's first commit, which has nothing before it."""
    target = None
    for name in (ref, f"origin/{ref}"):
        target = _git(repo, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
        if target:
            break
    shallow = _git(repo, "rev-parse", "--is-shallow-repository") == "true"
    hint = "fetch full history, or set BUF_AGAINST=none to skip the check on purpose"
    if not target:
        raise MissingBaseline(f"no commit {ref!r} (nor origin/{ref}) here: {hint}")
    head = _git(repo, "rev-parse", "HEAD")
    base = _git(repo, "merge-base", "HEAD", target)
    if base is None:
        raise MissingBaseline(f"no common history of HEAD and {ref!r}: {hint}")
    if base != head:
        return base
    parent = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD~1^{commit}")
    if parent:
        return parent
    if shallow:
        raise MissingBaseline(f"HEAD is on {ref!r} but its parent is not in this clone: {hint}")
    return None


def breaking(ref: str) -> int:
    buf = str(VENV_BIN / "buf")
    if ref == "none":
        print("buf breaking: skipped (BUF_AGAINST=none)")
        return 0
    try:
        base = breaking_baseline(ref)
    except MissingBaseline as error:
        print(f"buf breaking: {error}", file=sys.stderr)
        return 2
    if base is None:
        print("buf breaking: HEAD is the first commit, nothing to compare against")
        return 0
    if _git(ROOT, "rev-parse", "--verify", "--quiet", f"{base}:proto") is None:
        print(f"no proto/ at {base}: nothing to compare against")
        return 0
    print(f"buf breaking against {base[:12]} (from {ref})")
    ref = base
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        old_dir = work / "old"
        old_dir.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "proto"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old_dir)], input=archive, check=True)
        _build_image(old_dir / "proto", work / "old.binpb", work)
        _build_image(PROTO_DIR, work / "new.binpb", work)
        rc = subprocess.run(
            [
                buf,
                "breaking",
                str(work / "new.binpb"),
                "--against",
                str(work / "old.binpb"),
                "--config",
                str(ROOT / "buf.yaml"),
                "--path",
                "bilten",
            ],
            check=False,
        ).returncode
    if rc == 0:
        print(f"buf breaking against {ref}: no breaking changes")
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("generate")
    sub.add_parser("check")
    sub.add_parser("lint")
    b = sub.add_parser("breaking")
    b.add_argument("ref", nargs="?", default="main")
    args = parser.parse_args()
    if args.command == "generate":
        generate(GEN_DIR)
        print(f"generated {GEN_DIR.relative_to(ROOT)}/")
        return 0
    if args.command == "check":
        return check()
    if args.command == "lint":
        return lint()
    return breaking(args.ref)


if __name__ == "__main__":
    sys.exit(main())
