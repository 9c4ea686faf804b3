"""The shared alert bus over a real Redis: alerts raised in one process reach the
StreamAlerts subscribers of another, each tenant seeing only its own.

Needs BILTEN_TEST_REDIS_URL (`dev/redis.sh start`, then
`export BILTEN_TEST_REDIS_URL=redis://127.0.0.1:56379/0`); skipped when it is unset.
"""

from __future__ import annotations

import asyncio
import math
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from services.live.alerts import AlertsHub, LiveAlert, RedisAlertBus, WireAlert
from services.prediction.alerts import Alert
from services.prediction.anomaly import Severity

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


def alert(tenant_id: str, observed: float, upper: float = math.inf) -> Alert:
    return Alert(
        alert_id=uuid.uuid4().hex,
        tenant_id=tenant_id,
        metric_name="event_count",
        time=datetime(2026, 5, 31, 23, tzinfo=UTC),
        observed=observed,
        expected=10.0,
        expected_lower=5.0,
        expected_upper=upper,
        score=9.0,
        severity=Severity.CRITICAL,
        source="detector",
    )


@pytest.fixture()
async def processes(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[AlertsHub, RedisAlertBus, AlertsHub, RedisAlertBus]]:
    """Two "processes": each its own hub and bus instance, on one test channel."""
    # The product's 1 s (publish, connect; start() waits 5x that for the subscription)
    # is a latency budget, not something a loaded CI machine reliably meets.
    monkeypatch.setattr("services.live.alerts.REDIS_TIMEOUT_SECONDS", 10.0)
    channel = f"bilten-test:alerts:{uuid.uuid4().hex}"
    hub_a, hub_b = AlertsHub(), AlertsHub()
    bus_a = RedisAlertBus.from_url(redis_url, hub_a, channel=channel)
    bus_b = RedisAlertBus.from_url(redis_url, hub_b, channel=channel)
    await bus_a.start()
    await bus_b.start()
    # start() gives up waiting silently: make sure both listeners subscribed, and that
    # Redis registered it (SUBSCRIBE is sent without waiting for its reply), since
    # pub/sub does not deliver to a subscriber that is not there yet.
    assert bus_a.subscribed and bus_b.subscribed
    from redis.asyncio import Redis

    async with Redis.from_url(redis_url) as probe, asyncio.timeout(30):
        while (await probe.pubsub_numsub(channel))[0][1] < 2:  # noqa: ASYNC110 (Redis' state)
            await asyncio.sleep(0.05)
    yield hub_a, bus_a, hub_b, bus_b
    await bus_a.aclose()
    await bus_b.aclose()


async def next_alert(subscription: AsyncIterator[LiveAlert]) -> LiveAlert:
    return await asyncio.wait_for(subscription.__anext__(), 5)


async def test_alerts_cross_processes_and_stay_in_their_tenant(
    processes: tuple[AlertsHub, RedisAlertBus, AlertsHub, RedisAlertBus],
) -> None:
    hub_a, bus_a, hub_b, bus_b = processes
    acme_on_b = hub_b.subscribe("acme")
    globex_on_b = hub_b.subscribe("globex")
    everyone_on_a = hub_a.subscribe(None)  # a platform admin on the other process
    first = alert("acme", 500.0)
    second = alert("globex", 7.0, upper=6.0)
    await bus_a.publish(first)  # raised by process A (the prediction Deployment)
    await bus_b.publish(second)  # and one raised by process B
    got = await next_alert(acme_on_b)
    assert got.alert_id == first.alert_id and got.tenant_id == "acme"
    assert got.severity.value == "critical" and got.observed == 500.0
    assert got.expected_lower == 5.0 and got.expected_upper == math.inf
    assert "event_count = 500" in got.message
    assert (await next_alert(globex_on_b)).alert_id == second.alert_id
    seen = {(await next_alert(everyone_on_a)).alert_id for _ in range(2)}
    assert seen == {first.alert_id, second.alert_id}
    await asyncio.sleep(0.2)
    # Each alert once per hub, and never to another tenant's stream.
    acme_on_b.close()
    globex_on_b.close()
    assert [a.alert_id async for a in acme_on_b] == []
    assert [a.alert_id async for a in globex_on_b] == []
    assert hub_a.published == 2 and hub_b.published == 2
    assert bus_a.received == 2 and bus_b.received == 2


async def test_a_refused_publish_falls_back_to_the_local_hub() -> None:
    hub = AlertsHub()
    # Nothing listens on port 1: the publish fails fast and the local stream still gets it.
    bus = RedisAlertBus.from_url("redis://127.0.0.1:1/0", hub)
    subscription = hub.subscribe("acme")
    try:
        raised = alert("acme", 42.0)
        await bus.publish(raised)
        assert (await next_alert(subscription)).alert_id == raised.alert_id
    finally:
        await bus.aclose()


def test_the_wire_format_round_trips() -> None:
    original = WireAlert.of(alert("acme", 3.0, upper=2.0))
    assert WireAlert.from_json(original.to_json()) == original
