"""Compliance service: consent, erasure, export, retention, audit, API keys.

A thin adapter: proto → domain modules beside it → proto. Every call acts on the
credential's tenant only; a platform admin acts on the tenant its token names (`tid`).
Erasure needs a single-use token (claim `once`; docs/compliance.md), and erasure, export
and key management may be limited to an IP allowlist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bilten.analytics.compliance.v1 import compliance_service_pb2 as pb
from bilten.analytics.compliance.v1 import compliance_service_pb2_grpc as pb_grpc
from google.protobuf import timestamp_pb2

from services.compliance.api_keys import ApiKeyManager
from services.compliance.consent import ConsentRegistry, Purpose
from services.compliance.erasure import ErasureService
from services.compliance.export import EventReader, ExportFormat, export_subject
from services.compliance.network import IpAllowlist
from services.compliance.retention import RetentionPolicies
from services.platform.audit import AuditLog
from services.platform.errors import (
    AnalyticsError,
    FieldViolation,
    StatusCode,
    invalid_request,
    not_found,
)
from services.platform.grpc_edge import principal
from services.storage.metadata_store import (
    ApiKeyRecord,
    AuditRecord,
    ConsentEntry,
    ErasureRecord,
    InvalidPageTokenError,
    RetentionDays,
)

_PURPOSES = {
    pb.CONSENT_PURPOSE_ANALYTICS: Purpose.ANALYTICS,
    pb.CONSENT_PURPOSE_MARKETING: Purpose.MARKETING,
    pb.CONSENT_PURPOSE_PERSONALISATION: Purpose.PERSONALISATION,
}
_PURPOSE_NUMBERS = {v.value: k for k, v in _PURPOSES.items()}
_ERASURE_STATES = {
    "ACCEPTED": pb.ERASURE_STATE_ACCEPTED,
    "IN_PROGRESS": pb.ERASURE_STATE_IN_PROGRESS,
    "DONE": pb.ERASURE_STATE_DONE,
    "FAILED": pb.ERASURE_STATE_FAILED,
}


@dataclass(frozen=True)
class ComplianceDomain:
    """What the servicer delegates to (built in services/mesh.py)."""

    consent: ConsentRegistry
    erasure: ErasureService
    events: EventReader
    retention: RetentionPolicies
    audit: AuditLog
    api_keys: ApiKeyManager
    allowlist: IpAllowlist


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def _tenant() -> str:
    caller = principal()
    if not caller.tenant_id:
        raise AnalyticsError(
            StatusCode.FAILED_PRECONDITION,
            "TENANT_MISMATCH",
            "compliance data belongs to one tenant: use a token whose tid names it",
        )
    return caller.tenant_id


def _consent_pb(entry: ConsentEntry) -> pb.ConsentRecord:
    return pb.ConsentRecord(
        subject_id=entry.subject_id,
        purpose=_PURPOSE_NUMBERS[entry.purpose],
        granted=entry.granted,
        source=entry.source,
        policy_version=entry.policy_version,
        record_time=_ts(entry.recorded_at),
    )


def _erasure_pb(record: ErasureRecord) -> pb.ErasureRequest:
    return pb.ErasureRequest(
        erasure_request_id=record.erasure_request_id,
        subject_id=record.subject_id,
        state=_ERASURE_STATES[record.state],
        create_time=_ts(record.created_at),
        deadline_time=_ts(record.deadline_at),
        finish_time=_ts(record.finished_at),
        certificate_lines=list(record.certificate),
        error_message=record.error_message,
    )


def _key_pb(record: ApiKeyRecord) -> pb.ApiKey:
    return pb.ApiKey(
        api_key_id=record.key_id,
        display_name=record.display_name,
        scopes=sorted(record.scopes),
        create_time=_ts(record.created_at),
        revoke_time=_ts(record.revoked_at),
    )


def _audit_pb(record: AuditRecord) -> pb.AuditLogEntry:
    return pb.AuditLogEntry(
        sequence=record.sequence,
        actor=record.actor,
        action=record.action,
        resource=record.resource,
        peer=record.peer,
        outcome=record.outcome,
        time=_ts(record.at),
        entry_hash=record.entry_hash,
    )


def _retention_pb(policy: RetentionDays) -> pb.RetentionPolicy:
    return pb.RetentionPolicy(
        raw_days=policy.raw_days,
        minute_rollup_days=policy.minute_rollup_days,
        hour_rollup_days=policy.hour_rollup_days,
        day_rollup_days=policy.day_rollup_days,
    )


def _bad_page_token() -> AnalyticsError:
    return AnalyticsError(
        StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token is not valid here"
    )


class ComplianceServicer(pb_grpc.ComplianceServiceServicer):
    def __init__(self, domain: ComplianceDomain) -> None:
        self._d = domain

    def _sensitive(self, context: Any) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self._d.allowlist.check(str(context.peer()), metadata.get("x-forwarded-for", ""))

    # --- consent ---------------------------------------------------------------------

    async def RecordConsent(
        self, request: pb.RecordConsentRequest, context: Any
    ) -> pb.RecordConsentResponse:
        entry = await asyncio.to_thread(
            self._d.consent.record,
            _tenant(),
            request.subject_id,
            _PURPOSES[request.purpose],
            request.granted,
            request.source,
            request.policy_version,
        )
        return pb.RecordConsentResponse(record=_consent_pb(entry))

    async def GetConsent(
        self, request: pb.GetConsentRequest, context: Any
    ) -> pb.GetConsentResponse:
        state = await asyncio.to_thread(self._d.consent.state, _tenant(), request.subject_id)
        return pb.GetConsentResponse(
            current=[_consent_pb(e) for e in state.current],
            history=[_consent_pb(e) for e in state.history],
        )

    # --- erasure ---------------------------------------------------------------------

    async def CreateErasureRequest(
        self, request: pb.CreateErasureRequestRequest, context: Any
    ) -> pb.CreateErasureRequestResponse:
        caller = principal()
        if not caller.single_use:
            # A leaked session token must not be enough to destroy data: erasure takes
            # a token minted for it, accepted once (services/platform/auth.py).
            raise AnalyticsError(
                StatusCode.PERMISSION_DENIED,
                "SCOPE_MISSING",
                "erasure needs a single-use token (claim `once`), see docs/compliance.md",
                metadata={"required_credential": "single_use_token"},
            )
        self._sensitive(context)
        tenant_id = _tenant()
        try:
            record = await asyncio.to_thread(
                self._d.erasure.create, tenant_id, request.request_id, request.subject_id
            )
        except ValueError as exc:
            raise invalid_request([FieldViolation("request_id", str(exc))]) from exc
        return pb.CreateErasureRequestResponse(erasure_request=_erasure_pb(record))

    async def GetErasureRequest(
        self, request: pb.GetErasureRequestRequest, context: Any
    ) -> pb.GetErasureRequestResponse:
        record = await asyncio.to_thread(self._d.erasure.get, _tenant(), request.erasure_request_id)
        if record is None:
            raise not_found(f"erasure request {request.erasure_request_id!r}")
        return pb.GetErasureRequestResponse(erasure_request=_erasure_pb(record))

    # --- export ----------------------------------------------------------------------

    async def ExportSubjectData(
        self, request: pb.ExportSubjectDataRequest, context: Any
    ) -> AsyncIterator[pb.ExportSubjectDataResponse]:
        self._sensitive(context)
        fmt = (
            ExportFormat.CSV if request.format == pb.EXPORT_FORMAT_CSV else ExportFormat.JSON_LINES
        )
        chunks = await asyncio.to_thread(
            lambda: list(
                export_subject(self._d.events, self._d.consent, _tenant(), request.subject_id, fmt)
            )
        )
        for chunk in chunks:
            yield pb.ExportSubjectDataResponse(chunk=chunk)

    # --- retention -------------------------------------------------------------------

    async def GetRetentionPolicy(
        self, request: pb.GetRetentionPolicyRequest, context: Any
    ) -> pb.GetRetentionPolicyResponse:
        policy = await asyncio.to_thread(self._d.retention.get, _tenant())
        return pb.GetRetentionPolicyResponse(policy=_retention_pb(policy))

    async def UpdateRetentionPolicy(
        self, request: pb.UpdateRetentionPolicyRequest, context: Any
    ) -> pb.UpdateRetentionPolicyResponse:
        p = request.policy
        wanted = RetentionDays(
            p.raw_days, p.minute_rollup_days, p.hour_rollup_days, p.day_rollup_days
        )
        try:
            stored = await asyncio.to_thread(
                self._d.retention.put, _tenant(), wanted, datetime.now(UTC)
            )
        except ValueError as exc:
            raise invalid_request([FieldViolation("policy", str(exc))]) from exc
        return pb.UpdateRetentionPolicyResponse(policy=_retention_pb(stored))

    # --- audit -----------------------------------------------------------------------

    async def ListAuditLogEntries(
        self, request: pb.ListAuditLogEntriesRequest, context: Any
    ) -> pb.ListAuditLogEntriesResponse:
        try:
            entries, token = await asyncio.to_thread(
                self._d.audit.page, _tenant(), request.page_size, request.page_token
            )
        except InvalidPageTokenError as exc:
            raise _bad_page_token() from exc
        return pb.ListAuditLogEntriesResponse(
            entries=[_audit_pb(e) for e in entries], next_page_token=token
        )

    async def VerifyAuditLog(
        self, request: pb.VerifyAuditLogRequest, context: Any
    ) -> pb.VerifyAuditLogResponse:
        report = await asyncio.to_thread(self._d.audit.verify, _tenant())
        return pb.VerifyAuditLogResponse(
            intact=report.intact,
            checked_count=report.checked_count,
            first_broken_sequence=report.first_broken_sequence,
        )

    # --- API keys --------------------------------------------------------------------

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Any
    ) -> pb.CreateApiKeyResponse:
        self._sensitive(context)
        issued = await asyncio.to_thread(
            self._d.api_keys.create,
            _tenant(),
            request.display_name,
            list(request.scopes),
            principal().scopes,
        )
        return pb.CreateApiKeyResponse(api_key=_key_pb(issued.record), secret=issued.secret)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Any
    ) -> pb.ListApiKeysResponse:
        self._sensitive(context)
        keys, token = await asyncio.to_thread(
            self._d.api_keys.page, _tenant(), request.page_size, request.page_token
        )
        return pb.ListApiKeysResponse(api_keys=[_key_pb(k) for k in keys], next_page_token=token)

    async def RotateApiKey(
        self, request: pb.RotateApiKeyRequest, context: Any
    ) -> pb.RotateApiKeyResponse:
        self._sensitive(context)
        issued = await asyncio.to_thread(
            self._d.api_keys.rotate,
            _tenant(),
            request.api_key_id,
            request.grace_period_seconds,
        )
        return pb.RotateApiKeyResponse(api_key=_key_pb(issued.record), secret=issued.secret)

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Any
    ) -> pb.RevokeApiKeyResponse:
        self._sensitive(context)
        record = await asyncio.to_thread(self._d.api_keys.revoke, _tenant(), request.api_key_id)
        return pb.RevokeApiKeyResponse(api_key=_key_pb(record))
