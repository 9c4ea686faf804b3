"""Fixtures of the deployment tests: the staged chart, rendered shapes, tool availability.

Marker `deploy` (registered here). The tools come from dev dependencies (see tests/deploy/tools.py);
a test skips, saying which package to install, only when one is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import tools


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deploy: Helm chart, kustomize, Envoy and image checks, and the local smoke install",
    )


def _require(probe: object) -> None:
    try:
        probe()  # type: ignore[operator]
    except tools.ToolMissing as exc:
        pytest.skip(f"deployment tool missing: {exc}")


@pytest.fixture(scope="session")
def helm() -> Path:
    _require(tools.helm_binary)
    return tools.helm_binary()


@pytest.fixture(scope="session")
def kubectl() -> Path:
    _require(tools.kubectl_binary)
    return tools.kubectl_binary()


@pytest.fixture(scope="session")
def envoy() -> Path:
    _require(tools.envoy_binary)
    return tools.envoy_binary()


@pytest.fixture(scope="session")
def staged_chart(tmp_path_factory: pytest.TempPathFactory, helm: Path) -> Path:
    return tools.staged_chart(tmp_path_factory.mktemp("chart"))


@pytest.fixture(scope="session")
def rendered(staged_chart: Path) -> dict[str, tools.Rendered]:
    """Each ci/ values file rendered once per test worker."""
    return {
        path.name.removesuffix("-values.yaml"): tools.Rendered(
            path.name, tools.helm_template(staged_chart, [path])
        )
        for path in tools.CI_VALUES
    }
