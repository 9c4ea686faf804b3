"""The Pinot schema and REALTIME table config of tracked events, generated from the Avro
envelope so the two can never drift apart.

Columns: every envelope field under its own name, typed from its Avro type (string →
STRING dimension, `timestamp-micros` long → LONG date-time in MICROSECONDS, long/int
metrics), plus columns Pinot derives at ingestion (`transformConfigs`, built-in scalar
functions):

- `actor_key`: `<tenant_id>|u:<user_id>`, else `<tenant_id>|a:<anonymous_id>`, else
  `<tenant_id>|t:<subject_token>` — who did it, tenant-scoped so distinct counts across
  tenants add up. With crypto-shredding the ids are sealed (empty in clear) and the
  pseudonymous `subject_token` (one per subject key, docs/compliance.md) stands in for
  them, so distinct-user counts stay the same, and stay right after an erasure;
- `no_actor`: 1 for events with no id and no token (they count as events, not as users:
  queries subtract `MAX(no_actor)` from the HLL count of `actor_key`);
- `order_key`: `order_id`, or the event id when there is none (such a conversion is an
  order of its own), so orders are one `DISTINCTCOUNT(order_key)`;
- `occurred_hour` / `occurred_day`: whole UTC hours / days since the epoch, dimensions of
  the star-tree so hourly and daily series are answered from pre-aggregates.

Table: dedup on the primary key (tenant_id, event_id) — it needs the topic keyed by that
key (services/streaming/topics.py) and `strictReplicaGroup` routing; the Kafka stream
through the `kafka30` consumer factory with `read_committed` and the Confluent Avro
decoder pointed at our registry; `occurred_at` as time column with the raw tier's
retention (`raw_retention_days`, 7 d); a star-tree on tenant, time and event dimensions
with COUNT, SUM of revenue and tickets and DISTINCT_COUNT_HLL of actors; the segments
sorted by tenant_id so a tenant's rows are contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from services.streaming.avro_envelope import ENVELOPE_SCHEMA

CONSUMER_FACTORY: Final = "org.apache.pinot.plugin.stream.kafka30.KafkaConsumerFactory"
CONFLUENT_AVRO_DECODER: Final = (
    "org.apache.pinot.plugin.inputformat.avro.confluent."
    "KafkaConfluentSchemaRegistryAvroMessageDecoder"
)
PRIMARY_KEY: Final = ("tenant_id", "event_id")
METRIC_FIELDS: Final = ("revenue_micros", "quantity")
HOUR_MICROS: Final = 3_600_000_000
DAY_MICROS: Final = 86_400_000_000

# Built-in scalar functions only: Groovy is refused by the controller by default (0.11
# already), and for good reason (arbitrary code). Pinot 0.11 has no CASE in ingestion
# transforms, so "user, else anonymous" is a regexpReplace of the empty case; `\\z` (end
# of input) rather than `$`, which would also match before a trailing newline; `$` and
# `\\` in the id are escaped because the replacement string treats them specially.
_ACTOR = (
    "regexpReplace(concat('u:', user_id, ''), '^u:\\z', "
    "concat('a:', replace(replace(anonymous_id, '\\', '\\\\'), '$', '\\$'), ''))"
)
# Neither id (sealed by crypto-shredding, or absent): the subject token, which is hex,
# so it needs no escaping as a replacement string.
_ACTOR_OR_TOKEN = f"regexpReplace({_ACTOR}, '^a:\\z', concat('t:', subject_token, ''))"
DERIVED_COLUMNS: Final[dict[str, tuple[str, str]]] = {
    # name: (Pinot data type, transform function)
    "actor_key": ("STRING", f"concat(tenant_id, {_ACTOR_OR_TOKEN}, '|')"),
    "no_actor": (
        "INT",
        "plus(1, times(-1, least(length("
        "concat(user_id, concat(anonymous_id, subject_token, ''), '')), 1)))",
    ),
    "order_key": (
        "STRING",
        "regexpReplace(concat('o:', order_id, ''), '^o:\\z', concat('e:', event_id, ''))",
    ),
    "occurred_hour": ("LONG", f"floor(divide(occurred_at, {HOUR_MICROS}))"),
    "occurred_day": ("LONG", f"floor(divide(occurred_at, {DAY_MICROS}))"),
}

STAR_TREE_DIMENSIONS: Final = (
    "tenant_id",
    "occurred_day",
    "occurred_hour",
    "event_type",
    "event_name",
    "currency",
    "country_code",
)
STAR_TREE_FUNCTIONS: Final = (
    "COUNT__*",
    "SUM__revenue_micros",
    "SUM__quantity",
    "MAX__no_actor",
    "DISTINCT_COUNT_HLL__actor_key",
)
# Per-event text that is never grouped on: raw (no dictionary) saves memory and time.
# The sealed PII (ciphertext, crypto-shredding) is never filtered or grouped on either.
NO_DICTIONARY: Final = (
    "event_id",
    "properties_json",
    "page_url",
    "page_title",
    "referrer",
    "pii_user_id",
    "pii_anonymous_id",
    "pii_ip_hash",
    "pii_user_agent",
    "pii_properties",
)


@dataclass(frozen=True)
class PinotTableSettings:
    table: str
    topic: str
    kafka_bootstrap: str
    registry_url: str
    registry_token: str = ""
    retention_days: int = 7
    replicas: int = 1
    kafka_client_config: Mapping[str, str] = field(default_factory=dict)
    query_timeout_ms: int = 10_000


def _pinot_type(avro_type: Any) -> str:
    if avro_type == "string":
        return "STRING"
    if avro_type == "int":
        return "INT"
    if avro_type == "long" or (isinstance(avro_type, dict) and avro_type.get("type") == "long"):
        return "LONG"
    raise ValueError(f"no Pinot type for Avro type {avro_type!r}")


def pinot_schema(table: str) -> dict[str, Any]:
    """The Pinot schema: envelope fields + derived columns, primary key (tenant_id, event_id)."""
    dimensions: list[dict[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    times: list[dict[str, Any]] = []
    for avro_field in ENVELOPE_SCHEMA["fields"]:
        name = avro_field["name"]
        avro_type = avro_field["type"]
        spec: dict[str, Any] = {"name": name, "dataType": _pinot_type(avro_type)}
        if isinstance(avro_type, dict) and avro_type.get("logicalType") == "timestamp-micros":
            spec.update(format="1:MICROSECONDS:EPOCH", granularity="1:MICROSECONDS")
            times.append(spec)
        elif name in METRIC_FIELDS:
            metrics.append(spec)
        else:
            if "default" in avro_field and spec["dataType"] == "STRING":
                spec["defaultNullValue"] = avro_field["default"]
            dimensions.append(spec)
    for name, (data_type, _) in DERIVED_COLUMNS.items():
        if name == "no_actor":
            metrics.append({"name": name, "dataType": data_type})
        else:
            dimensions.append({"name": name, "dataType": data_type})
    return {
        "schemaName": table,
        "primaryKeyColumns": list(PRIMARY_KEY),
        "dimensionFieldSpecs": dimensions,
        "metricFieldSpecs": metrics,
        "dateTimeFieldSpecs": times,
    }


def stream_config(settings: PinotTableSettings) -> dict[str, str]:
    config = {
        "streamType": "kafka",
        "stream.kafka.topic.name": settings.topic,
        "stream.kafka.broker.list": settings.kafka_bootstrap,
        # Pinot 0.11 wants "lowlevel" (partition-level consumers, needed for dedup);
        # later versions ignore it.
        "stream.kafka.consumer.type": "lowlevel",
        "stream.kafka.consumer.factory.class.name": CONSUMER_FACTORY,
        "stream.kafka.decoder.class.name": CONFLUENT_AVRO_DECODER,
        "stream.kafka.decoder.prop.schema.registry.rest.url": settings.registry_url,
        "stream.kafka.isolation.level": "read_committed",
        "stream.kafka.consumer.prop.auto.offset.reset": "smallest",
        # Segments commit at ~200 MB or 6 h, whichever first.
        "realtime.segment.flush.threshold.rows": "0",
        "realtime.segment.flush.threshold.segment.size": "200M",
        "realtime.segment.flush.threshold.time": "6h",
    }
    if settings.registry_token:
        # Pinot's decoder hands all its props to Confluent's `CachedSchemaRegistryClient`,
        # which reads HTTP basic auth from these two (SchemaRegistryClientConfig); our
        # registry takes a token as the password, whatever the user name.
        config["stream.kafka.decoder.prop.basic.auth.credentials.source"] = "USER_INFO"
        config["stream.kafka.decoder.prop.basic.auth.user.info"] = (
            f"bilten:{settings.registry_token}"
        )
    # Kafka client security (security.protocol, sasl.*) goes to Pinot's consumer as is.
    config.update(settings.kafka_client_config)
    return config


def realtime_table_config(settings: PinotTableSettings) -> dict[str, Any]:
    """The REALTIME table (`<table>_REALTIME`) for `pinot_schema(settings.table)`."""
    return {
        "tableName": settings.table,
        "tableType": "REALTIME",
        "segmentsConfig": {
            "schemaName": settings.table,
            "timeColumnName": "occurred_at",
            "replicasPerPartition": str(settings.replicas),
            "retentionTimeUnit": "DAYS",
            "retentionTimeValue": str(settings.retention_days),
        },
        "tenants": {},
        "tableIndexConfig": {
            "loadMode": "MMAP",
            "sortedColumn": ["tenant_id"],
            "invertedIndexColumns": ["event_name", "event_type", "ticketed_event_id"],
            "noDictionaryColumns": list(NO_DICTIONARY),
            "starTreeIndexConfigs": [
                {
                    "dimensionsSplitOrder": list(STAR_TREE_DIMENSIONS),
                    # Reads always filter one tenant (or group by it): no star node.
                    "skipStarNodeCreationForDimensions": ["tenant_id"],
                    "functionColumnPairs": list(STAR_TREE_FUNCTIONS),
                    "maxLeafRecords": 10_000,
                }
            ],
        },
        "routing": {"instanceSelectorType": "strictReplicaGroup"},
        "dedupConfig": {"dedupEnabled": True, "hashFunction": "NONE"},
        "ingestionConfig": {
            "streamIngestionConfig": {"streamConfigMaps": [stream_config(settings)]},
            "transformConfigs": [
                {"columnName": name, "transformFunction": transform}
                for name, (_, transform) in DERIVED_COLUMNS.items()
            ],
        },
        "query": {"timeoutMs": settings.query_timeout_ms},
        "metadata": {"customConfigs": {"generatedFrom": "bilten.analytics.events.v1.TrackedEvent"}},
    }
