"""Custom event definitions: Avro schemas in the schema registry, one subject per event.

A tenant registers `events.<tenant_id>.<event_name>` (platform-wide definitions live
under tenant `_platform`). A custom event's properties must be a valid record of the
latest version, or of the version the event names. Lookups go through confluent-kafka's
own `SchemaRegistryClient`, so the platform uses its registry exactly as any client does,
and are cached briefly: a new version is picked up within `ttl_seconds`.

Personal properties: a field of the definition's Avro record with the custom attribute
`"personal": true` (Avro keeps unknown attributes) holds personal data. With
crypto-shredding on, such properties are sealed with the subject's key on Kafka
(services/streaming/pii.py, docs/compliance.md); unmarked properties stay in clear.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

import fastavro
import orjson
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.validation import ValidationError, validate

from services.platform.errors import dependency_unavailable
from services.platform.schema_registry_auth import PLATFORM_DEFINITIONS_TENANT, definition_subject


@dataclass(frozen=True)
class EventDefinition:
    subject: str
    version: int
    schema_id: int
    parsed_schema: Any  # fastavro's parsed form
    field_defaults: dict[str, Any]
    personal_fields: frozenset[str] = frozenset()


def personal_fields_of(raw_schema: Any) -> frozenset[str]:
    """Names of the record fields marked `"personal": true` in a definition's schema JSON."""
    if not isinstance(raw_schema, dict):
        return frozenset()
    return frozenset(
        f["name"]
        for f in raw_schema.get("fields", [])
        if isinstance(f, dict) and f.get("personal") is True and isinstance(f.get("name"), str)
    )


class EventDefinitions(Protocol):
    async def lookup(self, tenant_id: str, event_name: str, version: int) -> EventDefinition | None:
        """The definition (version 0 = latest), or None when there is none."""


def check_properties(
    definition: EventDefinition, properties: dict[str, Any]
) -> tuple[str, str] | None:
    """(field path, message) of the first violation, or None when the properties conform.

    Missing properties take the schema's defaults; unknown properties are refused, so a
    misspelt property name cannot slip through as an extra column.
    """
    known = set(definition.field_defaults) | {
        f["name"] for f in definition.parsed_schema.get("fields", [])
    }
    for name in properties:
        if name not in known:
            return (
                f"properties.{name}",
                f"{name!r} is not in {definition.subject} v{definition.version}",
            )
    record = {**definition.field_defaults, **properties}
    _coerce_integers(record, definition.parsed_schema)
    try:
        validate(record, definition.parsed_schema, raise_errors=True)
    except ValidationError as exc:
        first = exc.errors[0] if exc.errors else None
        field = getattr(first, "field", "") or ""
        # fastavro names the innermost record's full name, not the path: find the path.
        path = _violation_path(record, definition.parsed_schema) or field.rpartition(".")[2]
        return (
            f"properties.{path}" if path else "properties",
            f"does not match {definition.subject} v{definition.version}: {first}",
        )
    return None


def _violation_path(value: Any, schema: Any) -> str:
    """Dotted field names from a record down to its first invalid field ('' if none found)."""
    if not (isinstance(schema, dict) and schema.get("type") == "record"):
        return ""
    if not isinstance(value, dict):
        return ""
    for field in schema.get("fields", []):
        name = str(field["name"])
        if name not in value and "default" in field:
            continue
        try:
            valid = validate(value.get(name), field["type"], raise_errors=False)
        except Exception:  # a reference to a named type defined elsewhere: stop here
            return name
        if not valid:
            deeper = _violation_path(value.get(name), field["type"])
            return f"{name}.{deeper}" if deeper else name
    return ""


def _accepts_integer(field_type: Any) -> bool:
    branches = field_type if isinstance(field_type, list) else [field_type]
    return any(
        (b if isinstance(b, str) else b.get("type") if isinstance(b, dict) else None)
        in ("int", "long")
        for b in branches
    )


def _coerce_integers(record: dict[str, Any], schema: Any) -> None:
    """JSON (and protobuf Struct) carry every number as a double: 3.0 for an Avro `int`
    property is the integer 3. Non-integral values stay as they are and fail."""
    for field in schema.get("fields", []):
        value = record.get(field["name"])
        if isinstance(value, float) and value.is_integer() and _accepts_integer(field["type"]):
            record[field["name"]] = int(value)


class RegistryEventDefinitions:
    def __init__(self, url: str, token: str, ttl_seconds: float = 10.0) -> None:
        self._client = SchemaRegistryClient(
            {
                "url": url,
                "basic.auth.user.info": f"ingestion:{token}",
                # The client caches "latest" forever by default; a new definition version
                # must be picked up within our own TTL.
                "cache.latest.ttl.sec": max(ttl_seconds, 0.001),
            }
        )
        self._ttl = ttl_seconds
        self._cache: dict[tuple[str, str, int], tuple[float, EventDefinition | None]] = {}

    async def lookup(self, tenant_id: str, event_name: str, version: int) -> EventDefinition | None:
        key = (tenant_id, event_name, version)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await asyncio.to_thread(self._fetch, tenant_id, event_name, version)
        self._cache[key] = (now + self._ttl, found)
        return found

    def _fetch(self, tenant_id: str, event_name: str, version: int) -> EventDefinition | None:
        for owner in (tenant_id, PLATFORM_DEFINITIONS_TENANT):
            subject = definition_subject(owner, event_name)
            try:
                registered = (
                    self._client.get_version(subject, version)
                    if version
                    else self._client.get_latest_version(subject)
                )
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:
                    continue
                raise dependency_unavailable(f"schema registry: {exc}") from exc
            except Exception as exc:  # connection refused, timeouts
                raise dependency_unavailable(f"schema registry unreachable: {exc}") from exc
            schema_text = registered.schema.schema_str or "{}"
            raw = orjson.loads(schema_text)
            parsed = fastavro.parse_schema(raw)
            defaults = {f["name"]: f["default"] for f in raw.get("fields", []) if "default" in f}
            return EventDefinition(
                subject,
                registered.version or 0,
                registered.schema_id or 0,
                parsed,
                defaults,
                personal_fields_of(raw),
            )
        return None
