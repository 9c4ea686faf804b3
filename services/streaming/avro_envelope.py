"""The Avro envelope of a tracked event on Kafka, and its Confluent wire format.

One Avro record per `TrackedEvent`, flat (enrichment fields at the top level) so that
Pinot's Confluent Avro decoder maps every field to a column without a flattening step.
Choices that keep the three readers (our processor, Pinot, any Confluent consumer) exact:

- times are `long` with logical type `timestamp-micros`: microseconds since the epoch,
  UTC, the precision of the model and of the DuckDB store;
- money is `revenue_micros`, a `long` holding revenue x 10^6 in `currency`. It is exact
  for every value the store's `DECIMAL(18,6)` holds, sums as a plain Pinot LONG metric
  and needs no decimal logical type (which Pinot 0.11 reads as raw bytes);
- `event_type` and `source` are strings, not Avro enums: adding a value later is then a
  compatible change for old readers (an enum needs a reader default for that);
- every field except the identity and time fields has a default, so later versions can
  drop or add fields under BACKWARD compatibility;
- v2 added `pii_key_ids`, `subject_token` and the `pii_*` fields (all with defaults) for
  crypto-shredding: `to_record` / `from_record` leave them empty / ignore them, the Kafka
  log fills them and the processor opens them (services/streaming/pii.py).

The wire format (Confluent): byte 0 = 0x00, bytes 1-4 = the registry's schema id
(big-endian), then the Avro binary body. The schema is registered under the topic's value
subject (`TopicNameStrategy`: `<topic>-value`) with `register_envelope_schema`.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import fastavro

from services.events.model import Enrichment, EventSource, TrackedEvent, TrackedEventType
from services.streaming.topics import DEFAULT_EVENTS_TOPIC

ENVELOPE_NAMESPACE: Final = "bilten.analytics.events.v1"
ENVELOPE_NAME: Final = "TrackedEvent"
ENVELOPE_FULL_NAME: Final = f"{ENVELOPE_NAMESPACE}.{ENVELOPE_NAME}"

MAGIC_BYTE: Final = 0
HEADER: Final = struct.Struct(">bI")  # magic byte, schema id
HEADER_SIZE: Final = HEADER.size

# revenue is stored as DECIMAL(18,6): scale 6, and |value| < 10^12 units.
REVENUE_SCALE: Final = 6
MAX_REVENUE_MICROS: Final = 10**18 - 1

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final = timedelta(microseconds=1)

_TIMESTAMP: Final = {"type": "long", "logicalType": "timestamp-micros"}


def _text(name: str, doc: str, default: str | None = "") -> dict[str, Any]:
    field: dict[str, Any] = {"name": name, "type": "string", "doc": doc}
    if default is not None:
        field["default"] = default
    return field


ENVELOPE_SCHEMA: Final[dict[str, Any]] = {
    "type": "record",
    "name": ENVELOPE_NAME,
    "namespace": ENVELOPE_NAMESPACE,
    "doc": "One accepted tracked event (a page view, a purchase), after validation and "
    "enrichment. Keyed on Kafka by tenant_id and event_id.",
    "fields": [
        _text("tenant_id", "Organizer the event belongs to (from the credential).", None),
        _text("event_id", "Client-supplied or server-generated id; the dedup key.", None),
        _text("event_type", "track | page_view | click | conversion | custom.", None),
        _text("event_name", "Business name, e.g. ticket_viewed.", None),
        {"name": "occurred_at", "type": _TIMESTAMP, "doc": "When it happened, UTC micros."},
        {"name": "received_at", "type": _TIMESTAMP, "doc": "When ingestion accepted it."},
        _text("source", "web | mobile | server | api.", "api"),
        _text("session_id", "Client session id; empty when unknown."),
        _text("user_id", "Known user id; empty for anonymous visitors."),
        _text("anonymous_id", "Device or cookie id; empty when unknown."),
        _text("page_url", "Page URL of page views."),
        _text("page_title", "Page title of page views."),
        _text("referrer", "Referring URL."),
        _text("ticketed_event_id", "The concert / ticketed event the record is about."),
        _text("campaign_id", "Marketing campaign id."),
        _text("order_id", "Order id of conversions."),
        {
            "name": "revenue_micros",
            "type": "long",
            "default": 0,
            "doc": "Revenue x 10^6 in `currency` (exact; 0 when the event carries no money).",
        },
        _text("currency", "ISO 4217 code of the revenue; empty when there is none."),
        {"name": "quantity", "type": "int", "default": 0, "doc": "Tickets in a conversion."},
        _text("properties_json", "Custom properties as a JSON object text.", "{}"),
        {
            "name": "schema_id",
            "type": "int",
            "default": 0,
            "doc": "Registry id of the event definition the properties were checked against.",
        },
        _text("ip_hash", "Keyed hash of the client IP (the raw IP is never kept)."),
        _text("country_code", "ISO 3166-1 alpha-2 from the IP; empty when unknown."),
        _text("browser_family", "From the user agent."),
        _text("browser_version", "Major version only."),
        _text("os_family", "From the user agent."),
        _text("device_type", "desktop | mobile | tablet | bot | other."),
        # --- v2: crypto-shredding (docs/compliance.md). Added with defaults, so the
        # evolution is BACKWARD compatible; with crypto-shredding on, the clear fields
        # user_id, anonymous_id, ip_hash and the four user agent fields are empty and
        # their values travel sealed below (services/compliance/pii_cipher.py).
        _text("pii_key_ids", "Key ids (comma-separated) the pii_* fields are sealed with."),
        _text(
            "subject_token",
            "Pseudonymous actor token (from the actor's key): distinct counts without ids.",
        ),
        _text("pii_user_id", "Sealed user_id (base64 AES-GCM)."),
        _text("pii_anonymous_id", "Sealed anonymous_id."),
        _text("pii_ip_hash", "Sealed ip_hash."),
        _text("pii_user_agent", "Sealed JSON list of the four user agent fields."),
        _text("pii_properties", "Sealed JSON object of the properties marked personal."),
    ],
}

# The schema text registered in the registry (and read by Pinot's decoder).
ENVELOPE_SCHEMA_JSON: Final = json.dumps(ENVELOPE_SCHEMA, separators=(",", ":"))
PARSED_ENVELOPE_SCHEMA: Final = fastavro.parse_schema(ENVELOPE_SCHEMA)
FIELD_NAMES: Final = tuple(f["name"] for f in ENVELOPE_SCHEMA["fields"])
# Envelope fields with no column in the event store (the sealed PII and its token).
SEALED_FIELD_NAMES: Final = (
    "pii_key_ids",
    "subject_token",
    "pii_user_id",
    "pii_anonymous_id",
    "pii_ip_hash",
    "pii_user_agent",
    "pii_properties",
)
STRING_FIELDS: Final = tuple(f["name"] for f in ENVELOPE_SCHEMA["fields"] if f["type"] == "string")


class EnvelopeError(ValueError):
    """A payload that is not a Confluent-framed Avro envelope, or a record that is not
    a valid tracked event."""


def subject_for(topic: str = DEFAULT_EVENTS_TOPIC) -> str:
    """The value subject of `topic` under Confluent's TopicNameStrategy."""
    return f"{topic}-value"


def micros(moment: datetime) -> int:
    """Exact microseconds since the epoch of an aware datetime."""
    if moment.utcoffset() is None:
        raise EnvelopeError(f"times must be timezone-aware, got {moment!r}")
    return (moment - _EPOCH) // _MICRO


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def revenue_micros(amount: Decimal) -> int:
    """revenue x 10^6 as an int; refuses what the store's DECIMAL(18,6) cannot hold
    rather than rounding money."""
    scaled = amount.scaleb(REVENUE_SCALE)
    if scaled != scaled.to_integral_value():
        raise EnvelopeError(f"revenue {amount} has more than {REVENUE_SCALE} decimal places")
    value = int(scaled)
    if abs(value) > MAX_REVENUE_MICROS:
        raise EnvelopeError(f"revenue {amount} is out of range")
    return value


def to_record(event: TrackedEvent) -> dict[str, Any]:
    """The Avro record of an event (field names as in `ENVELOPE_SCHEMA`)."""
    enrichment = event.enrichment
    return {
        "tenant_id": event.tenant_id,
        "event_id": event.event_id,
        "event_type": event.event_type.value,
        "event_name": event.event_name,
        "occurred_at": micros(event.occurred_at),
        "received_at": micros(event.received_at),
        "source": event.source.value,
        "session_id": event.session_id,
        "user_id": event.user_id,
        "anonymous_id": event.anonymous_id,
        "page_url": event.page_url,
        "page_title": event.page_title,
        "referrer": event.referrer,
        "ticketed_event_id": event.ticketed_event_id,
        "campaign_id": event.campaign_id,
        "order_id": event.order_id,
        "revenue_micros": revenue_micros(event.revenue),
        "currency": event.currency,
        "quantity": event.quantity,
        "properties_json": event.properties_json,
        "schema_id": event.schema_id,
        "ip_hash": enrichment.ip_hash,
        "country_code": enrichment.country_code,
        "browser_family": enrichment.browser_family,
        "browser_version": enrichment.browser_version,
        "os_family": enrichment.os_family,
        "device_type": enrichment.device_type,
        **dict.fromkeys(SEALED_FIELD_NAMES, ""),
    }


def _time(value: object) -> datetime:
    # fastavro applies the timestamp-micros logical type on read (datetime), a writer
    # that declared a plain long gives an int; accept both.
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if isinstance(value, int):
        return from_micros(value)
    raise EnvelopeError(f"not a timestamp: {value!r}")


def from_record(record: Mapping[str, Any]) -> TrackedEvent:
    """The event of a decoded record (already resolved to `ENVELOPE_SCHEMA`).

    Raises `EnvelopeError` for values the model does not allow (an unknown event type,
    an empty id), so a consumer can dead-letter the record with the reason.
    """
    try:
        event_type = TrackedEventType(record["event_type"])
    except ValueError as exc:
        raise EnvelopeError(f"unknown event_type {record['event_type']!r}") from exc
    try:
        source = EventSource(record["source"])
    except ValueError as exc:
        raise EnvelopeError(f"unknown source {record['source']!r}") from exc
    if not record["tenant_id"] or not record["event_id"]:
        raise EnvelopeError("tenant_id and event_id must not be empty")
    return TrackedEvent(
        tenant_id=record["tenant_id"],
        event_id=record["event_id"],
        event_type=event_type,
        event_name=record["event_name"],
        occurred_at=_time(record["occurred_at"]),
        received_at=_time(record["received_at"]),
        source=source,
        session_id=record["session_id"],
        user_id=record["user_id"],
        anonymous_id=record["anonymous_id"],
        page_url=record["page_url"],
        page_title=record["page_title"],
        referrer=record["referrer"],
        ticketed_event_id=record["ticketed_event_id"],
        campaign_id=record["campaign_id"],
        order_id=record["order_id"],
        revenue=Decimal(record["revenue_micros"]).scaleb(-REVENUE_SCALE),
        currency=record["currency"],
        quantity=record["quantity"],
        properties_json=record["properties_json"],
        schema_id=record["schema_id"],
        enrichment=Enrichment(
            ip_hash=record["ip_hash"],
            country_code=record["country_code"],
            browser_family=record["browser_family"],
            browser_version=record["browser_version"],
            os_family=record["os_family"],
            device_type=record["device_type"],
        ),
    )


# --- wire format ---------------------------------------------------------------------


def frame(schema_id: int, body: bytes) -> bytes:
    """Confluent framing of an Avro body written with schema `schema_id`."""
    return HEADER.pack(MAGIC_BYTE, schema_id) + body


def unframe(payload: bytes) -> tuple[int, memoryview]:
    """(schema id, Avro body) of a Confluent-framed payload."""
    if payload is None or len(payload) < HEADER_SIZE:
        raise EnvelopeError("payload shorter than the 5-byte Confluent header")
    magic, schema_id = HEADER.unpack_from(payload)
    if magic != MAGIC_BYTE:
        raise EnvelopeError(f"unknown magic byte {magic} (not Confluent wire format)")
    return schema_id, memoryview(payload)[HEADER_SIZE:]


def encode_record(record: Mapping[str, Any], schema_id: int) -> bytes:
    """One record in the Confluent wire format, written with `ENVELOPE_SCHEMA`."""
    out = io.BytesIO()
    out.write(HEADER.pack(MAGIC_BYTE, schema_id))
    fastavro.schemaless_writer(out, PARSED_ENVELOPE_SCHEMA, record)
    return out.getvalue()


def encode(event: TrackedEvent, schema_id: int) -> bytes:
    """One event in the Confluent wire format; `schema_id` is the envelope's registry id."""
    return encode_record(to_record(event), schema_id)


def decode(payload: bytes, writer_schema: Any, reader_schema: Any | None = None) -> TrackedEvent:
    """The event of one framed payload, read with `writer_schema` (the schema its id
    names) and resolved to `reader_schema` (default: no resolution needed)."""
    _, body = unframe(payload)
    try:
        record = fastavro.schemaless_reader(io.BytesIO(body), writer_schema, reader_schema)
    except Exception as exc:  # fastavro raises many types for malformed bodies
        raise EnvelopeError(f"Avro body does not decode: {exc}") from exc
    if not isinstance(record, dict):
        raise EnvelopeError("Avro body is not a record")
    return from_record(record)


def envelope_key(tenant_id: str, event_id: str) -> bytes:
    """The Kafka key of an event: a function of Pinot's primary key (tenant_id, event_id).

    Pinot deduplicates (and upserts) per stream partition, so every copy of one event
    must land in the same partition: the key is derived from the primary key alone.
    """
    return f"{tenant_id}:{event_id}".encode()


# --- registry ------------------------------------------------------------------------


def registry_client_conf(registry_url: str, auth: str | None = None) -> dict[str, Any]:
    """confluent-kafka `SchemaRegistryClient` config for our registry.

    `auth` is a registry token (sent as HTTP Basic `bilten:<token>`, which our registry
    and Confluent's both accept) or `user:password`; None when auth is off.
    """
    conf: dict[str, Any] = {"url": registry_url.rstrip("/")}
    if auth:
        conf["basic.auth.user.info"] = auth if ":" in auth else f"bilten:{auth}"
    return conf


def register_envelope_schema(
    registry_url: str, auth: str | None = None, topic: str = DEFAULT_EVENTS_TOPIC
) -> int:
    """Registers the envelope under `<topic>-value` and returns its global schema id.

    Idempotent: registering the same schema again returns the same id. Needs a token
    with `schemas:write` (or admin). Raises confluent-kafka's `SchemaRegistryError` when
    the registry refuses (e.g. 409: incompatible with the subject's latest version).
    """
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    client = SchemaRegistryClient(registry_client_conf(registry_url, auth))
    return int(client.register_schema(subject_for(topic), Schema(ENVELOPE_SCHEMA_JSON, "AVRO")))
