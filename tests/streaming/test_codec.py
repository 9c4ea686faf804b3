"""The Avro envelope and the vectorised codec, against fastavro as the reference."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import fastavro
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.events.model import Enrichment, EventSource, TrackedEvent, TrackedEventType
from services.storage.event_store import events_to_table
from services.streaming import avro_envelope as envelope
from services.streaming.codec import (
    Frames,
    decode_bodies,
    decode_frames,
    decode_resolved,
    encode_table,
)
from tests.streaming.conftest import event

pytestmark = pytest.mark.unit

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)


@st.composite
def tracked_events(draw: st.DrawFn) -> TrackedEvent:
    occurred = draw(
        st.datetimes(
            min_value=datetime(1971, 1, 1),
            max_value=datetime(2200, 1, 1),
            timezones=st.just(UTC),
        )
    )
    return TrackedEvent(
        tenant_id=draw(st.text(min_size=1, max_size=20)),
        event_id=draw(st.text(min_size=1, max_size=64)),
        event_type=draw(st.sampled_from(list(TrackedEventType))),
        event_name=draw(_text),
        occurred_at=occurred,
        received_at=occurred + timedelta(microseconds=draw(st.integers(0, 10**12))),
        source=draw(st.sampled_from(list(EventSource))),
        session_id=draw(_text),
        user_id=draw(_text),
        anonymous_id=draw(_text),
        page_url=draw(st.text(max_size=300)),
        referrer=draw(_text),
        order_id=draw(_text),
        revenue=Decimal(draw(st.integers(-(10**17), 10**17))).scaleb(-6),
        currency=draw(st.sampled_from(["", "EUR", "USD"])),
        quantity=draw(st.integers(-(2**31), 2**31 - 1)),
        properties_json=json.dumps(draw(st.dictionaries(st.text(max_size=5), st.integers()))),
        schema_id=draw(st.integers(-(2**31), 2**31 - 1)),
        enrichment=Enrichment(
            country_code=draw(st.sampled_from(["", "DE"])), os_family=draw(_text)
        ),
    )


@settings(max_examples=30, deadline=None)
@given(st.lists(tracked_events(), min_size=1, max_size=40))
def test_batch_encoding_is_byte_identical_to_fastavro_and_decodes_back(
    events: list[TrackedEvent],
) -> None:
    table = events_to_table(events)
    payloads = encode_table(table, 4242)
    for single, payload in zip(events, payloads, strict=True):
        assert payload == envelope.encode(single, 4242)
        assert envelope.unframe(payload)[0] == 4242
        assert envelope.decode(payload, envelope.PARSED_ENVELOPE_SCHEMA) == single
    decoded = decode_bodies([memoryview(p)[envelope.HEADER_SIZE :] for p in payloads])
    assert decoded.rejected == []
    assert decoded.table.equals(table)
    assert decoded.indices.tolist() == list(range(len(events)))
    framed = decode_bodies(payloads, envelope.HEADER_SIZE)  # whole frames, header skipped
    assert framed.rejected == [] and framed.table.equals(table)


def test_malformed_bodies_are_rejected_one_by_one_not_the_batch() -> None:
    good = [envelope.encode(event(i), 1)[envelope.HEADER_SIZE :] for i in range(4)]
    truncated = good[0][:10]
    trailing = good[1] + b"\x00"
    bad_utf8 = bytearray(good[2])
    bad_utf8[1:4] = b"\xff\xfe\xfd"  # inside tenant_id ("tenant_a")
    endless_varint = b"\xff" * 12
    bodies = [good[0], truncated, good[1], trailing, bytes(bad_utf8), endless_varint, good[3]]
    decoded = decode_bodies(bodies)
    assert decoded.indices.tolist() == [0, 2, 6]
    assert [r[0] for r in decoded.rejected] == [1, 3, 4, 5]
    reasons = dict(decoded.rejected)
    assert "truncated" in reasons[1]
    assert "trailing bytes" in reasons[3]
    assert "UTF-8" in reasons[4]
    assert "varint" in reasons[5] or "truncated" in reasons[5]
    assert decoded.table.column("event_id").to_pylist() == ["e-0", "e-1", "e-3"]


def test_values_the_model_refuses_are_rejected_with_the_reason() -> None:
    records = [envelope.to_record(event(i)) for i in range(5)]
    records[1]["event_type"] = "bogus"
    records[2]["event_id"] = ""
    records[3]["properties_json"] = "[1, 2]"
    records[4]["source"] = "fax"
    bodies = []
    for record in records:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, envelope.PARSED_ENVELOPE_SCHEMA, record)
        bodies.append(out.getvalue())
    decoded = decode_bodies(bodies)
    assert decoded.indices.tolist() == [0]
    assert dict(decoded.rejected) == {
        1: "unknown event_type 'bogus'",
        2: "event_id is empty",
        3: "properties_json is not a JSON object",
        4: "unknown source 'fax'",
    }


def test_an_older_writer_schema_resolves_to_the_current_reader() -> None:
    old = json.loads(envelope.ENVELOPE_SCHEMA_JSON)
    old["fields"] = [
        f for f in old["fields"] if f["name"] not in ("campaign_id", "device_type", "schema_id")
    ]
    old["fields"].append({"name": "legacy_flag", "type": "boolean", "default": False})
    writer = fastavro.parse_schema(old)
    record = {
        k: v
        for k, v in envelope.to_record(event(3)).items()
        if k in {f["name"] for f in old["fields"]}
    }
    record["legacy_flag"] = True
    out = io.BytesIO()
    fastavro.schemaless_writer(out, writer, record)
    decoded = decode_resolved(
        [out.getvalue(), b"\x02garbage"], writer, envelope.PARSED_ENVELOPE_SCHEMA
    )
    assert decoded.indices.tolist() == [0]
    assert decoded.rejected[0][0] == 1
    row = decoded.table.to_pylist()[0]
    assert row["event_id"] == "e-3"
    assert row["campaign_id"] == "" and row["device_type"] == "" and row["schema_id"] == 0


def test_revenue_beyond_six_decimals_is_refused_not_rounded() -> None:
    with pytest.raises(envelope.EnvelopeError):
        envelope.revenue_micros(Decimal("0.0000001"))
    with pytest.raises((pa.ArrowInvalid, ValueError)):
        events_to_table([TrackedEvent(**{**_fields(event(1)), "revenue": Decimal("1.0000001")})])


def _fields(e: TrackedEvent) -> dict[str, object]:
    return {name: getattr(e, name) for name in TrackedEvent.__slots__}  # type: ignore[attr-defined]


def test_key_is_a_function_of_the_pinot_primary_key() -> None:
    assert envelope.envelope_key("t1", "e1") == b"t1:e1"
    assert envelope.subject_for("bilten.tracked-events.v1") == "bilten.tracked-events.v1-value"


def test_frames_without_the_magic_byte_are_refused() -> None:
    with pytest.raises(envelope.EnvelopeError):
        envelope.unframe(b'{"json": true}')
    with pytest.raises(envelope.EnvelopeError):
        envelope.unframe(b"\x00\x00")


def test_frames_give_schema_ids_and_decode_row_subsets_like_whole_batches() -> None:
    frames_in = [envelope.encode(event(i), 7 if i % 3 else 9) for i in range(9)]
    values: list[bytes | None] = [*frames_in, b'{"json": true}', None, b"\x00\x00", b""]
    frames = Frames(values)
    assert frames.schema_ids().tolist() == [9, 7, 7, 9, 7, 7, 9, 7, 7, -1, -1, -1, -1]
    rows = np.flatnonzero(frames.schema_ids() == 7)
    subset = decode_frames(frames, rows, envelope.HEADER_SIZE)
    alone = decode_bodies([frames_in[i] for i in rows.tolist()], envelope.HEADER_SIZE)
    assert subset.rejected == [] and subset.table.equals(alone.table)
    assert subset.table.column("event_id").to_pylist() == [f"e-{i}" for i in rows.tolist()]


_valid_bodies = st.lists(st.integers(0, 40), min_size=1, max_size=12).map(
    lambda ids: [envelope.encode(event(i), 1)[envelope.HEADER_SIZE :] for i in ids]
)


@settings(max_examples=60, deadline=None)
@given(_valid_bodies, st.data())
def test_damaged_bodies_never_break_the_batch_and_decode_as_fastavro_does(
    bodies: list[bytes], data: st.DataObject
) -> None:
    """Cut, extended or flipped bodies: the vectorised decoder keeps exactly the rows
    fastavro reads as the whole body (no bytes left over) and the model accepts."""
    damaged = []
    for body in bodies:
        action = data.draw(st.sampled_from(["keep", "cut", "extend", "flip"]))
        if action == "cut":
            body = body[: data.draw(st.integers(0, len(body) - 1))]
        elif action == "extend":
            body = body + data.draw(st.binary(min_size=1, max_size=4))
        elif action == "flip":
            at = data.draw(st.integers(0, len(body) - 1))
            body = body[:at] + bytes([data.draw(st.integers(0, 255))]) + body[at + 1 :]
        damaged.append(body)
    decoded = decode_bodies(damaged)
    kept = decoded.indices.tolist()
    assert sorted(kept + [row for row, _ in decoded.rejected]) == list(range(len(damaged)))
    for position, row in enumerate(kept):
        stream = io.BytesIO(damaged[row])
        record = fastavro.schemaless_reader(stream, envelope.PARSED_ENVELOPE_SCHEMA, None)
        assert stream.tell() == len(damaged[row])  # fastavro read the whole body too
        assert isinstance(record, dict)
        got = decoded.table.slice(position, 1).to_pylist()[0]
        assert got["event_id"] == record["event_id"]
        assert got["tenant_id"] == record["tenant_id"]
        assert got["quantity"] == record["quantity"]
