"""The throwaway Redis of dev/redis.sh answers and stores.

Needs BILTEN_TEST_REDIS_URL (e.g. `dev/redis.sh start` then
`export BILTEN_TEST_REDIS_URL=redis://127.0.0.1:56379/0`) and the `redis` Python package;
skips without either.
"""

from __future__ import annotations

import os
import uuid

import pytest

pytestmark = pytest.mark.redis


@pytest.fixture()
def redis_client():  # type: ignore[no-untyped-def]
    url = os.environ.get("BILTEN_TEST_REDIS_URL", "").strip()
    if not url:
        pytest.skip(
            "BILTEN_TEST_REDIS_URL is unset: start Redis with `dev/redis.sh start` and export "
            "BILTEN_TEST_REDIS_URL=redis://127.0.0.1:56379/0"
        )
    redis = pytest.importorskip("redis", reason="the `redis` Python package is not installed")
    client = redis.Redis.from_url(url, socket_timeout=5)
    yield client
    client.close()


def test_ping_set_get_expire(redis_client) -> None:  # type: ignore[no-untyped-def]
    assert redis_client.ping() is True
    key = f"infra-test:{uuid.uuid4().hex}"
    try:
        assert redis_client.set(key, b"value", ex=60)
        assert redis_client.get(key) == b"value"
        assert 0 < redis_client.ttl(key) <= 60
        assert redis_client.incr(f"{key}:n", 5) == 5
    finally:
        redis_client.delete(key, f"{key}:n")
    assert redis_client.get(key) is None
