"""Fixtures of the prediction tests: one synthetic tenant in a real DuckDB store.

Sized for the suite's time budget (about 1 M events, a few seconds to build); the
benchmarks (`python -m services.prediction.bench`) use larger data.
"""

from __future__ import annotations

import os

# One XGBoost thread per xdist worker (see services.prediction.churn.THREADS); set
# before any prediction module reads it.
os.environ.setdefault("BILTEN_PREDICTION_THREADS", "1")

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.prediction.synthetic import SyntheticTenant, generate
from services.storage.event_store import DuckDBEventStore

# Deterministic: every random draw below comes from these seeds.
TENANT = SyntheticTenant(
    tenant_id="acme", users=12_000, days=200, end=datetime(2026, 6, 1, tzinfo=UTC), seed=7
)


# Session scope plus one xdist group ("prediction-store") for every module using it:
# the store is built once per run, not once per module and worker.
STORE_GROUP = "prediction-store"


@pytest.fixture(scope="session")
def populated_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    path: Path = tmp_path_factory.mktemp("prediction") / "events.duckdb"
    store = DuckDBEventStore(path)
    table, _ = generate(TENANT)
    store.append_table(table)
    yield store
    store.close()
