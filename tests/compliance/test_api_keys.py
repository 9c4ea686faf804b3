"""API keys over gRPC: shown once, stored as hashes, rotation grace, revocation, tenancy."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from bilten.analytics.compliance.v1 import compliance_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as ipb

from services.platform.auth import Role, Scope
from tests.compliance.conftest import OTHER_TENANT, Env
from tests.conftest import tracked_event

pytestmark = pytest.mark.integration


async def _track(env: Env, key: str) -> grpc.StatusCode:
    try:
        await env.ingestion.Track(
            ipb.TrackRequest(event=tracked_event("key_probe")), metadata=env.md(key)
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_key_lifecycle_create_list_rotate_revoke(env: Env) -> None:
    admin = env.md(env.token(Role.ORGANIZER_ADMIN))
    created = await env.compliance.CreateApiKey(
        pb.CreateApiKeyRequest(display_name="web sdk", scopes=[Scope.EVENTS_WRITE]),
        metadata=admin,
    )
    key_id = created.api_key.api_key_id
    assert created.secret.startswith(f"bak_{key_id}_")
    assert await _track(env, created.secret) == grpc.StatusCode.OK

    # Stored as a hash only; never listed.
    stored = env.mesh.metadata.find_api_key(key_id)
    assert stored is not None and stored.display_name == "web sdk"
    secret_part = created.secret.rsplit("_", 1)[1]
    assert secret_part not in stored.secret_hash
    listed = await env.compliance.ListApiKeys(pb.ListApiKeysRequest(), metadata=admin)
    mine = [k for k in listed.api_keys if k.api_key_id == key_id]
    assert len(mine) == 1 and list(mine[0].scopes) == [Scope.EVENTS_WRITE]
    assert created.secret not in str(listed)

    # Rotation: the new secret works, the old one too during a 5 s grace period, then not
    # (polled: under load the calls above may eat into the grace, never past its end).
    rotated_at = time.monotonic()
    rotated = await env.compliance.RotateApiKey(
        pb.RotateApiKeyRequest(api_key_id=key_id, grace_period_seconds=5), metadata=admin
    )
    assert rotated.secret != created.secret
    assert await _track(env, rotated.secret) == grpc.StatusCode.OK
    assert await _track(env, created.secret) == grpc.StatusCode.OK
    while await _track(env, created.secret) == grpc.StatusCode.OK:
        assert time.monotonic() - rotated_at < 35, "the old secret outlived its grace period"
        await asyncio.sleep(0.2)
    assert time.monotonic() - rotated_at >= 4.5  # not before the grace period ended
    assert await _track(env, created.secret) == grpc.StatusCode.UNAUTHENTICATED
    assert await _track(env, rotated.secret) == grpc.StatusCode.OK

    # Revocation takes effect at once despite the authenticator's cache.
    revoked = await env.compliance.RevokeApiKey(
        pb.RevokeApiKeyRequest(api_key_id=key_id), metadata=admin
    )
    assert revoked.api_key.HasField("revoke_time")
    assert await _track(env, rotated.secret) == grpc.StatusCode.UNAUTHENTICATED


async def test_keys_are_tenant_scoped_and_never_escalate(env: Env) -> None:
    admin = env.md(env.token(Role.ORGANIZER_ADMIN))
    hostile = env.md(env.token(Role.ORGANIZER_ADMIN, OTHER_TENANT))
    created = await env.compliance.CreateApiKey(
        pb.CreateApiKeyRequest(display_name="mine", scopes=[Scope.EVENTS_WRITE]), metadata=admin
    )
    key_id = created.api_key.api_key_id
    theirs = await env.compliance.ListApiKeys(pb.ListApiKeysRequest(), metadata=hostile)
    assert key_id not in {k.api_key_id for k in theirs.api_keys}
    for call in (
        env.compliance.RotateApiKey(pb.RotateApiKeyRequest(api_key_id=key_id), metadata=hostile),
        env.compliance.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=key_id), metadata=hostile),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await _track(env, created.secret) == grpc.StatusCode.OK

    # A key never carries `admin`, nor a scope its creator lacks.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compliance.CreateApiKey(
            pb.CreateApiKeyRequest(display_name="x", scopes=[Scope.ADMIN]), metadata=admin
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    keys_only = env.mesh.tokens.issue(
        "key-robot", env.tenant, frozenset({Scope.KEYS_MANAGE}), ttl_seconds=600
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compliance.CreateApiKey(
            pb.CreateApiKeyRequest(display_name="x", scopes=[Scope.COMPLIANCE_WRITE]),
            metadata=env.md(keys_only),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_list_pages(env: Env) -> None:
    admin = env.md(env.token(Role.ORGANIZER_ADMIN))
    for n in range(3):
        await env.compliance.CreateApiKey(
            pb.CreateApiKeyRequest(display_name=f"k{n}", scopes=[Scope.EVENTS_WRITE]),
            metadata=admin,
        )
    seen: list[str] = []
    token = ""
    while True:
        page = await env.compliance.ListApiKeys(
            pb.ListApiKeysRequest(page_size=2, page_token=token), metadata=admin
        )
        seen += [k.api_key_id for k in page.api_keys]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 4  # three new keys + the dev write key
