"""`bilten-analytics bench analytics` runs the analytics benchmark end to end (tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_bench_analytics_subcommand_loads_times_and_answers(tmp_path: Path) -> None:
    path = tmp_path / "events.duckdb"
    # The installed entry point's module, in a fresh process: the CLI configures
    # logging globally, which must not leak into this test process.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "bench",
            "analytics",
            "--events",
            "3000",
            "--users",
            "200",
            "--days",
            "14",
            "--repeats",
            "1",
            "--path",
            str(path),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen' / 'python'}"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert (report["events"], report["users"], report["days"]) == (3000, 200, 14)
    assert path.exists()  # --path keeps the loaded file
    timed = report["analyses"]
    assert {"funnel_3_steps_ordered", "retention_12_weeks_first_seen"} <= set(timed)
    assert {name for name, t in timed.items() if "error" in t} == set()
    assert sum(name.startswith("user_analytics_") for name in timed) == 5
    assert all(t["wall_ms_median"] > 0 for t in timed.values())
    # Answers computed over the loaded events: people enter the funnel, fewer go on.
    steps = report["sample_results"]["funnel_3_steps_ordered_users"]
    assert len(steps) == 3 and steps[0] > 0 and steps == sorted(steps, reverse=True)
