"""End to end on a real Apache Pinot 0.11.0 with the documented shims (dev/pinot/shim:
the kafka30 factory alias and the minimal io.confluent registry client; see
docs/pinot-on-this-machine.md): tracked events → Kafka (our producer, Confluent-framed
Avro, schema in our registry) → Pinot REALTIME table (generated config, applied by our
command) → the query layer's Pinot backend, checked against the DuckDB backend fed from
the same topic by the stream processor.

What 0.11 cannot do is not faked: funnels (`funnelMaxStep`) and the multi-stage join of
cohort retention are run, and the test is an expected failure naming the version.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from services.pinot.apply import apply
from services.pinot.backend import PinotMetrics
from services.pinot.config import PinotTableSettings
from services.platform.errors import AnalyticsError
from services.query import metrics
from services.storage.event_store import DuckDBEventStore
from services.streaming.kafka_log import KafkaEventLog
from services.streaming.processor import ProcessorConfig, StreamProcessor
from services.streaming.schemas import EnvelopeSchemaId, WriterSchemas
from services.streaming.topics import build_layout
from tests.pinot.conftest import LABEL, PinotCluster
from tests.streaming.conftest import event

pytestmark = pytest.mark.pinot

TOTAL = 1200


def count(cluster: PinotCluster, table: str) -> int:
    body = httpx.post(
        f"{cluster.broker_url}/query/sql",
        json={"sql": f"SELECT COUNT(*) FROM {table}"},
        timeout=60,  # the first count of a new table can be slow on a loaded machine
    ).json()
    rows = body.get("resultTable", {}).get("rows")
    return int(rows[0][0]) if rows else -1


Loaded = tuple[PinotMetrics, DuckDBEventStore, datetime, PinotTableSettings]


@pytest.fixture(scope="module")
def loaded(pinot_cluster: PinotCluster, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    import asyncio

    cluster = pinot_cluster
    topic = f"e2e.pinot.{uuid.uuid4().hex[:8]}"
    table = f"tracked_events_{uuid.uuid4().hex[:8]}"
    layout = build_layout(topic, partitions=3)
    now = datetime.now(UTC).replace(microsecond=0)
    events = [event(i, tenant=("tenant_a", "tenant_b")[i % 3 == 0], now=now) for i in range(TOTAL)]

    async def produce() -> None:
        log = KafkaEventLog(
            bootstrap=cluster.kafka_bootstrap,
            layout=layout,
            schema_id=EnvelopeSchemaId(cluster.registry_url, cluster.registry_token, topic),
        )
        assert await log.start()
        for start in range(0, TOTAL, 300):
            await log.append(events[start : start + 300])
        # A client retry of already acknowledged events: Pinot's dedup must drop them.
        await log.append(events[:100])
        await log.close()

    asyncio.run(produce())
    table_settings = PinotTableSettings(
        table=table,
        topic=topic,
        kafka_bootstrap=cluster.kafka_bootstrap,
        registry_url=cluster.registry_url,
        registry_token=cluster.registry_token,
    )
    done = apply(cluster.controller_url, table_settings)
    assert done == {"schema": table, "table": "created"}
    deadline = time.monotonic() + 120
    while count(cluster, table) < TOTAL:
        assert time.monotonic() < deadline, f"Pinot has {count(cluster, table)} of {TOTAL}"
        time.sleep(0.5)
    time.sleep(3)  # duplicates, if dedup failed, would arrive now

    store = DuckDBEventStore(tmp_path_factory.mktemp("duckdb") / "events.duckdb")
    processor = StreamProcessor(
        ProcessorConfig(cluster.kafka_bootstrap, topic, layout.dead_letter.name, group_id="e2e"),
        store,
        WriterSchemas(cluster.registry_url, cluster.registry_token),
    )
    processor.start()
    deadline = time.monotonic() + 60
    while store.count("tenant_a") + store.count("tenant_b") < TOTAL:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    processor.stop()
    return PinotMetrics(cluster.broker_url, table), store, now, table_settings


def test_real_pinot_0_11_0_with_documented_shims_ingests_each_event_id_once(
    loaded: Loaded, pinot_cluster: PinotCluster
) -> None:
    pinot, store, _, _ = loaded
    assert count(pinot_cluster, pinot.table) == TOTAL  # 1300 records, 100 deduplicated
    assert store.count("tenant_a") + store.count("tenant_b") == TOTAL


@pytest.mark.parametrize("granularity", list(metrics.Granularity))
@pytest.mark.parametrize("scope", [metrics.Scope.tenant("tenant_a"), metrics.Scope.all_tenants()])
def test_pinot_backend_answers_as_the_duckdb_backend(
    loaded: Loaded,
    granularity: metrics.Granularity,
    scope: metrics.Scope,
) -> None:
    pinot, store, now, _ = loaded
    unaligned = metrics.TimeRange(now - timedelta(hours=2, minutes=7), now + timedelta(minutes=1))
    midnight = now.replace(hour=0, minute=0, second=0)
    aligned = metrics.TimeRange(midnight - timedelta(days=1), midnight + timedelta(days=1))
    for window in (unaligned, aligned):
        if granularity is metrics.Granularity.MINUTE and window is aligned:
            continue
        assert pinot.event_counts(scope, window, granularity) == metrics.event_counts(
            store, scope, window, granularity
        )
        assert pinot.revenue(scope, window, granularity) == metrics.revenue(
            store, scope, window, granularity
        )
        got = pinot.conversions(scope, window, granularity)
        want = metrics.conversions(store, scope, window, granularity)
        assert [(r.bucket_start, r.conversions) for r in got] == [
            (r.bucket_start, r.conversions) for r in want
        ]
        for g, w in zip(got, want, strict=True):
            # HyperLogLog (log2m=8): ~6.5 % standard error, so 3 sigma is ~20 % (and +-3
            # for the small buckets here); 10 % failed once, 33 for 37 in a minute bucket.
            assert abs(g.active_users - w.active_users) <= max(3, 0.2 * w.active_users)


def test_users_hll_estimates_and_exact_smart_hll(
    loaded: Loaded,
) -> None:
    pinot, store, now, _ = loaded
    window = metrics.TimeRange(now - timedelta(days=1), now + timedelta(minutes=1))
    for scope in (metrics.Scope.tenant("tenant_a"), metrics.Scope.all_tenants()):
        exact = metrics.active_users(store, scope, window, metrics.Granularity.DAY)
        estimate = pinot.active_users(scope, window, metrics.Granularity.DAY)
        assert abs(estimate.mau - exact.mau) <= max(3, 0.2 * exact.mau)
        smart = PinotMetrics(pinot._broker_url, pinot.table, distinct="DISTINCTCOUNTSMARTHLL")
        assert smart.active_users(scope, window, metrics.Granularity.DAY) == exact
        geo = smart.geography(scope, window)
        assert geo == metrics.geography(store, scope, window)


def test_funnel_and_cohort_queries_need_a_newer_pinot(
    loaded: Loaded,
) -> None:
    pinot, _, now, _ = loaded
    window = metrics.TimeRange(now - timedelta(days=1), now + timedelta(minutes=1))
    scope = metrics.Scope.tenant("tenant_a")
    try:
        pinot.funnel(scope, window, ["page_view", "ticket_purchased"], timedelta(hours=1))
        pinot.cohort_retention(scope, window)
    except AnalyticsError as exc:
        pytest.xfail(f"{LABEL}: {exc.message[:200]}")


def test_apply_is_idempotent(loaded: Loaded, pinot_cluster: PinotCluster) -> None:
    pinot, _, _, table_settings = loaded
    assert apply(pinot_cluster.controller_url, table_settings)["table"] == "updated"
    assert count(pinot_cluster, pinot.table) == TOTAL
