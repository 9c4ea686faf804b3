"""Every environment variable and argument the manifests set is one the process accepts.

For each container of each rendered shape (Helm ci/ files and the kustomize overlays):

- `bilten-analytics ...` args go through the real CLI parser (`... --help` in a subprocess:
  argparse validates the subcommand and its choices first, then prints help and exits 0);
- every environment name is a field of the settings class(es) that process reads
  (PlatformSettings `BILTEN_*`, RegistrySettings `BILTEN_SCHEMA_REGISTRY_*`, the bootstrap Job's
  BootstrapSettings `BILTEN_BOOTSTRAP_*`) or an OpenTelemetry SDK variable, and the values,
  with Secret references filled in, validate against those classes. PlatformSettings ignores
  unknown names (extra="ignore"), so without this check a misspelt variable would pass silently;
- the Envoy container's args are run with `--mode validate` (see test_envoy_config.py).
"""

from __future__ import annotations

import base64
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import opentelemetry.environment_variables as otel_api_env
import opentelemetry.sdk.environment_variables as otel_sdk_env
import pytest
from pydantic_settings import BaseSettings

from schema_registry.settings import RegistrySettings
from services.platform.settings import PlatformSettings
from tests.deploy import tools

pytestmark = pytest.mark.deploy

KUSTOMIZE_OVERLAYS = ("minimal", "production")
OTEL_NAMES = {
    getattr(module, name)
    for module in (otel_api_env, otel_sdk_env)
    for name in dir(module)
    if name.startswith("OTEL_")
}


@cache
def bootstrap_module() -> ModuleType:
    path = tools.CHART / "files" / "bootstrap" / "bootstrap.py"
    spec = importlib.util.spec_from_file_location("bilten_chart_bootstrap", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the annotations through it
    spec.loader.exec_module(module)
    return module


def settings_classes(container: dict[str, Any]) -> list[tuple[str, type[BaseSettings]]]:
    """(env prefix, class) of what the container's process reads, longest prefix first."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if argv[:1] == ["envoy"] or argv[:3] == ["python", "-m", "services.websocket_bridge"]:
        return []  # configured by arguments alone
    if argv[:1] == ["python"] and argv[1].endswith("/bootstrap.py"):
        return [
            ("BILTEN_BOOTSTRAP_", bootstrap_module().BootstrapSettings),
            ("BILTEN_", PlatformSettings),
        ]
    assert argv[:2] == ["bilten-analytics", "serve"], argv
    if argv[2] == "schema-registry":
        return [("BILTEN_SCHEMA_REGISTRY_", RegistrySettings), ("BILTEN_", PlatformSettings)]
    return [("BILTEN_", PlatformSettings)]


def shapes() -> Iterator[Any]:
    for path in tools.CI_VALUES:
        yield pytest.param("helm", path.name.removesuffix("-values.yaml"), id=f"helm-{path.name}")
    for overlay in KUSTOMIZE_OVERLAYS:
        yield pytest.param("kustomize", overlay, id=f"kustomize-{overlay}")


@pytest.fixture(scope="module")
def kustomized(kubectl: Path) -> dict[str, list[dict[str, Any]]]:
    return {o: tools.kustomize_build(tools.K8S / "overlays" / o) for o in KUSTOMIZE_OVERLAYS}


def objects_of(
    source: str, shape: str, rendered: dict[str, tools.Rendered], kustomized: dict[str, Any]
) -> list[dict[str, Any]]:
    return rendered[shape].objects if source == "helm" else kustomized[shape]


def _fake_secret_value(key: str) -> str:
    """A valid value for a key of an existing (not rendered) Secret."""
    return {
        "schema-registry-storage": "postgresql://bilten:x@db:5432/bilten",
        "metadata-store-url": "postgresql://bilten:x@db:5432/bilten?options=-csearch_path%3Dm",
        "kafka-client-config": '{"security.protocol": "SASL_SSL"}',
    }.get(key, "k" * 40)


def resolved_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = secrets.get(ref["name"])
            if secret is None:  # an existing Secret: any value of the documented form
                env[item["name"]] = _fake_secret_value(ref["key"])
            elif ref["key"] in secret.get("data", {}):
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            else:
                assert ref.get("optional"), f"{item['name']}: key {ref['key']} missing"
        elif "fieldRef" in source:
            env[item["name"]] = {"metadata.name": "pod-0", "metadata.namespace": "ns"}[
                source["fieldRef"]["fieldPath"]
            ]
        else:
            raise AssertionError(f"unexpected env source {item}")
    return env


@pytest.mark.parametrize(("source", "shape"), list(shapes()))
def test_every_env_name_and_value_is_accepted_by_the_settings(
    source: str,
    shape: str,
    rendered: dict[str, tools.Rendered],
    kustomized: dict[str, list[dict[str, Any]]],
) -> None:
    objects = objects_of(source, shape, rendered, kustomized)
    checked = 0
    for workload in tools.workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{source}/{shape} {workload['metadata']['name']}"
            classes = settings_classes(container)
            env = resolved_env(container, objects)
            if not classes:
                assert not env, f"{where}: {container['name']} reads no environment: {sorted(env)}"
                continue
            for name in env:
                if name.startswith("OTEL_"):
                    assert name in OTEL_NAMES, f"{where}: {name} is not an OpenTelemetry variable"
                    continue
                readers = [
                    c.__name__
                    for prefix, c in classes
                    if name.startswith(prefix)
                    and name.removeprefix(prefix).lower() in c.model_fields
                ]
                assert readers, (
                    f"{where}: {name} is no field of {', '.join(c.__name__ for _, c in classes)}"
                )
            with mock.patch.dict(os.environ, env, clear=True):
                for _, settings_class in classes:
                    settings_class()  # raises ValidationError naming the field
            checked += 1
    assert checked >= 7


def _cli_argvs(objects: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [
        tuple(c.get("args", []))
        for w in tools.workloads(objects)
        for c in w["spec"]["template"]["spec"]["containers"]
        if c.get("command") == ["bilten-analytics"]
    ]


def _prefetch_cli(argvs: list[tuple[str, ...]]) -> None:
    """Runs the parser checks in parallel (each is a Python start-up)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(cli_accepts, set(argvs)))


@cache
def cli_accepts(
    args: tuple[str, ...], program: tuple[str, ...] = ("-m", "services.cli")
) -> tuple[bool, str]:
    """The real argument parser: `<args> --help` exits 0 only when what precedes is valid."""
    done = subprocess.run(
        [sys.executable, *program, *args, "--help"],
        cwd=tools.REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stderr.strip().splitlines()
    return done.returncode == 0, lines[-1] if lines else ""


@pytest.mark.parametrize(("source", "shape"), list(shapes()))
def test_every_command_line_is_accepted(
    source: str,
    shape: str,
    rendered: dict[str, tools.Rendered],
    kustomized: dict[str, list[dict[str, Any]]],
) -> None:
    objects = objects_of(source, shape, rendered, kustomized)
    _prefetch_cli(_cli_argvs(objects))
    for workload in tools.workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            argv = [*container.get("command", []), *container.get("args", [])]
            if argv[0] == "bilten-analytics":
                ok, error = cli_accepts(tuple(argv[1:]))
                assert ok, f"{workload['metadata']['name']}: {' '.join(argv)}: {error}"
            elif argv[:2] == ["python", "-m"]:
                ok, error = cli_accepts(tuple(argv[1:]), program=())
                assert ok, f"{workload['metadata']['name']}: {' '.join(argv)}: {error}"
            elif argv[0] == "python":
                script = argv[1]
                mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
                assert str(Path(script).parent) in mounts, f"{script} is not mounted"
                assert (tools.CHART / "files" / "bootstrap" / Path(script).name).exists()
            else:
                assert argv[0] == "envoy", argv


def test_a_misspelt_variable_is_caught(staged_chart: Path) -> None:
    """The check above is not vacuous: an extraEnv name that no settings class has fails it."""
    objects = tools.helm_template(
        staged_chart,
        sets={"platform.extraEnv[0].name": "BILTEN_GRPC_PROT", "platform.extraEnv[0].value": "1"},
    )
    bad = {"minimal": tools.Rendered("bad", objects)}
    with pytest.raises(AssertionError, match="BILTEN_GRPC_PROT is no field"):
        test_every_env_name_and_value_is_accepted_by_the_settings("helm", "minimal", bad, {})
    objects = tools.helm_template(
        staged_chart,
        sets={
            "platform.extraEnv[0].name": "BILTEN_GRPC_PORT",
            "platform.extraEnv[0].value": "not-a-port",
        },
    )
    with pytest.raises(Exception, match="grpc_port"):
        test_every_env_name_and_value_is_accepted_by_the_settings(
            "helm", "minimal", {"minimal": tools.Rendered("bad", objects)}, {}
        )
