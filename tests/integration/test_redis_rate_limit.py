"""The ingestion rate limit shared through a real Redis (services/ingestion/rate_limit.py).

Needs BILTEN_TEST_REDIS_URL (`dev/redis.sh start`, then `eval "$(dev/redis.sh env)"`);
skips without it, like tests/infra/test_redis_server.py. Each test uses its own key
prefix or API key, so tests can share one Redis (and one database) with other runs.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from structlog.testing import capture_logs

from services.ingestion.rate_limit import RedisTokenBucketLimiter, TokenBucketLimiter
from services.mesh import Mesh
from services.platform.auth import WRITE_KEY_SCOPES, new_api_key
from services.platform.settings import PlatformSettings
from services.storage.metadata_store import ApiKeyRecord, Tenant
from tests.conftest import free_port, tracked_event

pytestmark = [pytest.mark.integration, pytest.mark.redis]


@pytest.fixture()
def redis_url() -> str:
    url = os.environ.get("BILTEN_TEST_REDIS_URL", "").strip()
    if not url:
        pytest.skip(
            "BILTEN_TEST_REDIS_URL is unset: start Redis with `dev/redis.sh start` and export "
            "BILTEN_TEST_REDIS_URL=redis://127.0.0.1:56379/0"
        )
    return url


@pytest.fixture()
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture()
def prefix() -> str:
    return f"bilten-test:rate-limit:{uuid.uuid4().hex}:"


@pytest.fixture()
async def limiters(
    redis_url: str, prefix: str, redis_client: redis.asyncio.Redis
) -> AsyncIterator[list[RedisTokenBucketLimiter]]:
    """Factory results collected for closing; keys under the test's prefix are deleted."""
    made: list[RedisTokenBucketLimiter] = []
    yield made
    for limiter in made:
        await limiter.aclose()
    keys = [key async for key in redis_client.scan_iter(match=prefix + "*")]
    if keys:
        await redis_client.delete(*keys)


# The product's Redis timeout (REDIS_TIMEOUT_SECONDS, 0.25 s) treats a slow answer as
# Redis being down; on a loaded test machine a first call (connect, SCRIPT LOAD) can take
# that long, and the limiter would answer from its in-process bucket instead.
TEST_REDIS_TIMEOUT_SECONDS = 5.0


def _replica(
    made: list[RedisTokenBucketLimiter], url: str, prefix: str, rate: float, burst: float
) -> RedisTokenBucketLimiter:
    # Each "replica" has its own client and connection pool, as separate pods would.
    limiter = RedisTokenBucketLimiter.from_url(
        url, rate, burst, key_prefix=prefix, timeout_seconds=TEST_REDIS_TIMEOUT_SECONDS
    )
    made.append(limiter)
    return limiter


async def test_two_replicas_share_one_budget_whatever_their_clocks(
    redis_url: str, prefix: str, limiters: list[RedisTokenBucketLimiter]
) -> None:
    # A slow refill (1 token per 10 s): a stall between the calls does not refill the
    # shared bucket.
    a = _replica(limiters, redis_url, prefix, rate=0.1, burst=10)
    b = _replica(limiters, redis_url, prefix, rate=0.1, burst=10)
    # Wildly different `now`s: the Redis limiter runs on Redis's clock, not the callers'.
    assert await a.acquire("key-1", 6, now=0.0) == 0
    assert await b.acquire("key-1", 4, now=9e11) == 0
    # 10 of 10 taken between them: each replica alone would still have tokens left.
    wait_a = await a.acquire("key-1", 1, now=0.0)
    wait_b = await b.acquire("key-1", 1, now=9e11)
    assert 0 < wait_a <= 10.0 and 0 < wait_b <= 10.0  # 1 token at 0.1/s, less the refill
    # Another key has its own bucket; neither replica fell back to its local one.
    assert await b.acquire("key-2", 10, now=0.0) == 0
    assert a.fallback_decisions == b.fallback_decisions == 0


async def test_the_bucket_refills_with_time(
    redis_url: str, prefix: str, limiters: list[RedisTokenBucketLimiter]
) -> None:
    slow = _replica(limiters, redis_url, prefix, rate=2.0, burst=10)
    assert await slow.acquire("k", 10, now=0) == 0
    empty_wait = await slow.acquire("k", 10, now=0)
    assert 4.0 < empty_wait <= 5.0  # 10 tokens at 2/s, from (almost) empty
    await asyncio.sleep(1.0)
    # At least 2 tokens came back (only more if the machine is slow), and a refused
    # call took none of them.
    partial_wait = await slow.acquire("k", 10, now=0)
    assert 0 < partial_wait <= 4.0

    fast = _replica(limiters, redis_url, prefix, rate=5.0, burst=10)
    assert await fast.acquire("f", 10, now=0) == 0
    wait = await fast.acquire("f", 10, now=0)
    assert 0 < wait <= 2.0
    await asyncio.sleep(wait + 0.05)
    assert await fast.acquire("f", 10, now=0) == 0  # waiting as told is enough


async def test_a_cost_above_the_burst_waits_for_a_full_bucket_and_takes_nothing(
    redis_url: str, prefix: str, limiters: list[RedisTokenBucketLimiter]
) -> None:
    limiter = _replica(limiters, redis_url, prefix, rate=4.0, burst=10)
    local = TokenBucketLimiter(4.0, 10)
    # The same answer as the in-process bucket: cost / rate (it can never pass at once).
    assert await limiter.acquire("k", 25, now=0) == local.try_take("k", 25, now=0) == 6.25
    assert await limiter.acquire("k", 10, now=0) == 0


async def test_keys_are_namespaced_and_expire_after_a_full_refill(
    redis_url: str,
    prefix: str,
    limiters: list[RedisTokenBucketLimiter],
    redis_client: redis.asyncio.Redis,
) -> None:
    limiter = _replica(limiters, redis_url, prefix, rate=2.0, burst=10)
    started = time.monotonic()
    await limiter.acquire("bak_key", 3, now=0)
    (key,) = [k async for k in redis_client.scan_iter(match=prefix + "*")]
    assert key == (prefix + "bak_key").encode()
    ttl_ms = await redis_client.pttl(key)
    elapsed_ms = (time.monotonic() - started) * 1000
    # burst / rate = 5 s to refill, plus a margin: expiring then loses nothing. The TTL
    # was set during the acquire, so at most the time since it has run off (+ rounding).
    assert 6_000 - elapsed_ms - 10 <= ttl_ms <= 6_000
    stored = await redis_client.hgetall(key)
    assert math.isclose(float(stored[b"tokens"]), 7.0, abs_tol=0.01)


async def test_redis_down_fails_open_to_the_local_bucket_and_retries_later() -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    clock = [1000.0]
    limiter = RedisTokenBucketLimiter.from_url(
        closed, 1.0, 5, retry_redis_after_seconds=30, monotonic=lambda: clock[0]
    )
    try:
        with capture_logs() as logs:
            assert await limiter.acquire("k", 5, now=100.0) == 0  # ingestion goes on
            # The in-process bucket still limits: 5 of 5 taken on this replica.
            assert await limiter.acquire("k", 1, now=100.0) == pytest.approx(1.0)
            clock[0] += 31  # past the pause: Redis is tried again (and fails again)
            assert await limiter.acquire("k", 1, now=101.0) == 0
        warnings = [e for e in logs if e["event"] == "rate_limit_redis_unavailable"]
        # One per attempt on Redis, none for the call that skipped it.
        assert len(warnings) == 2 and all(e["log_level"] == "warning" for e in warnings)
        assert "ConnectionError" in warnings[0]["error"]
        assert limiter.fallback_decisions == 3
    finally:
        await limiter.aclose()


# --- through the mesh: two ingestion "replicas" on one Redis -------------------------


async def _ingestion_replica(data_dir: Path, redis_url: str, key: ApiKeyRecord) -> Mesh:
    settings = PlatformSettings(
        data_dir=data_dir,
        grpc_port=0,
        metrics_port=0,
        create_dev_credentials=False,
        # Replicas share the keys (the chart's Secret) and Redis, nothing else.
        jwt_secret="j" * 40,
        api_key_pepper="p" * 40,
        ip_hash_key="i" * 40,
        # A slow refill (1 event per 10 s): a stall between calls does not refill it.
        rate_limit_events_per_second=0.1,
        rate_limit_burst_events=20,
        redis_url=redis_url,
    )
    mesh = Mesh.open(settings)
    if mesh.metadata.get_tenant(key.tenant_id) is None:
        mesh.metadata.create_tenant(Tenant(key.tenant_id, "Rate limit test", datetime.now(UTC)))
    mesh.metadata.add_api_key(key)
    await mesh.start(("ingestion",))
    return mesh


def _retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry
    raise AssertionError("no RetryInfo")


async def test_two_ingestion_replicas_enforce_one_combined_limit(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mesh builds its limiter with `from_url`'s default timeout (REDIS_TIMEOUT_SECONDS,
    # bound when the function was defined, so patching the constant would not reach it).
    from_url = RedisTokenBucketLimiter.from_url

    def patient_from_url(*args: Any, **kwargs: Any) -> RedisTokenBucketLimiter:
        kwargs.setdefault("timeout_seconds", TEST_REDIS_TIMEOUT_SECONDS)
        return from_url(*args, **kwargs)

    monkeypatch.setattr(RedisTokenBucketLimiter, "from_url", patient_from_url)
    key_id, write_key, secret_hash = new_api_key("p" * 40)
    record = ApiKeyRecord(key_id, "tenant_rl", secret_hash, WRITE_KEY_SCOPES, datetime.now(UTC))
    first = await _ingestion_replica(tmp_path / "a", redis_url, record)
    second = await _ingestion_replica(tmp_path / "b", redis_url, record)
    md = (("authorization", f"Bearer {write_key}"),)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel_b,
        ):
            a, b = pb_grpc.IngestionServiceStub(channel_a), pb_grpc.IngestionServiceStub(channel_b)
            batch = pb.IngestEventsRequest(events=[tracked_event() for _ in range(10)])
            # 20 events of a burst of 20, half through each replica.
            for stub in (a, b):
                response = await stub.IngestEvents(batch, metadata=md)
                assert all(r.status == pb.INGEST_STATUS_ACCEPTED for r in response.results)
            # Alone, each replica would still hold 10 tokens; together they hold none.
            for stub in (a, b):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.IngestEvents(
                        pb.IngestEventsRequest(events=[tracked_event() for _ in range(5)]),
                        metadata=md,
                    )
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                delay = _retry_info(caught.value).retry_delay.ToMilliseconds() / 1000
                assert 0 < delay <= 50.0  # 5 events at 0.1/s, less what has refilled
        assert first.event_store.count("tenant_rl") == 10
        assert second.event_store.count("tenant_rl") == 10
    finally:
        await first.stop()
        await second.stop()
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            await client.delete(f"bilten:ingestion:rate-limit:v1:{key_id}")


async def test_ingestion_goes_on_when_redis_is_down(tmp_path: Path) -> None:
    key_id, write_key, secret_hash = new_api_key("p" * 40)
    record = ApiKeyRecord(key_id, "tenant_rl", secret_hash, WRITE_KEY_SCOPES, datetime.now(UTC))
    mesh = await _ingestion_replica(tmp_path / "a", f"redis://127.0.0.1:{free_port()}/0", record)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
            stub = pb_grpc.IngestionServiceStub(channel)
            md = (("authorization", f"Bearer {write_key}"),)
            response = await stub.IngestEvents(
                pb.IngestEventsRequest(events=[tracked_event() for _ in range(20)]), metadata=md
            )
            assert all(r.status == pb.INGEST_STATUS_ACCEPTED for r in response.results)
            # The replica's own bucket limits in the meantime.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.IngestEvents(
                    pb.IngestEventsRequest(events=[tracked_event() for _ in range(5)]),
                    metadata=md,
                )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert mesh.event_store.count("tenant_rl") == 20
    finally:
        await mesh.stop()
