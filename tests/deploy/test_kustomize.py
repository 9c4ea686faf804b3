"""k8s/: kustomize builds of every overlay validate against the Kubernetes schemas, equal the
Helm render they were generated from, and are current (`k8s/generate.py --check`)."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy import tools
from tests.deploy.test_chart import KUBE_VERSIONS, validate_service_monitor

pytestmark = pytest.mark.deploy

OVERLAYS = ("minimal", "production")


@cache
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bilten_k8s_generate", tools.K8S / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(kubectl: Path) -> dict[str, list[dict[str, Any]]]:
    return {o: tools.kustomize_build(tools.K8S / "overlays" / o) for o in OVERLAYS}


def _index(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_overlay_objects_match_kubernetes_schemas(
    built: dict[str, list[dict[str, Any]]], overlay: str, kube_version: str
) -> None:
    assert built[overlay]
    for obj in built[overlay]:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            validate_service_monitor(obj)
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{overlay} {obj['kind']}/{obj['metadata']['name']}: {exc}"
            ) from exc


@pytest.mark.parametrize(("overlay", "values"), [("minimal", "base"), ("production", "production")])
def test_overlay_equals_the_helm_render(
    built: dict[str, list[dict[str, Any]]], overlay: str, values: str, helm: Path
) -> None:
    gen = generator()
    expected = _index([gen.namespace(), *gen.render(values)])
    actual = _index(built[overlay])
    assert sorted(actual) == sorted(expected)
    for k, obj in expected.items():
        assert actual[k] == obj, f"{overlay}: {k} differs from the Helm render"


def test_every_object_is_in_the_namespace_with_restricted_pod_security(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay, objects in built.items():
        (ns,) = [o for o in objects if o["kind"] == "Namespace"]
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == ns["metadata"]["name"], (
                    overlay,
                    obj["metadata"],
                )
            assert "helm.sh/chart" not in obj["metadata"].get("labels", {})


def test_generated_files_are_current(helm: Path) -> None:
    assert generator().main(["--check"]) == 0, "run: .venv/bin/python k8s/generate.py"
