"""API key revocations reach every process over real Redis pub/sub
(services/platform/key_revocations.py).

Three "pods" share one metadata store (as the cluster's pods share PostgreSQL), each with
its own authenticator and its 30 s cache of verified keys. Pod A revokes or rotates;
pod B listens on the bus; pod C has no bus and shows what the bus is for: its cache
still accepts the revoked key.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from services.compliance.api_keys import ApiKeyManager
from services.platform.auth import WRITE_KEY_SCOPES, Authenticator, TokenIssuer
from services.platform.errors import CredentialError
from services.platform.key_revocations import RedisKeyRevocations
from services.storage.metadata_store import SQLiteMetadataStore, Tenant

pytestmark = pytest.mark.integration

PEPPER = "pepper-0123456789abcdef0123456789"


@pytest.fixture()
def redis_url() -> str:
    url = os.environ.get("BILTEN_TEST_REDIS_URL", "").strip()
    if not url:
        if os.environ.get("BILTEN_REQUIRE_SERVICES") == "1":
            pytest.fail("BILTEN_TEST_REDIS_URL is unset and BILTEN_REQUIRE_SERVICES=1")
        pytest.skip("BILTEN_TEST_REDIS_URL is unset: start Redis with `dev/redis.sh start`")
    return url


@dataclass
class Pods:
    store: SQLiteMetadataStore
    a: Authenticator
    b: Authenticator
    c: Authenticator
    bus_a: RedisKeyRevocations
    bus_b: RedisKeyRevocations
    manager: ApiKeyManager  # pod A's: it drops A's cache and announces


def _store(tmp_path: Path) -> SQLiteMetadataStore:
    store = SQLiteMetadataStore(tmp_path / "metadata.sqlite3")
    store.create_tenant(Tenant("t1", "Tenant one", datetime.now(UTC)))
    return store


@pytest.fixture()
async def pods(tmp_path: Path, redis_url: str) -> AsyncIterator[Pods]:
    store = _store(tmp_path)
    tokens = TokenIssuer("k" * 40, "iss", "aud")
    a, b, c = (Authenticator(tokens, store, PEPPER) for _ in range(3))
    channel = f"bilten-test:api-keys:{uuid.uuid4().hex}"
    bus_a = RedisKeyRevocations.from_url(redis_url, a.forget_api_key, channel=channel)
    bus_b = RedisKeyRevocations.from_url(redis_url, b.forget_api_key, channel=channel)
    await bus_a.start()
    await bus_b.start()
    # Pub/sub delivers only to subscriptions Redis has registered.
    probe = redis.Redis.from_url(redis_url, socket_timeout=5)
    await _until(lambda: probe.pubsub_numsub(channel)[0][1] >= 2, seconds=30)
    probe.close()

    def forget_and_announce(key_id: str) -> None:
        a.forget_api_key(key_id)
        bus_a.announce(key_id)

    yield Pods(store, a, b, c, bus_a, bus_b, ApiKeyManager(store, PEPPER, forget_and_announce))
    await bus_a.aclose()
    await bus_b.aclose()
    store.close()


async def _until(predicate: Callable[[], bool], seconds: float = 10) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < seconds, "not within the deadline"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def _refused(auth: Authenticator, secret: str) -> bool:
    try:
        auth.authenticate(secret)
    except CredentialError:
        return True
    return False


async def test_a_revocation_reaches_another_pods_cache_at_once(pods: Pods) -> None:
    issued = pods.manager.create("t1", "web", sorted(WRITE_KEY_SCOPES), WRITE_KEY_SCOPES)
    for auth in (pods.a, pods.b, pods.c):
        assert auth.authenticate(issued.secret).tenant_id == "t1"  # now cached everywhere
    pods.manager.revoke("t1", issued.record.key_id)
    assert _refused(pods.a, issued.secret)  # the revoking pod: at once, as before
    took = await _until(lambda: _refused(pods.b, issued.secret))
    assert took < 10 and pods.bus_b.received >= 1
    # Without the bus a pod's cache hides the revocation until it expires (30 s).
    assert not _refused(pods.c, issued.secret)


async def test_a_rotation_ends_the_old_secret_on_another_pod_after_its_grace(
    pods: Pods,
) -> None:
    issued = pods.manager.create("t1", "sdk", sorted(WRITE_KEY_SCOPES), WRITE_KEY_SCOPES)
    assert pods.b.authenticate(issued.secret).tenant_id == "t1"
    # The smallest grace the API takes is 1 s (0 means the default).
    rotated = pods.manager.rotate("t1", issued.record.key_id, grace_seconds=1)
    await _until(lambda: pods.bus_b.received >= 1)
    assert pods.b.authenticate(rotated.secret).tenant_id == "t1"
    # Pod B re-read the key: the old secret ends with its grace, not with B's cache.
    await _until(lambda: _refused(pods.b, issued.secret), seconds=20)
    assert not _refused(pods.b, rotated.secret)


async def test_hostile_or_oversized_messages_are_ignored(pods: Pods, redis_url: str) -> None:
    issued = pods.manager.create("t1", "web", sorted(WRITE_KEY_SCOPES), WRITE_KEY_SCOPES)
    assert pods.b.authenticate(issued.secret).tenant_id == "t1"
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    client.publish(pods.bus_b.channel, b"x" * 10_000)  # ignored, logged
    client.publish(pods.bus_b.channel, b"")
    client.close()
    # The listener is still alive and serves the next real announcement.
    pods.manager.revoke("t1", issued.record.key_id)
    await _until(lambda: _refused(pods.b, issued.secret))
    assert pods.bus_b.received == 1


def test_redis_down_never_fails_the_revocation(tmp_path: Path) -> None:
    store = _store(tmp_path)
    tokens = TokenIssuer("k" * 40, "iss", "aud")
    auth = Authenticator(tokens, store, PEPPER)
    bus = RedisKeyRevocations.from_url("redis://127.0.0.1:1/0", auth.forget_api_key)

    def forget_and_announce(key_id: str) -> None:
        auth.forget_api_key(key_id)
        bus.announce(key_id)

    manager = ApiKeyManager(store, PEPPER, forget_and_announce)
    issued = manager.create("t1", "web", sorted(WRITE_KEY_SCOPES), WRITE_KEY_SCOPES)
    assert auth.authenticate(issued.secret).tenant_id == "t1"
    record = manager.revoke("t1", issued.record.key_id)  # does not raise
    assert record.revoked_at is not None
    assert bus.failed_announcements == 1
    assert _refused(auth, issued.secret)  # this process: at once all the same
    store.close()


async def test_the_mesh_announces_its_revocations_and_honours_others(
    tmp_path: Path, redis_url: str
) -> None:
    """The wiring: a mesh with `redis_url` announces what its compliance service revokes
    (the hook its ApiKeyManager gets) and drops keys another pod announces."""
    from services.mesh import Mesh
    from services.platform.key_revocations import CHANNEL
    from services.platform.settings import PlatformSettings

    mesh = Mesh.open(
        PlatformSettings(
            data_dir=tmp_path / "mesh",
            grpc_port=0,
            metrics_port=0,
            create_dev_credentials=False,
            jwt_secret="j" * 40,
            api_key_pepper=PEPPER,
            ip_hash_key="i" * 40,
            redis_url=redis_url,
        )
    )
    announced: list[str] = []
    other = RedisKeyRevocations.from_url(redis_url, announced.append)  # another pod
    await other.start()
    await mesh.start(("compliance", "ingestion"))
    try:
        assert mesh.key_revocations is not None
        mesh.metadata.create_tenant(Tenant("t1", "Tenant one", datetime.now(UTC)))
        manager = ApiKeyManager(mesh.metadata, PEPPER, mesh._forget_api_key)
        first = manager.create("t1", "a", sorted(WRITE_KEY_SCOPES), WRITE_KEY_SCOPES)
        manager.revoke("t1", first.record.key_id)
        await _until(lambda: first.record.key_id in announced)
        # Another pod revokes (in the shared store) and announces: the mesh forgets.
        second = manager.create("t1", "b", sorted(WRITE_KEY_SCOPES), WRITE_KEY_SCOPES)
        assert mesh.authenticator.authenticate(second.secret).tenant_id == "t1"  # cached
        assert ApiKeyManager(mesh.metadata, PEPPER).revoke("t1", second.record.key_id)
        assert not _refused(mesh.authenticator, second.secret)  # the cache still says yes
        other.announce(second.record.key_id)
        await _until(lambda: _refused(mesh.authenticator, second.secret))
        assert other.channel == CHANNEL
    finally:
        await other.aclose()
        await mesh.stop()
