"""`bilten-analytics bench ingest` leaves no data directory behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from services.bench import ingest_bench

pytestmark = pytest.mark.integration


def test_bench_ingest_removes_its_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert ingest_bench.main(["--seconds", "0.5", "--batch", "10", "--concurrency", "1"]) == 0
    assert "batch_events_per_second" in capsys.readouterr().out
    assert list(tmp_path.glob("bilten-bench-*")) == []
