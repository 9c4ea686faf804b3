"""Every RPC of the access table against every role, over real gRPC; hostile tenants;
replayed and expired tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from bilten.analytics.compliance.v1 import compliance_service_pb2 as pb
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.platform.access import REQUIRED_SCOPES
from services.platform.auth import ROLE_SCOPES, Role, Scope
from tests.compliance.conftest import OTHER_TENANT, Env
from tests.conftest import tracked_event

pytestmark = pytest.mark.integration


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def _call(env: Env, method: str, credential: str) -> tuple[grpc.StatusCode, str]:
    """Calls `method` with an empty request message (raw bytes, so one helper covers
    every service); returns the status code and ErrorInfo reason."""
    name = method.strip("/").replace("/", ".")
    descriptor = descriptor_pool.Default().FindMethodByName(name)
    md = env.md(credential)
    # Generous: on a loaded CI worker a refusal must not turn into DEADLINE_EXCEEDED.
    # Only allowed live streams that send nothing at first wait this long.
    timeout = 8.0
    try:
        if descriptor.client_streaming and descriptor.server_streaming:
            call = env.channel.stream_stream(method)(iter(()), metadata=md, timeout=timeout)
            async for _ in call:
                break
        elif descriptor.client_streaming:
            await env.channel.stream_unary(method)(iter(()), metadata=md, timeout=timeout)
        elif descriptor.server_streaming:
            stream = env.channel.unary_stream(method)(b"", metadata=md, timeout=timeout)
            async for _ in stream:
                break
            stream.cancel()
        else:
            await env.channel.unary_unary(method)(b"", metadata=md, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return error.code(), _reason(error)
    return grpc.StatusCode.OK, ""


async def test_every_rpc_against_every_role(env: Env) -> None:
    roles = list(ROLE_SCOPES)
    assert set(roles) == {
        Role.PLATFORM_ADMIN,
        Role.ORGANIZER_ADMIN,
        Role.ANALYST,
        Role.EVENT_SENDER,
        Role.COMPLIANCE_OFFICER,
    }
    tokens = {role: env.token(role) for role in roles}
    cases = [(m, r) for m in sorted(REQUIRED_SCOPES) for r in roles]
    # Bounded concurrency: a few hundred calls at once would only measure the machine.
    gate = asyncio.Semaphore(24)

    async def bounded(method: str, role: str) -> tuple[grpc.StatusCode, str]:
        async with gate:
            return await _call(env, method, tokens[role])

    results = await asyncio.gather(*(bounded(m, r) for m, r in cases))
    wrong = []
    refusals = 0
    for (method, role), (code, reason) in zip(cases, results, strict=True):
        scopes = ROLE_SCOPES[role]
        allowed = REQUIRED_SCOPES[method] in scopes or Scope.ADMIN in scopes
        if method.startswith(_COMPLIANCE):
            # Written out, not derived: widening who may erase or manage keys must fail
            # here even if the role table and the access table change together.
            assert allowed == (role in _COMPLIANCE_EXPECTED[method.removeprefix(_COMPLIANCE)])
        refused = code == grpc.StatusCode.PERMISSION_DENIED and reason.endswith("SCOPE_MISSING")
        refusals += refused
        if allowed == refused or code == grpc.StatusCode.UNAUTHENTICATED:
            wrong.append((method, role, code.name, reason))
    assert not wrong, wrong
    assert 0 < refusals < len(cases)


_COMPLIANCE = "/bilten.analytics.compliance.v1.ComplianceService/"
_OFFICERS = {Role.PLATFORM_ADMIN, Role.ORGANIZER_ADMIN, Role.COMPLIANCE_OFFICER}
_KEY_MANAGERS = {Role.PLATFORM_ADMIN, Role.ORGANIZER_ADMIN}
_COMPLIANCE_EXPECTED = {
    **dict.fromkeys(
        (
            "RecordConsent",
            "GetConsent",
            "CreateErasureRequest",
            "GetErasureRequest",
            "ExportSubjectData",
            "GetRetentionPolicy",
            "UpdateRetentionPolicy",
            "ListAuditLogEntries",
            "VerifyAuditLog",
        ),
        _OFFICERS,
    ),
    **dict.fromkeys(("CreateApiKey", "ListApiKeys", "RotateApiKey", "RevokeApiKey"), _KEY_MANAGERS),
}


async def test_role_table_pins_the_sensitive_boundaries() -> None:
    # Cheap guards on top of the matrix: who may erase, manage keys, read analytics.
    def may(role: str, scope: str) -> bool:
        return scope in ROLE_SCOPES[role] or Scope.ADMIN in ROLE_SCOPES[role]

    assert not may(Role.ANALYST, Scope.COMPLIANCE_WRITE)
    assert not may(Role.ANALYST, Scope.KEYS_MANAGE)
    assert not may(Role.COMPLIANCE_OFFICER, Scope.ANALYTICS_READ)
    assert not may(Role.COMPLIANCE_OFFICER, Scope.KEYS_MANAGE)
    assert ROLE_SCOPES[Role.EVENT_SENDER] == frozenset({Scope.EVENTS_WRITE})
    assert may(Role.COMPLIANCE_OFFICER, Scope.COMPLIANCE_READ)


async def _ingest_as(env: Env, user_id: str) -> None:
    from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as ipb

    response = await env.ingestion.IngestEvents(
        ipb.IngestEventsRequest(events=[tracked_event("page_seen", user_id=user_id)] * 1),
        metadata=env.md(env.credentials["write_key"]),
    )
    assert response.results[0].status == ipb.INGEST_STATUS_ACCEPTED


async def _export(env: Env, credential: str, subject: str) -> bytes:
    chunks: AsyncIterator[pb.ExportSubjectDataResponse] = env.compliance.ExportSubjectData(
        pb.ExportSubjectDataRequest(subject_id=subject), metadata=env.md(credential)
    )
    return b"".join([c.chunk async for c in chunks])


async def test_hostile_tenant_cannot_read_export_or_erase_another_tenants_subject(
    env: Env,
) -> None:
    await _ingest_as(env, "alice")
    officer = env.token(Role.COMPLIANCE_OFFICER)
    await env.compliance.RecordConsent(
        pb.RecordConsentRequest(
            subject_id="alice", purpose=pb.CONSENT_PURPOSE_MARKETING, granted=True, source="form"
        ),
        metadata=env.md(officer),
    )
    own = await env.compliance.CreateErasureRequest(
        pb.CreateErasureRequestRequest(request_id="r-own", subject_id="nobody"),
        metadata=env.md(env.token(Role.COMPLIANCE_OFFICER, single_use=True)),
    )

    hostile = env.token(Role.COMPLIANCE_OFFICER, OTHER_TENANT)
    consent = await env.compliance.GetConsent(
        pb.GetConsentRequest(subject_id="alice"), metadata=env.md(hostile)
    )
    assert not consent.history
    assert await _export(env, hostile, "alice") == b""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compliance.GetErasureRequest(
            pb.GetErasureRequestRequest(erasure_request_id=own.erasure_request.erasure_request_id),
            metadata=env.md(hostile),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    erased = await env.compliance.CreateErasureRequest(
        pb.CreateErasureRequestRequest(request_id="r-hostile", subject_id="alice"),
        metadata=env.md(env.token(Role.COMPLIANCE_OFFICER, OTHER_TENANT, single_use=True)),
    )
    assert erased.erasure_request.state == pb.ERASURE_STATE_DONE
    # Alice's data in her own tenant is untouched.
    assert env.mesh.event_store.count(env.tenant) == 1
    assert b"alice" in await _export(env, officer, "alice")


async def test_single_use_tokens_cannot_be_replayed_and_erasure_demands_one(env: Env) -> None:
    once = env.token(Role.COMPLIANCE_OFFICER, single_use=True)
    request = pb.CreateErasureRequestRequest(request_id="r1", subject_id="bob")
    first = await env.compliance.CreateErasureRequest(request, metadata=env.md(once))
    assert first.erasure_request.state == pb.ERASURE_STATE_DONE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compliance.CreateErasureRequest(request, metadata=env.md(once))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A replay is refused on any RPC, not only erasure.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compliance.GetRetentionPolicy(
            pb.GetRetentionPolicyRequest(), metadata=env.md(once)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    reusable = env.token(Role.COMPLIANCE_OFFICER)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compliance.CreateErasureRequest(request, metadata=env.md(reusable))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # An idempotent retry (new single-use token, same request_id) gets the same request.
    again = await env.compliance.CreateErasureRequest(
        request, metadata=env.md(env.token(Role.COMPLIANCE_OFFICER, single_use=True))
    )
    assert again.erasure_request.erasure_request_id == first.erasure_request.erasure_request_id


async def test_expired_token_is_refused(env: Env) -> None:
    token = env.token(Role.PLATFORM_ADMIN, ttl=1)
    await asyncio.sleep(2.1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compliance.GetRetentionPolicy(
            pb.GetRetentionPolicyRequest(), metadata=env.md(token)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(caught.value) == "ERROR_REASON_CREDENTIAL_EXPIRED"
