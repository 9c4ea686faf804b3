"""The generated Pinot schema / table config, and the SQL of the Pinot backend (no I/O:
statements are captured by a fake transport)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.pinot.backend import PinotMetrics, literal
from services.pinot.config import (
    CONFLUENT_AVRO_DECODER,
    CONSUMER_FACTORY,
    PinotTableSettings,
    pinot_schema,
    realtime_table_config,
)
from services.platform.errors import AnalyticsError
from services.query.metrics import Granularity, MetricFilters, Scope, TimeRange
from services.streaming.avro_envelope import FIELD_NAMES

pytestmark = pytest.mark.unit

SETTINGS = PinotTableSettings(
    table="tracked_events",
    topic="bilten.tracked-events.v1",
    kafka_bootstrap="kafka:9092",
    registry_url="http://registry:8081",
    registry_token="tok",
    retention_days=7,
    replicas=2,
    kafka_client_config={"security.protocol": "SASL_SSL"},
)


def test_schema_has_every_envelope_field_and_the_primary_key() -> None:
    schema = pinot_schema("tracked_events")
    columns = {
        spec["name"]: spec
        for kind in ("dimensionFieldSpecs", "metricFieldSpecs", "dateTimeFieldSpecs")
        for spec in schema[kind]
    }
    assert set(FIELD_NAMES) <= set(columns)
    assert schema["primaryKeyColumns"] == ["tenant_id", "event_id"]
    assert columns["occurred_at"]["format"] == "1:MICROSECONDS:EPOCH"
    assert {m["name"] for m in schema["metricFieldSpecs"]} == {
        "revenue_micros",
        "quantity",
        "no_actor",
    }
    assert columns["actor_key"]["dataType"] == "STRING"


def test_realtime_table_config_matches_the_issue() -> None:
    table = realtime_table_config(SETTINGS)
    stream = table["ingestionConfig"]["streamIngestionConfig"]["streamConfigMaps"][0]
    assert stream["stream.kafka.consumer.factory.class.name"] == CONSUMER_FACTORY
    assert CONSUMER_FACTORY.endswith("kafka30.KafkaConsumerFactory")
    assert stream["stream.kafka.decoder.class.name"] == CONFLUENT_AVRO_DECODER
    assert stream["stream.kafka.decoder.prop.schema.registry.rest.url"] == "http://registry:8081"
    # The keys Confluent's CachedSchemaRegistryClient reads (Pinot passes its props as is).
    assert stream["stream.kafka.decoder.prop.basic.auth.credentials.source"] == "USER_INFO"
    assert stream["stream.kafka.decoder.prop.basic.auth.user.info"] == "bilten:tok"
    assert stream["stream.kafka.isolation.level"] == "read_committed"
    assert stream["security.protocol"] == "SASL_SSL"
    assert table["dedupConfig"] == {"dedupEnabled": True, "hashFunction": "NONE"}
    assert table["routing"]["instanceSelectorType"] == "strictReplicaGroup"
    segments = table["segmentsConfig"]
    assert segments["timeColumnName"] == "occurred_at"
    assert (segments["retentionTimeUnit"], segments["retentionTimeValue"]) == ("DAYS", "7")
    assert segments["replicasPerPartition"] == "2"
    (star,) = table["tableIndexConfig"]["starTreeIndexConfigs"]
    assert star["dimensionsSplitOrder"][:3] == ["tenant_id", "occurred_day", "occurred_hour"]
    assert {"event_name", "event_type"} <= set(star["dimensionsSplitOrder"])
    assert "DISTINCT_COUNT_HLL__actor_key" in star["functionColumnPairs"]
    assert "COUNT__*" in star["functionColumnPairs"]
    transforms = " ".join(
        t["transformFunction"] for t in table["ingestionConfig"]["transformConfigs"]
    )
    assert "Groovy" not in transforms  # refused by Pinot controllers by default


class Capture:
    def __init__(self, rows: list[Sequence[Any]] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.rows = rows or []

    def __call__(self, sql: str, options: str) -> list[Sequence[Any]]:
        self.calls.append((sql, options))
        return self.rows


NOW = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)


def test_every_query_filters_the_tenant_and_sends_the_timeout() -> None:
    capture = Capture()
    backend = PinotMetrics("http://broker:8099", "tracked_events", 2500, execute=capture)
    window = TimeRange(NOW - timedelta(days=2), NOW)
    scope = Scope.tenant("o'brien")
    backend.event_counts(scope, window, Granularity.HOUR, MetricFilters(event_name="x'; DROP"))
    backend.active_users(scope, window, Granularity.DAY)
    backend.conversions(scope, window, Granularity.WEEK)
    backend.revenue(scope, window, Granularity.MONTH)
    backend.geography(scope, window)
    assert len(capture.calls) >= 9
    for sql, options in capture.calls:
        assert "tenant_id = 'o''brien'" in sql
        assert options == "timeoutMs=2500"
        assert "useMultistageEngine" not in options
    assert "event_name = 'x''; DROP'" in capture.calls[0][0]
    assert "DISTINCTCOUNTHLL(actor_key) - MAX(no_actor)" in capture.calls[1][0]


def test_aligned_ranges_filter_on_star_tree_dimensions() -> None:
    capture = Capture()
    backend = PinotMetrics("http://broker:8099", execute=capture)
    day = datetime(2026, 11, 20, tzinfo=UTC)
    backend.event_counts(
        Scope.tenant("t"), TimeRange(day, day + timedelta(days=7)), Granularity.DAY
    )
    backend.event_counts(
        Scope.tenant("t"),
        TimeRange(day + timedelta(hours=3), day + timedelta(hours=5)),
        Granularity.HOUR,
    )
    backend.event_counts(
        Scope.tenant("t"), TimeRange(NOW - timedelta(minutes=7), NOW), Granularity.MINUTE
    )
    daily, hourly, minutes = (sql for sql, _ in capture.calls)
    assert "occurred_day >= 20777 AND occurred_day < 20784" in daily
    assert "GROUP BY occurred_day, event_name, event_type" in daily
    assert "occurred_hour >= " in hourly and "occurred_at" not in hourly
    assert "occurred_at >= " in minutes and "DATETRUNC('MINUTE'" in minutes


def test_all_tenants_count_users_per_tenant_then_add() -> None:
    capture = Capture([(20784, "t1", 3.0), (20784, "t2", 4.0)])
    backend = PinotMetrics("http://broker:8099", execute=capture)
    day = datetime(2026, 11, 27, tzinfo=UTC)
    active = backend.active_users(
        Scope.all_tenants(), TimeRange(day, day + timedelta(days=1)), Granularity.DAY
    )
    assert "tenant_id =" not in capture.calls[0][0]
    assert "GROUP BY occurred_day, tenant_id" in capture.calls[0][0]
    assert active.buckets[0].active_users == 7


def test_funnels_use_funnel_max_step_and_only_joins_use_the_multistage_engine() -> None:
    capture = Capture([("t|u:a", 2), ("t|u:b", 1), ("t|u:c", 3), ("t|u:d", 3)])
    backend = PinotMetrics("http://broker:8099", execute=capture)
    window = TimeRange(NOW - timedelta(days=1), NOW)
    steps = backend.funnel(Scope.tenant("t"), window, ["view", "cart", "buy"], timedelta(hours=1))
    assert [(s.event_name, s.users) for s in steps] == [("view", 4), ("cart", 3), ("buy", 2)]
    sql, options = capture.calls[-1]
    assert "funnelMaxStep(occurred_at, 3600000000, 3, event_name = 'view'" in sql
    assert "useMultistageEngine" not in options
    capture.rows = []
    backend.cohort_retention(Scope.tenant("t"), window)
    sql, options = capture.calls[-1]
    assert " JOIN " in sql and options.endswith(";useMultistageEngine=true")


def test_literals_refuse_what_could_escape_them() -> None:
    assert literal("a'b") == "'a''b'"
    assert literal(42) == "42"
    with pytest.raises(ValueError):
        literal("a\x00b")
    with pytest.raises(TypeError):
        literal(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PinotMetrics("http://b:8099", "events; DROP TABLE x")


def test_pinot_errors_become_analytics_errors() -> None:
    def timeout(sql: str, options: str) -> list[Sequence[Any]]:
        raise RuntimeError("{'errorCode': 250, 'message': 'ExecutionTimeoutError'}")

    backend = PinotMetrics("http://broker:8099", execute=timeout)
    with pytest.raises(AnalyticsError) as caught:
        backend.geography(Scope.tenant("t"), TimeRange(NOW - timedelta(days=1), NOW))
    assert caught.value.reason == "QUERY_TIMEOUT"
