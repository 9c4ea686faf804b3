"""The audit log: who did what, to which resource, when, from where, with what outcome.

The edge interceptor records one entry after every call it admits or refuses (see
`should_audit` for the one exception), in the caller's tenant chain; unauthenticated
attempts go to the platform chain (tenant ""). Entries are appended to the metadata
store, where each entry's SHA-256 covers the previous entry's hash, so editing, inserting
or removing a row in the middle breaks every later link (`verify`).

What the chain cannot show on its own: a cut of the newest entries. Whoever keeps the
head (sequence and hash from `ListAuditLogEntries` / `audit verify`) elsewhere detects
that too; docs/compliance.md says how.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from services.storage.metadata_store import AuditChainReport, AuditRecord

log = structlog.get_logger(__name__)

_INGESTION = "/bilten.analytics.ingestion.v1.IngestionService/"
# Event submission succeeds thousands of times a second with a write key: each success
# is counted in metrics and stored as the event itself, and a chained fsynced entry per
# call would cap ingestion at the audit log's write rate. Their refusals (bad or revoked
# key, missing scope, rate limit) are audited like everything else.
UNAUDITED_WHEN_OK = frozenset(
    _INGESTION + m
    for m in (
        "Track",
        "TrackPage",
        "TrackConversion",
        "TrackCustom",
        "IngestEvents",
        "UploadEvents",
    )
)
# Request fields that name the resource an RPC acts on, first match wins.
RESOURCE_FIELDS = (
    "subject_id",
    "api_key_id",
    "erasure_request_id",
    "report_id",
    "model_id",
    "ticketed_event_id",
    "user_id",
)


# Fields naming a person: the log keeps a hash, so erasing the person leaves no readable
# id behind, while an officer holding the id can still find its entries (same hash).
PSEUDONYMISED_FIELDS = frozenset({"subject_id", "user_id"})


def resource_label(field: str, value: str) -> str:
    if field in PSEUDONYMISED_FIELDS:
        return f"{field}=sha256:{subject_hash(value)}"
    return f"{field}={value}"[:300]


def subject_hash(subject_id: str) -> str:
    return hashlib.sha256(subject_id.encode()).hexdigest()[:32]


def should_audit(method: str, outcome: str) -> bool:
    return not (outcome == "OK" and method in UNAUDITED_WHEN_OK)


def client_address(peer: str, forwarded_for: str) -> str:
    """Where a call came from: the transport peer, and the client Envoy (or another
    proxy) reports in `x-forwarded-for` when there is one. Both are kept because the
    header is only as trustworthy as the proxy that set it."""
    if forwarded_for:
        return f"{forwarded_for.split(',')[0].strip()} via {peer}"
    return peer


@dataclass(frozen=True, slots=True)
class AuditEvent:
    tenant_id: str
    actor: str  # principal subject, "anonymous" when no credential was accepted
    action: str  # full RPC name, or a job name such as `retention.enforce`
    resource: str
    peer: str
    outcome: str  # gRPC status code name
    at: datetime


class AuditSink(Protocol):
    async def record(self, event: AuditEvent) -> None: ...


class AuditStore(Protocol):
    def append_audit(
        self,
        tenant_id: str,
        actor: str,
        action: str,
        resource: str,
        peer: str,
        outcome: str,
        at: datetime,
    ) -> AuditRecord: ...

    def list_audit(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[AuditRecord], str]: ...

    def verify_audit_chain(self, tenant_id: str) -> AuditChainReport: ...

    def audit_tenants(self) -> list[str]: ...


class AuditLog:
    """`AuditSink` on the metadata store."""

    def __init__(self, store: AuditStore) -> None:
        self._store = store

    async def record(self, event: AuditEvent) -> None:
        # The append fsyncs; off the event loop so other calls keep being served.
        await asyncio.to_thread(self.record_now, event)

    def record_now(self, event: AuditEvent) -> AuditRecord:
        return self._store.append_audit(
            event.tenant_id,
            event.actor,
            event.action,
            event.resource,
            event.peer,
            event.outcome,
            event.at,
        )

    def page(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[AuditRecord], str]:
        return self._store.list_audit(tenant_id, page_size, page_token)

    def verify(self, tenant_id: str) -> AuditChainReport:
        return self._store.verify_audit_chain(tenant_id)

    def verify_all(self) -> list[AuditChainReport]:
        """Every tenant's chain (the CLI's `audit verify`)."""
        return [self._store.verify_audit_chain(t) for t in self._store.audit_tenants()]


def now() -> datetime:
    return datetime.now(UTC)
