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

In the cluster shape each process holds its own map; a decision recorded in another
process reaches it only after a restart (docs/compliance.md lists this as open work).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import metrics

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


@dataclass(frozen=True, slots=True)
class ConsentState:
    current: list[ConsentEntry]  # latest per purpose
    history: list[ConsentEntry]  # newest first


class ConsentRegistry:
    """Consent decisions and the ingestion-time check; thread-safe."""

    def __init__(self, store: ConsentStore, default_mode: ConsentMode = ConsentMode.ASSUMED):
        self._store = store
        self._default_mode = default_mode
        self._lock = threading.Lock()
        self._analytics: dict[tuple[str, str], bool] = {
            (e.tenant_id, e.subject_id): e.granted for e in store.latest_consents(Purpose.ANALYTICS)
        }
        self._modes = {t: ConsentMode(m) for t, m in store.consent_modes().items()}

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
