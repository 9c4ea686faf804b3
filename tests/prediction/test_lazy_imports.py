"""Every service process imports `services.mesh`; only the prediction service needs the
model libraries. XGBoost (which pulls scikit-learn, scipy and pandas) and statsmodels
cost ~8 s of CPU to import, so they must load on first use, not with the mesh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_mesh_loads_neither_xgboost_nor_statsmodels() -> None:
    # A fresh interpreter: this test process may already hold both from other tests.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import services.mesh, sys; "
            "print('xgboost' in sys.modules, 'statsmodels' in sys.modules)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
