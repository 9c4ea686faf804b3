"""The scheduled retention job on real stores: per-tenant windows, audit entries, and its
place in the mesh's lifecycle (started where the event store is written, stopped with it)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.compliance.retention import RetentionJob, RetentionPolicies
from services.events.model import TrackedEvent, TrackedEventType
from services.mesh import Mesh
from services.platform.audit import AuditLog
from services.platform.settings import PlatformSettings
from services.storage.event_store import DuckDBEventStore
from services.storage.metadata_store import RetentionDays, SQLiteMetadataStore
from tests.conftest import free_port


def _event(tenant: str, n: int, age: timedelta) -> TrackedEvent:
    at = datetime.now(UTC) - age
    return TrackedEvent(
        tenant_id=tenant,
        event_id=f"{tenant}-{n}",
        event_type=TrackedEventType.TRACK,
        event_name="seen",
        occurred_at=at,
        received_at=at,
        user_id=f"u{n}",
    )


def _ages(events: DuckDBEventStore, tenant: str) -> list[str]:
    table = events.read(
        "SELECT event_id FROM tracked_events WHERE tenant_id = ? ORDER BY event_id", [tenant]
    )
    return [str(x) for x in table.column(0).to_pylist()]


async def test_each_tenant_keeps_its_own_raw_window_and_deletions_are_audited(
    tmp_path: Path,
) -> None:
    with (
        SQLiteMetadataStore(tmp_path / "metadata.sqlite3") as store,
        DuckDBEventStore(tmp_path / "events.duckdb") as events,
    ):
        events.append(
            [
                _event(tenant, n, timedelta(days=days))
                for tenant in ("short", "default")
                for n, days in ((1, 1), (2, 4), (3, 9))
            ]
        )
        policies = RetentionPolicies(store)
        policies.put("short", RetentionDays(raw_days=3), datetime.now(UTC))
        job = RetentionJob(policies, events, AuditLog(store), timedelta(hours=1))
        runs = await job.run_once()
        assert {(r.tenant_id, r.raw_rows) for r in runs} == {("default", 1), ("short", 2)}
        assert _ages(events, "short") == ["short-1"]
        assert _ages(events, "default") == ["default-1", "default-2"]
        for tenant, deleted in (("short", 2), ("default", 1)):
            entries, _ = store.list_audit(tenant, 10, "")
            jobs = [e for e in entries if e.actor == RetentionJob.AUDIT_ACTOR]
            assert [(e.action, e.resource.split()[0]) for e in jobs] == [
                ("retention.enforce", f"raw_rows={deleted}")
            ]
        # Nothing left to delete: a second run deletes nothing and audits nothing more.
        assert {r.raw_rows for r in await job.run_once()} == {0}
        assert len(store.list_audit("short", 10, "")[0]) == 1


async def test_the_server_runs_the_job_on_schedule_and_stops_it(tmp_path: Path) -> None:
    settings = PlatformSettings(
        data_dir=tmp_path / "data",
        grpc_port=0,
        metrics_port=0,
        schema_registry_port=free_port(),
        retention_enforce_interval_seconds=0.2,
    )
    mesh = Mesh.open(settings)
    await mesh.start()
    try:
        job = mesh.retention_job
        assert job is not None
        assert job.runs == 1  # the run at start, done before the server serves
        # Rows written after the first run (as if they had aged since): the schedule, not
        # only the run at start, must find them.
        mesh.event_store.append([_event("t", 1, timedelta(days=30)), _event("t", 2, timedelta(0))])
        # A run deletes before it audits and counts itself: wait for both.
        deadline = asyncio.get_running_loop().time() + 30
        while _ages(mesh.event_store, "t") != ["t-2"] or job.runs < 2:
            assert asyncio.get_running_loop().time() < deadline, (
                _ages(mesh.event_store, "t"),
                job.runs,
            )
            await asyncio.sleep(0.1)
    finally:
        await mesh.stop()
    assert job._task is None  # cancelled and awaited by stop()


async def test_an_ingestion_free_process_with_the_embedded_log_runs_no_job(
    tmp_path: Path,
) -> None:
    settings = PlatformSettings(
        data_dir=tmp_path / "data",
        grpc_port=0,
        metrics_port=0,
        schema_registry_port=free_port(),
    )
    mesh = Mesh.open(settings)
    await mesh.start(("query",))
    try:
        # Its store is its own copy that nothing writes to in this shape.
        assert mesh.retention_job is None
    finally:
        await mesh.stop()


async def test_rows_are_handed_to_the_rollups_before_they_are_deleted(tmp_path: Path) -> None:
    """The hook (the rollup flush in the server) runs before the delete, while the expired
    rows are still there to be rolled up."""
    with (
        SQLiteMetadataStore(tmp_path / "metadata.sqlite3") as store,
        DuckDBEventStore(tmp_path / "events.duckdb") as events,
    ):
        events.append([_event("t", 1, timedelta(days=30)), _event("t", 2, timedelta(0))])
        seen_by_hook: list[list[str]] = []
        job = RetentionJob(
            RetentionPolicies(store),
            events,
            AuditLog(store),
            timedelta(hours=1),
            before_delete=lambda: seen_by_hook.append(_ages(events, "t")),
        )
        await job.run_once()
        assert seen_by_hook == [["t-1", "t-2"]]
        assert _ages(events, "t") == ["t-2"]
