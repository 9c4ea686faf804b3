"""An acknowledged append survives SIGKILL: a child writes, the parent kills it and
reopens the file.

Each round kills the writer mid-stream (usually inside an append); the next round
starts on the recovered file, so WAL replay, checkpoints (the 16 MiB WAL threshold is
crossed) and appends after recovery are all covered.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.storage.event_store import DuckDBEventStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _run_and_kill(path: Path, round_no: int, min_batches: int) -> list[str]:
    """Starts a writer, SIGKILLs it after at least `min_batches` acks; returns acked ids."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.storage.durability_writer", str(path), str(round_no)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    acked: list[str] = []
    deadline = time.monotonic() + 240  # child start (imports) under load, plus appends
    target = min_batches + random.randrange(5)
    batches = 0
    try:
        while batches < target:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"writer died: {child.stderr.read() if child.stderr else ''}")
            assert line.startswith("ACK "), line
            acked.extend(line[4:].strip().split(","))
            batches += 1
            assert time.monotonic() < deadline, "writer too slow"
        # Let it get into the next append, then kill without warning.
        time.sleep(random.uniform(0.0, 0.01))
        child.send_signal(signal.SIGKILL)
        # Acks already written to the pipe before the kill count too.
        rest, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    for line in rest.splitlines():
        if line.startswith("ACK ") and line.endswith(("\n", "")):
            ids = line[4:].strip().split(",")
            if ids and ids[-1].endswith("-999"):  # a complete line only
                acked.extend(ids)
    return acked


def test_every_acknowledged_event_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "events.duckdb"
    acked: list[str] = []
    # ~250 kB of WAL per batch: 70 batches cross the 16 MiB checkpoint threshold, so
    # the middle round is killed after DuckDB checkpointed inside an append.
    for round_no, min_batches in enumerate((10, 70, 10)):
        size_before = path.stat().st_size if path.exists() else 0
        acked.extend(_run_and_kill(path, round_no, min_batches))
        if min_batches == 70:
            assert path.stat().st_size > size_before + 1_000_000, "no checkpoint happened"
        with DuckDBEventStore(path) as store:
            stored = {
                row["event_id"]
                for row in store.read("SELECT event_id FROM tracked_events").to_pylist()
            }
            missing = set(acked) - stored
            assert not missing, f"{len(missing)} acknowledged events lost after SIGKILL"
            # Batches are atomic: a batch is there whole or not at all.
            partial = store.read(
                "SELECT regexp_extract(event_id, '^(r\\d+-b\\d+)-', 1) AS batch, count(*) AS n"
                " FROM tracked_events GROUP BY 1 HAVING n <> 1000"
            ).to_pylist()
            assert partial == []
            # Actor keys stay one per (tenant, actor) and unique after recovery.
            duplicates = store.read(
                "SELECT tenant_id, actor_key FROM tenant_actors GROUP BY ALL HAVING count(*) > 1"
                " UNION ALL SELECT tenant_id, NULL FROM tenant_actors"
                " GROUP BY tenant_id, actor_id HAVING count(*) > 1"
            ).to_pylist()
            assert duplicates == []
    assert len(acked) >= 90_000
