"""Consent per subject (user id or anonymous id) and purpose, with history.

Every decision is appended (never updated), so `GetConsent` shows the history and the
current state is the latest decision per purpose. Ingestion asks `allows_analytics` for
each event: the answer comes from an in-memory map of the latest `analytics` decision
per subject, loaded at start and updated by `record` *before* it returns, so a
withdrawal applies to every event acknowledged after the RecordConsent call returned.

Default per tenant (`consent mode`):
- `assumed` (the platform default, BILTEN_CONSENT_DEFAULT_MODE): events are stored unless
  the subject withdrew `analytics` consent (opt-out regimes such as CCPA);
- `required`: events are stored only when a subject of the event granted it (opt-in,
  GDPR-style for analytics cookies). Events with neither user id nor anonymous id have no
  subject to consent and are stored in both modes.

In the cluster shape (metadata on PostgreSQL, `metadata_store_url`) compliance records
the decision and ingestion, another process, enforces it. There the registry follows the
store (`feed`): ingestion awaits `refresh` once per batch before its checks, which reads
the decisions appended since the last refresh (one indexed query when there are none).
So a withdrawal whose RecordConsent returned applies to every batch that arrives after
it, in every pod; no TTL to wait out. Consent ids are committed in order (the store
serialises consent writes), so "everything after the last id seen" misses nothing.
Deleted decisions (erasure) and mode changes cannot be read as appended rows; they bump
a counter, and a registry that sees it move reloads everything.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import metrics

from services.platform.errors import dependency_unavailable
from services.storage.metadata_store import ConsentEntry

_meter = metrics.get_meter("bilten.analytics.compliance")
_consent_rejections = _meter.create_counter(
    "bilten_consent_rejected_events", description="Events refused for missing consent"
)


class Purpose(enum.StrEnum):
    ANALYTICS = "ANALYTICS"
    MARKETING = "MARKETING"
    PERSONALISATION = "PERSONALISATION"


class ConsentMode(enum.StrEnum):
    ASSUMED = "assumed"
    REQUIRED = "required"


class ConsentStore(Protocol):
    def add_consent(self, entry: ConsentEntry) -> None: ...
    def consent_history(self, tenant_id: str, subject_id: str) -> list[ConsentEntry]: ...
    def latest_consents(self, purpose: str) -> list[ConsentEntry]: ...
    def delete_consents(self, tenant_id: str, subject_id: str) -> int: ...
    def set_consent_mode(self, tenant_id: str, mode: str) -> None: ...
    def consent_modes(self) -> dict[str, str]: ...


class ConsentFeed(Protocol):
    """What a registry following a shared store reads (the metadata stores)."""

    def latest_consents(self, purpose: str) -> list[ConsentEntry]: ...
    def consent_modes(self) -> dict[str, str]: ...
    def consent_position(self) -> tuple[int, int]: ...
    def consents_between(
        self, purpose: str, after_id: int, up_to_id: int
    ) -> list[ConsentEntry]: ...


@dataclass(frozen=True, slots=True)
class ConsentState:
    current: list[ConsentEntry]  # latest per purpose
    history: list[ConsentEntry]  # newest first


class ConsentRegistry:
    """Consent decisions and the ingestion-time check; thread-safe."""

    def __init__(
        self,
        store: ConsentStore,
        default_mode: ConsentMode = ConsentMode.ASSUMED,
        feed: ConsentFeed | None = None,
    ):
        """`feed`: the store again when other processes write to it too (PostgreSQL);
        `refresh` then catches up with their decisions. None: this process is the only
        writer (SQLite), the map is kept current by `record` alone."""
        self._store = store
        self._default_mode = default_mode
        self._feed = feed
        self._lock = threading.Lock()
        self._analytics: dict[tuple[str, str], bool] = {}
        self._modes: dict[str, ConsentMode] = {}
        self._position = (0, 0)  # (resets, last consent id) applied from the feed
        # Refreshes of concurrent batches share one store read (see `refresh`).
        self._refreshing: asyncio.Lock | None = None
        self._last_refresh_started = 0.0
        self._reload()

    def _reload(self) -> None:
        # The position is read before the rows: rows newer than it are applied again by
        # the next refresh, in id order, which leaves the same latest decision.
        position = self._feed.consent_position() if self._feed is not None else (0, 0)
        analytics = {
            (e.tenant_id, e.subject_id): e.granted
            for e in self._store.latest_consents(Purpose.ANALYTICS)
        }
        modes = {t: ConsentMode(m) for t, m in self._store.consent_modes().items()}
        with self._lock:
            self._analytics = analytics
            self._modes = modes
            self._position = position

    def catch_up(self) -> None:
        """Applies what other processes changed since the last call (blocking I/O)."""
        if self._feed is None:
            return
        resets, top = self._feed.consent_position()
        if resets != self._position[0]:
            self._reload()
            return
        if top <= self._position[1]:
            return
        entries = self._feed.consents_between(Purpose.ANALYTICS, self._position[1], top)
        with self._lock:
            for e in entries:  # oldest first: the last one per subject wins
                self._analytics[(e.tenant_id, e.subject_id)] = e.granted
            self._position = (resets, top)

    async def refresh(self) -> None:
        """Before a batch's checks: brings the answers up to every decision committed
        before this call (a no-op without a feed). Concurrent callers share a read that
        started after they called, so a burst of batches costs one round trip, not one
        each. Fails closed: when the store cannot be read the batch is refused
        (UNAVAILABLE, retryable) rather than checked against stale decisions."""
        if self._feed is None:
            return
        called = time.monotonic()
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if self._last_refresh_started > called:
                return  # a refresh that began after this call has just finished
            self._last_refresh_started = time.monotonic()
            try:
                await asyncio.to_thread(self.catch_up)
            except Exception as exc:
                self._last_refresh_started = 0.0
                raise dependency_unavailable(
                    "consent decisions could not be read from the metadata store; retry"
                ) from exc

    def record(
        self,
        tenant_id: str,
        subject_id: str,
        purpose: Purpose,
        granted: bool,
        source: str,
        policy_version: str,
        at: datetime | None = None,
    ) -> ConsentEntry:
        entry = ConsentEntry(
            tenant_id,
            subject_id,
            purpose.value,
            granted,
            source,
            policy_version,
            at or datetime.now(UTC),
        )
        # Durable first, then visible to ingestion: a crash between the two loses
        # nothing, because the map is rebuilt from the store at start.
        self._store.add_consent(entry)
        if purpose is Purpose.ANALYTICS:
            with self._lock:
                self._analytics[(tenant_id, subject_id)] = granted
        return entry

    def state(self, tenant_id: str, subject_id: str) -> ConsentState:
        history = self._store.consent_history(tenant_id, subject_id)
        current: dict[str, ConsentEntry] = {}
        for entry in history:  # newest first: the first seen per purpose is current
            current.setdefault(entry.purpose, entry)
        return ConsentState(sorted(current.values(), key=lambda e: e.purpose), history)

    def forget(self, tenant_id: str, subject_id: str) -> int:
        """Erasure: drops the subject's decisions (the erasure certificate is the proof
        that remains)."""
        with self._lock:
            self._analytics.pop((tenant_id, subject_id), None)
        return self._store.delete_consents(tenant_id, subject_id)

    def mode(self, tenant_id: str) -> ConsentMode:
        return self._modes.get(tenant_id, self._default_mode)

    def set_mode(self, tenant_id: str, mode: ConsentMode) -> None:
        self._store.set_consent_mode(tenant_id, mode.value)
        with self._lock:
            self._modes[tenant_id] = mode

    def allows_analytics(self, tenant_id: str, user_id: str, anonymous_id: str) -> bool:
        """May an event of these ids be stored? (the ingestion consent check)."""
        subjects = [s for s in (user_id, anonymous_id) if s]
        if not subjects:
            return True
        decisions = [self._analytics.get((tenant_id, s)) for s in subjects]
        if any(d is False for d in decisions):
            allowed = False
        elif self.mode(tenant_id) is ConsentMode.REQUIRED:
            allowed = any(d is True for d in decisions)
        else:
            allowed = True
        if not allowed:
            _consent_rejections.add(1)
        return allowed
