"""Schema ids from our Confluent-compatible registry: the producer's id, the consumer's
writer schemas. Blocking HTTP through confluent-kafka's `SchemaRegistryClient`; callers
run these off the event loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

from services.streaming.avro_envelope import (
    ENVELOPE_SCHEMA,
    PARSED_ENVELOPE_SCHEMA,
    register_envelope_schema,
    registry_client_conf,
)

_ENVELOPE_CANONICAL = to_parsing_canonical_form(PARSED_ENVELOPE_SCHEMA)


class RegistryUnavailableError(RuntimeError):
    """The registry did not answer (network, 5xx): retry later, the data is not at fault."""


class UnknownSchemaError(LookupError):
    """The registry answered that the id does not exist (40403): the record is at fault."""


@dataclass(frozen=True, slots=True)
class WriterSchema:
    schema_id: int
    parsed: Any  # fastavro's parsed schema
    is_envelope: bool  # same Parsing Canonical Form as ENVELOPE_SCHEMA: read without resolution


class EnvelopeSchemaId:
    """The producer's schema id: registered once under `<topic>-value`, then cached."""

    def __init__(self, registry_url: str, token: str | None, topic: str) -> None:
        self._url = registry_url
        self._token = token or None
        self._topic = topic
        self._id: int | None = None
        self._lock = threading.Lock()

    @property
    def cached(self) -> int | None:
        return self._id

    def get(self) -> int:
        """The id; registers the envelope on first use. Raises `RegistryUnavailableError`."""
        if self._id is not None:
            return self._id
        with self._lock:
            if self._id is None:
                try:
                    self._id = register_envelope_schema(self._url, self._token, self._topic)
                except Exception as exc:  # HTTP errors, refused connections, 4xx/5xx
                    raise RegistryUnavailableError(
                        f"schema registry at {self._url} did not register the envelope: {exc}"
                    ) from exc
            return self._id


class WriterSchemas:
    """Writer schemas by id, fetched from the registry once each (ids are immutable)."""

    def __init__(self, registry_url: str, token: str | None) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._client = SchemaRegistryClient(registry_client_conf(registry_url, token))
        self._by_id: dict[int, WriterSchema] = {}
        self._lock = threading.Lock()
        self.reader_schema = PARSED_ENVELOPE_SCHEMA

    def get(self, schema_id: int) -> WriterSchema:
        found = self._by_id.get(schema_id)
        if found is not None:
            return found
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        with self._lock:
            try:
                schema = self._client.get_schema(schema_id)
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:
                    raise UnknownSchemaError(f"schema id {schema_id}: {exc.error_message}") from exc
                raise RegistryUnavailableError(f"schema id {schema_id}: {exc}") from exc
            except Exception as exc:  # connection refused, timeouts
                raise RegistryUnavailableError(f"schema id {schema_id}: {exc}") from exc
            if schema.schema_type not in (None, "AVRO"):
                raise UnknownSchemaError(f"schema id {schema_id} is {schema.schema_type}, not Avro")
            try:
                parsed = fastavro.parse_schema(_loads(schema.schema_str))
            except Exception as exc:
                raise UnknownSchemaError(f"schema id {schema_id} does not parse: {exc}") from exc
            found = WriterSchema(
                schema_id, parsed, to_parsing_canonical_form(parsed) == _ENVELOPE_CANONICAL
            )
            self._by_id[schema_id] = found
            return found


class PersonalFieldsById:
    """Names of the properties an event definition marks personal, by the definition's
    registry id (the event's `schema_id`); fetched once per id (ids are immutable).
    For the Kafka log's PII sealer (services/streaming/pii.py). 0 = no definition."""

    def __init__(self, registry_url: str, token: str | None) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._client = SchemaRegistryClient(registry_client_conf(registry_url, token))
        self._by_id: dict[int, frozenset[str]] = {0: frozenset()}
        self._lock = threading.Lock()

    def __call__(self, schema_id: int) -> frozenset[str]:
        found = self._by_id.get(schema_id)
        if found is not None:
            return found
        from services.ingestion.definitions import personal_fields_of

        with self._lock:
            try:
                schema = self._client.get_schema(schema_id)
            except Exception as exc:  # the append fails UNAVAILABLE and is retried
                raise RegistryUnavailableError(
                    f"definition schema id {schema_id} (personal fields): {exc}"
                ) from exc
            found = personal_fields_of(_loads(schema.schema_str))
            self._by_id[schema_id] = found
            return found


def _loads(text: str | None) -> Any:
    import json

    if not text:
        raise ValueError("empty schema")
    return json.loads(text)


__all__ = [
    "ENVELOPE_SCHEMA",
    "EnvelopeSchemaId",
    "PersonalFieldsById",
    "RegistryUnavailableError",
    "UnknownSchemaError",
    "WriterSchema",
    "WriterSchemas",
]
