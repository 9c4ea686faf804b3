"""The report scheduler's lifecycle in the mesh: started with the server by `Mesh.start`,
ended by `Mesh.stop` (no task left behind, the report store closed)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from bilten.analytics.query.v1 import query_service_pb2 as pb
from bilten.analytics.query.v1 import query_service_pb2_grpc as pb_grpc

from services.events.model import TrackedEvent, TrackedEventType
from services.mesh import Mesh
from services.platform.auth import Scope
from services.platform.settings import PlatformSettings
from services.query import reports
from services.query.servicer import QueryServicer
from services.storage.event_store import DuckDBEventStore

pytestmark = pytest.mark.integration


def _scheduler_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "report-scheduler" and not t.done()]


async def test_a_report_runs_in_a_started_mesh_and_stop_ends_the_scheduler(
    tmp_path: Path,
) -> None:
    settings = PlatformSettings(data_dir=tmp_path / "data", grpc_port=0, metrics_port=0)
    mesh = Mesh.open(settings)
    now = datetime.now(UTC)
    mesh.event_store.append(
        [
            TrackedEvent(
                tenant_id="acme",
                event_id=f"e{i}",
                event_type=TrackedEventType.TRACK,
                event_name="ticket_purchased",
                occurred_at=now,
                received_at=now,
                user_id=f"u{i}",
            )
            for i in range(3)
        ]
    )
    assert _scheduler_tasks() == []
    port = await mesh.start(("query",))
    stopped = False
    try:
        (task,) = _scheduler_tasks()  # started with the server, not by the first call
        token = mesh.tokens.issue(
            "dev", "acme", frozenset({Scope.ANALYTICS_READ, Scope.REPORTS_WRITE})
        )
        md = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.QueryServiceStub(channel)
            created = await stub.CreateReport(
                pb.CreateReportRequest(
                    report=pb.Report(
                        display_name="purchases",
                        sql="SELECT count(*) AS n FROM events",
                        schedule=pb.REPORT_SCHEDULE_DAILY,
                    )
                ),
                metadata=md,
            )
            report_id = created.report.report_id
            for _ in range(600):  # the scheduler runs a new report right away (60 s)
                got = await stub.GetReport(pb.GetReportRequest(report_id=report_id), metadata=md)
                if got.report.HasField("latest_run"):
                    break
                await asyncio.sleep(0.1)
        run = got.report.latest_run
        assert run.error_message == ""
        assert run.rows[0].values[0].number_value == 3
        closers = [getattr(c, "__self__", None) for c in mesh._closers]
        (servicer,) = [c for c in closers if isinstance(c, QueryServicer)]
        assert servicer.scheduler is not None and servicer.scheduler.running

        await mesh.stop()
        stopped = True
        # The task ended on its own (not cancelled mid-pass) and nothing is pending.
        assert task.done() and not task.cancelled() and task.exception() is None
        assert _scheduler_tasks() == []
        assert not servicer.scheduler.running
        # The report store is closed with the mesh: no connection left on the file.
        with pytest.raises(Exception, match="report store"):
            servicer._report_store()
    finally:
        if not stopped:
            await mesh.stop()


async def test_stop_waits_for_the_report_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass running in the worker thread finishes before `aclose` closes the store
    (cancelling the task alone would leave the thread to write into a closed file)."""
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        servicer = QueryServicer(store, reports_path=tmp_path / "reports.sqlite3")
        assert servicer.scheduler is not None and servicer._reports is not None
        saved = servicer._reports
        saved.create(
            "acme", "r", "SELECT 1 AS one", reports.ReportSchedule.DAILY, datetime.now(UTC)
        )
        entered = asyncio.Event()
        loop = asyncio.get_running_loop()
        real_run = reports.run_report

        def slow_run(*args: Any, **kwargs: Any) -> reports.ReportRun:
            loop.call_soon_threadsafe(entered.set)
            time.sleep(0.5)  # the report is still running when stop is asked
            return real_run(*args, **kwargs)

        monkeypatch.setattr(reports, "run_report", slow_run)
        servicer.start_background()
        await asyncio.wait_for(entered.wait(), 10)
        await servicer.aclose()
        assert not servicer.scheduler.running
        check = reports.ReportStore(tmp_path / "reports.sqlite3")
        try:
            (report,) = check.list_page("acme", 10, "")[0]
            assert report.latest_run is not None  # recorded, not lost to a closed store
            assert report.latest_run.rows == ((1,),)
        finally:
            check.close()
