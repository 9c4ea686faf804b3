"""The live streams over real gRPC against the in-process mesh (real DuckDB, real edge).

Measures the delay from an event's acknowledgement to the subscriber's update, shows a
slow subscriber neither slows ingestion nor blocks the hub (its misses are counted),
and checks tenant scoping and the in-band shutdown message.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from bilten.analytics.aggregation.v1 import aggregation_service_pb2 as agg_pb
from bilten.analytics.aggregation.v1 import aggregation_service_pb2_grpc as agg_grpc
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import tracked_event_pb2 as te

from services.events.model import TrackedEvent, TrackedEventType
from services.live.alerts import AlertSeverity
from services.mesh import Mesh
from services.platform.auth import ORGANIZER_ADMIN_SCOPES
from services.platform.settings import PlatformSettings
from tests.conftest import free_port, tracked_event

pytestmark = pytest.mark.integration


def md(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


class Live:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.credentials = mesh.ensure_dev_credentials()
        self.tenant = self.credentials["tenant_id"]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}")
        self.ingest = pb_grpc.IngestionServiceStub(self.channel)
        self.agg = agg_grpc.AggregationServiceStub(self.channel)
        self.write = md(self.credentials["write_key"])
        self.read = md(self.credentials["admin_token"])


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    settings = PlatformSettings(
        data_dir=tmp_path / "data",
        grpc_port=0,
        metrics_port=0,
        schema_registry_port=free_port(),
        rollup_flush_seconds=0.2,
    )
    mesh = Mesh.open(settings)
    await mesh.start()
    running = Live(mesh)
    yield running
    await running.channel.close()
    await mesh.stop()


def purchase(
    session: str, tickets: int, cents: int, ticketed_event_id: str = ""
) -> te.TrackedEvent:
    event = tracked_event(
        "ticket_purchased",
        event_type=te.TRACKED_EVENT_TYPE_CONVERSION,
        user_id=f"buyer-{session}",
        quantity=tickets,
        revenue=("EUR", cents // 100, (cents % 100) * 10_000_000),
        ticketed_event_id=ticketed_event_id,
    )
    event.session_id = session
    event.occurred_at.GetCurrentTime()
    return event


async def test_update_reaches_the_subscriber_soon_after_the_ack(
    live: Live, record_property: pytest.RecordProperty
) -> None:
    stream = live.agg.StreamLiveMetrics(agg_pb.StreamLiveMetricsRequest(), metadata=live.read)
    first = await asyncio.wait_for(stream.read(), 5)
    assert first.tickets_sold_today == 0 and first.active_session_count == 0
    delays = []
    for round_ in range(1, 6):
        # Spread over the publishing interval so some acks land right after a pass.
        await asyncio.sleep(0.13 * round_)
        response = await live.ingest.TrackConversion(
            pb.TrackConversionRequest(event=purchase(f"s{round_}", 2, 1999)), metadata=live.write
        )
        acked = time.perf_counter()
        assert response.result.status == pb.INGEST_STATUS_ACCEPTED
        while True:
            update = await asyncio.wait_for(stream.read(), 5)
            if update.tickets_sold_today == 2 * round_:
                break
        delays.append(time.perf_counter() - acked)
        assert update.active_session_count == round_
        assert update.events_last_minute == round_
        (revenue,) = update.revenues_today
        assert (revenue.currency_code, revenue.units, revenue.nanos) == (
            "EUR",
            (1999 * round_) // 100,
            (1999 * round_) % 100 * 10_000_000,
        )
    stream.cancel()
    worst = max(delays)
    record_property("live_delay_max_s", round(worst, 4))
    record_property("live_delay_median_s", round(statistics.median(delays), 4))
    print(
        f"\nack -> subscriber delay: median {statistics.median(delays) * 1000:.1f} ms, "
        f"max {worst * 1000:.1f} ms over {len(delays)} events"
    )
    # The hub may hold an update up to its 0.5 s interval by design; the speed itself is
    # a benchmark (recorded above, docs/benchmarks-live.md). This bound only catches an
    # update that never comes or comes very late, not a loaded CI machine.
    assert worst <= 5.0


async def test_ticketed_event_stream_counts_views_visitors_and_sales(live: Live) -> None:
    stream = live.agg.StreamTicketedEventLiveMetrics(
        agg_pb.StreamTicketedEventLiveMetricsRequest(ticketed_event_id="concert-9"),
        metadata=live.read,
    )
    await asyncio.wait_for(stream.read(), 5)
    views = []
    for visitor in ("v1", "v2", "v2"):
        view = tracked_event(
            "page_view",
            event_type=te.TRACKED_EVENT_TYPE_PAGE_VIEW,
            user_id=visitor,
            ticketed_event_id="concert-9",
        )
        view.occurred_at.GetCurrentTime()
        views.append(view)
    other = purchase("x", 5, 5000, ticketed_event_id="concert-other")
    await live.ingest.IngestEvents(
        pb.IngestEventsRequest(events=[*views, purchase("v1", 3, 3000, "concert-9"), other]),
        metadata=live.write,
    )
    while True:
        update = await asyncio.wait_for(stream.read(), 5)
        if update.tickets_sold_today:
            break
    assert (update.views_today, update.active_visitor_count, update.tickets_sold_today) == (3, 3, 3)
    assert [(m.currency_code, m.units) for m in update.revenues_today] == [("EUR", 30)]
    stream.cancel()


async def test_tenants_see_their_own_numbers_and_platform_admins_all(live: Live) -> None:
    other_token = live.mesh.tokens.issue("bob", "tenant_other", ORGANIZER_ADMIN_SCOPES)
    mine = live.agg.StreamLiveMetrics(agg_pb.StreamLiveMetricsRequest(), metadata=live.read)
    everyone = live.agg.StreamLiveMetrics(
        agg_pb.StreamLiveMetricsRequest(),
        metadata=md(live.credentials["platform_admin_token"]),
    )
    for stream in (mine, everyone):
        await asyncio.wait_for(stream.read(), 5)
    await live.ingest.TrackConversion(
        pb.TrackConversionRequest(event=purchase("a", 1, 100)), metadata=live.write
    )
    await live.ingest.TrackConversion(
        pb.TrackConversionRequest(event=purchase("b", 4, 100)), metadata=md(other_token)
    )
    while (update := await asyncio.wait_for(everyone.read(), 5)).tickets_sold_today != 5:
        pass
    assert update.active_session_count == 2
    assert (await asyncio.wait_for(mine.read(), 5)).tickets_sold_today == 1
    # Another tenant's stream is refused before it starts: a plain status, no message.
    refused = live.agg.StreamLiveMetrics(
        agg_pb.StreamLiveMetricsRequest(tenant_id=live.tenant), metadata=md(other_token)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refused.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for stream in (mine, everyone):
        stream.cancel()


async def test_a_slow_subscriber_does_not_slow_ingestion_and_its_drops_are_counted(
    live: Live, record_property: pytest.RecordProperty
) -> None:
    hub = live.mesh.aggregation.live  # type: ignore[union-attr]

    async def ingest_rounds(rounds: int) -> list[float]:
        took = []
        for i in range(rounds):
            started = time.perf_counter()
            await live.ingest.IngestEvents(
                pb.IngestEventsRequest(events=[purchase(f"s{i}-{j}", 1, 100) for j in range(20)]),
                metadata=live.write,
            )
            took.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)  # spans several publishing passes
        return took

    def quartile(values: list[float]) -> float:
        # The lower quartile: robust to the load spikes of a shared 2-core machine.
        return statistics.quantiles(values, n=4)[0]

    before = await ingest_rounds(15)
    # 50 subscribers that never read, holding their updates in the hub's mailboxes.
    stalled = [hub.subscribe(live.tenant) for _ in range(50)]
    # One more on the same topic, read only at the end: every pass offers the same
    # snapshot to all of the topic's mailboxes at once, so when it gets the final
    # count, the stalled ones hold it too.
    watcher = hub.subscribe(live.tenant)
    published_before = hub.published_updates
    with_stalled = await ingest_rounds(15)
    # The pipeline's only contact with the hub is this call (the observer): an append
    # to the inbox and a wake-up, whatever the subscribers do.
    now = datetime.now(UTC)
    probe = [
        TrackedEvent(
            "probe", f"p{i}", TrackedEventType.PAGE_VIEW, "page_view", now, now, session_id="x"
        )
        for i in range(20)
    ]
    observe = []
    for _ in range(200):
        started = time.perf_counter()
        live.mesh.aggregation.observe_events(probe)  # type: ignore[union-attr]
        observe.append(time.perf_counter() - started)
    # A last pass after the last batch: wait for it (not for a fixed time).
    async with asyncio.timeout(30):
        while (await anext(watcher)).tickets_sold_today != 30 * 20:
            pass
    watcher.close()
    for subscription in stalled:
        # Both counts read together, before the read below yields to the loop (a pass
        # in between would add to one and not the other).
        dropped, published = subscription.dropped, hub.published_updates - published_before
        # Drop-to-latest: one state waits, and it is the newest.
        latest = await asyncio.wait_for(anext(subscription), 5)
        assert latest.tickets_sold_today == 30 * 20
        # Every update published to the topic since but the newest was dropped, and
        # counted; the pass count depends on timing, so it is measured, at least 2.
        assert dropped == published >= 2
        subscription.close()
    after = await ingest_rounds(15)
    alone, stalled_q = min(quartile(before), quartile(after)), quartile(with_stalled)
    record_property("ingest_q1_ms_alone", round(alone * 1000, 2))
    record_property("ingest_q1_ms_with_stalled", round(stalled_q * 1000, 2))
    record_property("observe_20_events_median_us", round(statistics.median(observe) * 1e6, 1))
    print(
        f"\nobserver call (20 events, the pipeline's only contact with the hub): median "
        f"{statistics.median(observe) * 1e6:.0f} us"
    )
    print(
        f"IngestEvents(20) lower quartile: {alone * 1000:.2f} ms alone, "
        f"{stalled_q * 1000:.2f} ms with 50 stalled subscribers; medians "
        f"{statistics.median(before) * 1000:.1f} / {statistics.median(with_stalled) * 1000:.1f}"
        f" / {statistics.median(after) * 1000:.1f} ms (before / with / after)"
    )
    # Generous bounds (15-sample windows on a loaded shared machine): they catch
    # ingestion waiting on the subscribers, not noise; the numbers are recorded above.
    assert stalled_q < alone * 5 + 0.05
    assert statistics.median(observe) < 0.01


async def test_alerts_stream_scopes_by_tenant_and_ends_in_band_on_shutdown(
    tmp_path: Path,
) -> None:
    settings = PlatformSettings(
        data_dir=tmp_path / "data",
        grpc_port=0,
        metrics_port=0,
        schema_registry_port=free_port(),
        live_alert_rules=[
            {"rule_id": "busy", "tenant_id": "t-rules", "metric": "tickets_sold_today", "upper": 3}
        ],
    )
    mesh = Mesh.open(settings)
    await mesh.start()
    try:
        token = mesh.tokens.issue("ann", "t-rules", ORGANIZER_ADMIN_SCOPES)
        other = mesh.tokens.issue("bob", "t-quiet", ORGANIZER_ADMIN_SCOPES)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
            agg = agg_grpc.AggregationServiceStub(channel)
            ingest = pb_grpc.IngestionServiceStub(channel)
            mine = agg.StreamAlerts(agg_pb.StreamAlertsRequest(), metadata=md(token))
            theirs = agg.StreamAlerts(agg_pb.StreamAlertsRequest(), metadata=md(other))
            # The hub keeps nothing for late subscribers and the rule fires once: the
            # conversion must come after the server subscribed both streams.
            hub = mesh.aggregation.alerts  # type: ignore[union-attr]
            async with asyncio.timeout(30):
                while hub.subscriber_count < 2:  # noqa: ASYNC110 (the server's, no event)
                    await asyncio.sleep(0.05)
            await ingest.TrackConversion(
                pb.TrackConversionRequest(event=purchase("s", 5, 500)), metadata=md(token)
            )
            got = await asyncio.wait_for(mine.read(), 5)
            assert got.alert.metric_name == "tickets_sold_today"
            assert got.alert.severity == agg_pb.ALERT_SEVERITY_WARNING
            assert got.alert.observed_value == 5 and got.alert.expected_upper == 3
            assert "threshold rule busy" in got.alert.message
            # An anomaly from the prediction service's monitor, through the same sink.
            from services.prediction.alerts import Alert
            from services.prediction.anomaly import Severity

            await mesh.aggregation.alerts.publish(  # type: ignore[union-attr]
                Alert(
                    "a1",
                    "t-rules",
                    "event_count",
                    got.alert.raise_time.ToDatetime(),
                    900.0,
                    100.0,
                    50.0,
                    150.0,
                    9.1,
                    Severity.CRITICAL,
                    "detector",
                )
            )
            anomaly = await asyncio.wait_for(mine.read(), 5)
            assert anomaly.alert.severity == agg_pb.ALERT_SEVERITY_CRITICAL
            assert anomaly.alert.message.startswith("detector: event_count = 900")
            live_stream = agg.StreamLiveMetrics(
                agg_pb.StreamLiveMetricsRequest(), metadata=md(token)
            )
            await asyncio.wait_for(live_stream.read(), 5)
            await mesh.aggregation.end_streams()  # type: ignore[union-attr]
            last = await asyncio.wait_for(live_stream.read(), 5)
            assert "shutting down" in last.error_message
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await live_stream.read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            # The other tenant saw nothing but the shutdown message.
            quiet = await asyncio.wait_for(theirs.read(), 5)
            assert quiet.error_message and not quiet.HasField("alert")
    finally:
        await mesh.stop()
    assert AlertSeverity.CRITICAL.value == "critical"


async def test_clients_hanging_up_on_streams_leave_the_server_up_and_an_audit_entry(
    live: Live,
) -> None:
    """Regression: the edge used to read `context.peer()` / `cancelled()` in the stream's
    `finally`, after grpc.aio had freed the cancelled call, and the process died with
    SIGSEGV (seen on the aggregation service of the production smoke install). Many
    hang-ups at different moments, then the server must still answer."""
    for round_ in range(40):
        stream = live.agg.StreamLiveMetrics(agg_pb.StreamLiveMetricsRequest(), metadata=live.read)
        if round_ % 2:
            await asyncio.wait_for(stream.read(), 5)  # hang up mid-stream ...
        stream.cancel()  # ... or before the first message
        await asyncio.sleep(0.01 * (round_ % 4))
    await asyncio.sleep(0.5)  # the server side's `finally` blocks run
    first = await asyncio.wait_for(
        live.agg.StreamLiveMetrics(agg_pb.StreamLiveMetricsRequest(), metadata=live.read).read(),
        5,
    )
    assert first.tickets_sold_today == 0
    entries, _ = live.mesh.metadata.list_audit(live.tenant, 200, "")
    streams = [e for e in entries if e.action.endswith("/StreamLiveMetrics")]
    assert streams and {e.outcome for e in streams} <= {"CANCELLED", "OK"}
    assert any(e.outcome == "CANCELLED" for e in streams)
    assert all(e.peer.startswith("ipv4:127.0.0.1:") for e in streams), streams[0].peer
