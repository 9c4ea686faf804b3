"""Retention policy per tenant and its enforcement job.

Defaults (ARCHITECTURE.md): raw 7 days, minute rollups 30 days, hour rollups 1 year, day
rollups 5 years. Enforcement here deletes raw events older than the tenant's `raw_days`
from the event store; the rollup tiers are pruned by the aggregation runtime with the
same per-tenant policies (services/query/rollups.py). `dry_run` counts what would go
without deleting anything. `RetentionJob` runs the enforcement on a schedule inside the
server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pyarrow as pa
import structlog

from services.platform.audit import AuditEvent, AuditSink
from services.storage.event_store import TABLE
from services.storage.metadata_store import RetentionDays

log = structlog.get_logger(__name__)

DEFAULT_POLICY = RetentionDays()


class RetentionStore(Protocol):
    def get_retention(self, tenant_id: str) -> RetentionDays | None: ...
    def put_retention(self, tenant_id: str, policy: RetentionDays, at: datetime) -> None: ...


class RawRows(Protocol):
    def read(self, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> pa.Table: ...
    def delete_occurred_before(self, tenant_id: str, cutoff: datetime) -> int: ...


@dataclass(frozen=True, slots=True)
class RetentionRun:
    tenant_id: str
    cutoff: datetime
    raw_rows: int  # deleted, or that would be with dry_run
    dry_run: bool


class RetentionPolicies:
    def __init__(self, store: RetentionStore, default: RetentionDays = DEFAULT_POLICY) -> None:
        self._store = store
        self._default = default

    def get(self, tenant_id: str) -> RetentionDays:
        return self._store.get_retention(tenant_id) or self._default

    def put(self, tenant_id: str, policy: RetentionDays, at: datetime) -> RetentionDays:
        # Longer tiers summarise shorter ones; a coarser tier kept for less time than a
        # finer one would be a typo, refused rather than stored.
        days = (
            policy.raw_days,
            policy.minute_rollup_days,
            policy.hour_rollup_days,
            policy.day_rollup_days,
        )
        if list(days) != sorted(days):
            raise ValueError(
                "retention must not shrink from a finer tier to a coarser one "
                "(raw <= minute <= hour <= day)"
            )
        self._store.put_retention(tenant_id, policy, at)
        return policy

    def enforce(
        self, rows: RawRows, tenant_ids: Sequence[str], now: datetime, dry_run: bool
    ) -> list[RetentionRun]:
        runs = []
        for tenant_id in tenant_ids:
            cutoff = now - timedelta(days=self.get(tenant_id).raw_days)
            if dry_run:
                table = rows.read(
                    f"SELECT count(*) FROM {TABLE} WHERE tenant_id = ? AND occurred_at < ?",
                    [tenant_id, cutoff],
                )
                count = int(table.column(0)[0].as_py())
            else:
                count = rows.delete_occurred_before(tenant_id, cutoff)
            runs.append(RetentionRun(tenant_id, cutoff, count, dry_run))
        return runs


class RetentionJob:
    """Enforces every tenant's raw retention on this process's event store, on a schedule.

    Runs in each process that writes an event store (the embedded `up`, and every stream
    processor host in the Kafka shape, each of which holds its own copy), because DuckDB
    lets only the owning process open the file: `bilten-analytics retention enforce` is
    for a stopped server. The tenants are those with rows in the store, not those in the
    metadata, since rows are what retention is about and a processor host's metadata
    need not know every tenant. Rollup tiers are pruned by the aggregation runtime with
    the same per-tenant policies. Each run of a tenant with rows to delete is audited.
    """

    AUDIT_ACTOR = "retention-job"

    def __init__(
        self,
        policies: RetentionPolicies,
        rows: RawRows,
        audit: AuditSink,
        interval: timedelta,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        before_delete: Callable[[], object] | None = None,
    ) -> None:
        self._policies = policies
        self._rows = rows
        self._audit = audit
        self._interval = interval
        self._clock = clock
        # The rollup flush, where rollups are kept: rows still marked dirty must be rolled
        # up before they go, or the tiers that outlive raw would never count them.
        self._before_delete = before_delete
        self._task: asyncio.Task[None] | None = None
        self.runs = 0

    def tenants_with_rows(self) -> list[str]:
        table = self._rows.read(f"SELECT DISTINCT tenant_id FROM {TABLE} ORDER BY tenant_id")
        return [str(x) for x in table.column(0).to_pylist()]

    async def run_once(self) -> list[RetentionRun]:
        now = self._clock()

        def enforce() -> list[RetentionRun]:
            if self._before_delete is not None:
                self._before_delete()
            return self._policies.enforce(self._rows, self.tenants_with_rows(), now, False)

        runs = await asyncio.to_thread(enforce)
        for run in runs:
            if run.raw_rows:
                await self._audit.record(
                    AuditEvent(
                        run.tenant_id,
                        self.AUDIT_ACTOR,
                        "retention.enforce",
                        f"raw_rows={run.raw_rows} before={run.cutoff.isoformat()}",
                        "local",
                        "OK",
                        self._clock(),
                    )
                )
        self.runs += 1
        deleted = sum(run.raw_rows for run in runs)
        log.info("retention_enforced", tenants=len(runs), raw_rows=deleted)
        return runs

    async def start(self) -> None:
        """Runs once now (a process that was down for a while catches up before it
        serves, and nothing loaded after the start races a delayed first run), then
        every `interval`."""
        if self._task is not None:
            return
        await self._run_logged()
        self._task = asyncio.ensure_future(self._loop())

    async def _run_logged(self) -> None:
        try:
            await self.run_once()
        except Exception:  # a failed run must neither stop the start nor the schedule
            log.exception("retention_enforce_failed")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval.total_seconds())
            await self._run_logged()

    async def aclose(self) -> None:
        """Cancels the schedule; a run in progress finishes its current tenant's delete
        (it runs in a thread) before the stores close, since the mesh awaits this first."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
