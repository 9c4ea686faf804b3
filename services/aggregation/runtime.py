"""The aggregation service's in-process parts and their background jobs.

One `AggregationRuntime` per process, built by the mesh:
- the live metrics hub, the alerts hub (the `AlertSink` the prediction service
  publishes to) and the threshold monitor on the hub's numbers;
- the result cache and the rollup maintainer (its own DuckDB file), behind `reads`;
- the event observer the producers call: the runtime *is* an `EventObserver` and fans
  each durable batch out, in this order, to the rollup maintainer (marks minutes dirty),
  the live hub, and the result cache (invalidates): the cache goes last so that a read
  missing the cache always finds the rollups' dirty marks and flushes them first.

Until `start` (which only a process serving the aggregation service calls) observed
batches are ignored: an ingestion-only process keeps no live state.

Start order matters for exactness: the rollups are rebuilt (after a crash) and the hub
is seeded from the store before the server takes events and before the stream
processor commits any, so the seeded numbers and the observed batches never overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import structlog

from services.aggregation.reads import MetricReads
from services.events.model import TrackedEvent
from services.live.alerts import AlertSeverity, AlertsHub
from services.live.metrics_hub import LiveMetricsHub
from services.live.observers import EventObserver, ObserverFanout, follow_live_feed
from services.live.thresholds import LiveMetricName, ThresholdMonitor, ThresholdRule
from services.platform.settings import PlatformSettings
from services.platform.telemetry import observe_gauge
from services.query.result_cache import ResultCache
from services.query.rollups import (
    RetentionPolicy,
    RollupMaintainer,
    RollupStore,
    TenantRetention,
)
from services.storage.event_store import EventStore
from services.storage.metadata_store import RetentionDays
from services.streaming.live import LiveFeed

log = structlog.get_logger(__name__)

ROLLUPS_FILE = "rollups.duckdb"
_PRUNE_EVERY = timedelta(hours=1)


def retention_policy(settings: PlatformSettings) -> RetentionPolicy:
    return RetentionPolicy(
        raw_days=settings.raw_retention_days,
        minute_days=settings.rollup_minute_retention_days,
        hour_days=settings.rollup_hour_retention_days,
        day_days=settings.rollup_day_retention_days,
    )


class RetentionRecords(Protocol):
    """Where compliance keeps each tenant's own retention (the metadata store)."""

    def get_retention(self, tenant_id: str) -> RetentionDays | None: ...
    def retention_policies(self) -> Mapping[str, RetentionDays]: ...


def _as_policy(tenant_id: str, days: RetentionDays | None) -> RetentionPolicy | None:
    if days is None:
        return None
    try:
        return RetentionPolicy(
            raw_days=days.raw_days,
            minute_days=days.minute_rollup_days,
            hour_days=days.hour_rollup_days,
            day_days=days.day_rollup_days,
        )
    except ValueError:
        # Compliance checks the order on the way in; a row that still breaks the tier
        # rules (edited by hand, an older build) must not stop reads: the default rules.
        log.warning("tenant_retention_ignored", tenant_id=tenant_id, policy=str(days))
        return None


def tenant_retention(default: RetentionPolicy, records: RetentionRecords) -> TenantRetention:
    """The default plus each tenant's own policy, read from `records` at each use."""

    def listing() -> dict[str, RetentionPolicy]:
        own = {t: _as_policy(t, d) for t, d in records.retention_policies().items()}
        return {t: p for t, p in own.items() if p is not None}

    return TenantRetention(
        default, lambda tenant_id: _as_policy(tenant_id, records.get_retention(tenant_id)), listing
    )


class AggregationRuntime:
    def __init__(
        self,
        settings: PlatformSettings,
        events: EventStore,
        retention_records: RetentionRecords | None = None,
    ) -> None:
        """`retention_records`: the tenants' own retention policies (the mesh passes its
        metadata store); without it every tenant gets the settings' policy."""
        self._settings = settings
        self._events = events
        self.policy = retention_policy(settings)
        self.retention = (
            tenant_retention(self.policy, retention_records)
            if retention_records is not None
            else TenantRetention(self.policy)
        )
        self.cache = ResultCache(
            settings.result_cache_ttl_seconds, settings.result_cache_max_entries
        )
        self.live = LiveMetricsHub(
            min_interval_seconds=settings.live_update_interval_seconds,
            heartbeat_seconds=settings.live_heartbeat_seconds,
        )
        self.alerts = AlertsHub()
        self.thresholds = ThresholdMonitor(
            self.live,
            self.alerts,
            [
                ThresholdRule(
                    rule.rule_id,
                    rule.tenant_id,
                    LiveMetricName(rule.metric),
                    rule.lower,
                    rule.upper,
                    AlertSeverity(rule.severity),
                    rule.ticketed_event_id,
                    rule.currency,
                )
                for rule in settings.live_alert_rules
            ],
        )
        self.live.add_listener(self.thresholds.evaluate)
        self.maintainer: RollupMaintainer | None = None
        self.reads = MetricReads(events, policy=self.retention)
        self._fanout: ObserverFanout | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- the EventObserver the producers call ------------------------------------------

    def observe_events(self, events: Sequence[TrackedEvent]) -> None:
        if self._fanout is not None:
            self._fanout.observe_events(events)

    def observe_rows(self, rows: pa.Table) -> None:
        if self._fanout is not None:
            self._fanout.observe_rows(rows)

    def add_observer(self, observer: EventObserver) -> bool:
        """Feeds `observer` the same durable batches as the live hub (after `start`);
        False when this process does not run the runtime."""
        if self._fanout is None:
            return False
        self._fanout.add(observer)
        return True

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, live_feed: LiveFeed | None = None) -> None:
        """Opens the rollups, rebuilds and seeds (see the module docstring), starts jobs.

        `live_feed`: the stream processor's feed, when events arrive through Kafka.
        """
        data_dir = Path(self._settings.data_dir)
        store = RollupStore(data_dir / ROLLUPS_FILE)
        maintainer = RollupMaintainer(self._events, store, self.retention)
        if store.needs_rebuild:
            # After a crash only the raw window can hold minutes a lost flush touched;
            # a new rollup file must take in everything raw still has.
            now = datetime.now(UTC)
            since = None if store.created else now - timedelta(days=self.policy.raw_days + 1)
            # Tenants with a shorter raw window of their own have had older raw events
            # deleted: rebuilding those days from raw would wipe their rollups.
            later = {
                tenant_id: now - timedelta(days=policy.raw_days)
                for tenant_id, policy in (await asyncio.to_thread(self.retention.listing)).items()
                if policy.raw_days < self.policy.raw_days
            }
            log.info("rollups_rebuild", since=since.isoformat() if since else "all")
            await asyncio.to_thread(maintainer.rebuild, since, later)
        await asyncio.to_thread(self.live.seed, self._events)
        self.maintainer = maintainer
        self.reads.use_rollups(maintainer)
        observers: list[EventObserver] = [maintainer, self.live, self.cache]
        self._fanout = ObserverFanout(*observers)
        self._tasks.append(self.live.start())
        self._tasks.append(asyncio.ensure_future(self._maintain(maintainer)))
        if live_feed is not None:
            self._tasks.append(asyncio.ensure_future(follow_live_feed(live_feed, self)))
        observe_gauge(
            "bilten_result_cache_hit_ratio",
            "Hits / lookups of the aggregation result cache since start",
            lambda: self.cache.stats().hit_rate,
        )
        observe_gauge(
            "bilten_result_cache_entries",
            "Results held by the aggregation result cache",
            lambda: self.cache.stats().entries,
        )
        observe_gauge(
            "bilten_live_subscribers",
            "Open live metric streams of this process",
            lambda: self.live.subscriber_count,
        )
        observe_gauge(
            "bilten_alert_subscribers",
            "Open alert streams of this process",
            lambda: self.alerts.subscriber_count,
        )

    async def _maintain(self, maintainer: RollupMaintainer) -> None:
        """Rolls up new events every few seconds and prunes expired tiers hourly."""
        last_prune = datetime.min.replace(tzinfo=UTC)
        while True:
            await asyncio.sleep(self._settings.rollup_flush_seconds)
            try:
                await asyncio.to_thread(maintainer.flush)
                if datetime.now(UTC) - last_prune >= _PRUNE_EVERY:
                    await asyncio.to_thread(maintainer.prune)
                    last_prune = datetime.now(UTC)
            except Exception:
                log.exception("rollup_maintenance_failed")

    async def end_streams(self) -> None:
        """Ends every live stream (they send the in-band shutdown message)."""
        await self.live.stop()
        self.alerts.close()

    async def close(self) -> None:
        """After the server and the event log stopped: last rollup flush, clean close."""
        await asyncio.sleep(0.05)  # lets batches the processor handed over be noted
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._fanout = None
        if self.maintainer is not None:
            await asyncio.to_thread(self.maintainer.flush)
            self.maintainer.store.close()
