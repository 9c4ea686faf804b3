"""`bilten-analytics bench ingest`: its figures, its phases, and no data directory left."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from services.bench import ingest_bench

pytestmark = pytest.mark.integration


def test_bench_ingest_reports_rates_and_server_cpu_and_removes_its_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert ingest_bench.main(["--seconds", "0.5", "--batch", "10", "--concurrency", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch_events_per_second"] > 0 and result["single_rpc_per_second"] > 0
    # The server did work for the calls: its CPU time per event is measured, not zero.
    assert result["batch_server_cpu_us_per_event"] > 0
    assert result["single_server_cpu_ms_per_rpc"] > 0
    assert list(tmp_path.glob("bilten-bench-*")) == []


def test_bench_ingest_runs_one_phase_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert ingest_bench.main(["--seconds", "0.3", "--concurrency", "1", "--phase", "single"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["single_rpc_per_second"] > 0
    assert "batch_events_per_second" not in result


def test_bench_ingest_with_the_ghz_load_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Opt-in: needs ghz (`go install github.com/bojand/ghz/cmd/ghz@v0.93.0`)."""
    try:
        ingest_bench._find_ghz()
    except SystemExit:
        pytest.skip("ghz is not installed (opt-in load generator)")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert ingest_bench.main(["--seconds", "0.5", "--concurrency", "1", "--client", "ghz"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["client"] == "ghz"
    assert result["batch_events_per_second"] > 0 and result["single_rpc_per_second"] > 0
    assert 0 < result["single_p50_ms"] <= result["single_p99_ms"]
    assert list(tmp_path.glob("bilten-bench-*")) == []
