"""Custom event properties against a registered definition: the failing field's path (unit)."""

from __future__ import annotations

from typing import Any

import fastavro
import pytest

from services.ingestion.definitions import EventDefinition, check_properties, personal_fields_of

pytestmark = pytest.mark.unit

SEAT: dict[str, Any] = {
    "type": "record",
    "name": "Seat",
    "fields": [
        {"name": "row", "type": "string"},
        {"name": "number", "type": "int"},
        {
            "name": "position",
            "type": {
                "type": "record",
                "name": "Position",
                "fields": [{"name": "x", "type": "int"}, {"name": "y", "type": "int"}],
            },
        },
    ],
}
# Namespaced on purpose: fastavro names a failing field by its record's full name.
DEFINITION: dict[str, Any] = {
    "type": "record",
    "name": "SeatMapOpened",
    "namespace": "events.acme",
    "fields": [
        {"name": "section", "type": "string"},
        {"name": "seat", "type": SEAT},
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
        {"name": "email", "type": ["null", "string"], "default": None, "personal": True},
    ],
}


def definition() -> EventDefinition:
    defaults = {f["name"]: f["default"] for f in DEFINITION["fields"] if "default" in f}
    return EventDefinition(
        "events.acme.seat_map_opened",
        1,
        1,
        fastavro.parse_schema(DEFINITION),
        defaults,
        personal_fields_of(DEFINITION),
    )


def seat(**changes: Any) -> dict[str, Any]:
    return {"row": "B", "number": 7, "position": {"x": 1, "y": 2}, **changes}


@pytest.mark.parametrize(
    ("properties", "path"),
    [
        ({"section": "A", "seat": seat()}, None),
        ({"section": 3, "seat": seat()}, "properties.section"),
        ({"section": "A", "seat": seat(number="seven")}, "properties.seat.number"),
        (
            {"section": "A", "seat": {"row": "B", "position": {"x": 1, "y": 2}}},
            "properties.seat.number",
        ),
        (
            {"section": "A", "seat": seat(position={"x": 1, "y": "up"})},
            "properties.seat.position.y",
        ),
        ({"section": "A", "seat": "B7"}, "properties.seat"),
        ({"section": "A", "seat": seat(), "tags": [1]}, "properties.tags"),
        ({"section": "A", "seat": seat(), "colour": "red"}, "properties.colour"),
    ],
)
def test_violations_name_the_nested_field_path(
    properties: dict[str, Any], path: str | None
) -> None:
    found = check_properties(definition(), properties)
    if path is None:
        assert found is None
    else:
        assert found is not None
        assert found[0] == path, found


def test_personal_fields_are_read_from_the_definition() -> None:
    assert definition().personal_fields == frozenset({"email"})
