"""Retention policy per tenant and its enforcement job.

Defaults (ARCHITECTURE.md): raw 7 days, minute rollups 30 days, hour rollups 1 year, day
rollups 5 years. Enforcement here deletes raw events older than the tenant's `raw_days`
from the event store; the rollup tiers' values are stored and served for the rollup
store to apply (services/query/rollups.py prunes its tiers itself; wiring it to these
per-tenant values is open, docs/compliance.md). `dry_run` counts what would go without
deleting anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import pyarrow as pa

from services.storage.event_store import TABLE
from services.storage.metadata_store import RetentionDays

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
