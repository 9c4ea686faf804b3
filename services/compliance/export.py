"""A subject's data as JSON lines or CSV, streamed in chunks.

JSON lines: one object per tracked event (`record_type: tracked_event`), then one per
consent decision (`record_type: consent`). CSV: the tracked events only, one header row
(a CSV file has one shape; consent is in the JSON-lines export). Only the caller's
tenant is read. The internal `actor_key` and `occurred_on` columns are left out: they
are derived numbers, not data about the person.
"""

from __future__ import annotations

import csv
import enum
import io
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Protocol

import orjson
import pyarrow as pa

from services.compliance.consent import ConsentRegistry
from services.storage.event_store import COLUMNS, DERIVED_COLUMNS, TABLE

CHUNK_BYTES = 64 * 1024
EXPORT_COLUMNS = [c.name for c in COLUMNS if c.name not in DERIVED_COLUMNS]


class ExportFormat(enum.Enum):
    JSON_LINES = "jsonl"
    CSV = "csv"


class EventReader(Protocol):
    def read(self, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> pa.Table: ...


def _plain(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def subject_events(reader: EventReader, tenant_id: str, subject_id: str) -> list[dict[str, object]]:
    table = reader.read(
        f"SELECT {', '.join(EXPORT_COLUMNS)} FROM {TABLE} WHERE tenant_id = ?"
        " AND (user_id = ? OR anonymous_id = ?) ORDER BY occurred_at, event_id",
        [tenant_id, subject_id, subject_id],
    )
    return [{k: _plain(v) for k, v in row.items()} for row in table.to_pylist()]


def export_subject(
    reader: EventReader,
    consent: ConsentRegistry,
    tenant_id: str,
    subject_id: str,
    fmt: ExportFormat,
) -> Iterator[bytes]:
    """Yields the export file in chunks of at most CHUNK_BYTES."""
    events = subject_events(reader, tenant_id, subject_id)
    buffer = bytearray()
    if fmt is ExportFormat.CSV:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for event in events:
            writer.writerow(event)
        buffer += text.getvalue().encode()
    else:
        for event in events:
            buffer += orjson.dumps({"record_type": "tracked_event", **event}) + b"\n"
        for decision in consent.state(tenant_id, subject_id).history:
            buffer += (
                orjson.dumps(
                    {
                        "record_type": "consent",
                        "subject_id": decision.subject_id,
                        "purpose": decision.purpose,
                        "granted": decision.granted,
                        "source": decision.source,
                        "policy_version": decision.policy_version,
                        "record_time": decision.recorded_at.isoformat(),
                    }
                )
                + b"\n"
            )
    for start in range(0, len(buffer), CHUNK_BYTES):
        yield bytes(buffer[start : start + CHUNK_BYTES])
