"""Parsing, validation and canonical forms (unit, no I/O)."""

from __future__ import annotations

import json

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schema_registry.avro_schema import (
    SchemaParseError,
    parse_schema,
    parsing_canonical_form,
    registry_canonical_form,
)

pytestmark = pytest.mark.unit


def pcf(schema: object) -> str:
    return parsing_canonical_form(parse_schema(json.dumps(schema)).root)


def key(schema: object) -> str:
    return registry_canonical_form(parse_schema(json.dumps(schema)).root)


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ("not json", "not valid JSON"),
        ({"type": "record", "name": "R"}, "fields"),
        ({"type": "record", "name": "1R", "fields": []}, "invalid name"),
        ({"type": "record", "name": "R", "fields": [{"name": "a"}]}, "no 'type'"),
        (
            {"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}] * 2},
            "duplicate field",
        ),
        ({"type": "enum", "name": "E", "symbols": ["A", "A"]}, "duplicate symbols"),
        ({"type": "enum", "name": "E", "symbols": ["A"], "default": "B"}, "enum default"),
        ({"type": "fixed", "name": "F"}, "size"),
        ({"type": "array"}, "items"),
        ({"type": "map"}, "values"),
        ('"Unknown"', "unknown type"),
        (["null", "null"], "duplicate union branch"),
        (["null", ["int"]], "immediately contain a union"),
        (
            {
                "type": "record",
                "name": "R",
                "fields": [{"name": "a", "type": ["null", "string"], "default": "x"}],
            },
            "first branch",
        ),
        (
            {
                "type": "record",
                "name": "R",
                "fields": [{"name": "a", "type": ["string", "null"], "default": None}],
            },
            "first branch",
        ),
        (
            {
                "type": "record",
                "name": "R",
                "fields": [{"name": "a", "type": "int", "default": "1"}],
            },
            "not a valid int",
        ),
        (
            {
                "type": "record",
                "name": "R",
                "fields": [{"name": "a", "type": "int", "default": 2**31}],
            },
            "not a valid int",
        ),
        (
            {
                "type": "record",
                "name": "R",
                "fields": [
                    {"name": "a", "type": {"type": "array", "items": "int"}, "default": [1, "x"]}
                ],
            },
            "not a valid int",
        ),
        (
            {
                "type": "record",
                "name": "R",
                "fields": [
                    {
                        "name": "e",
                        "type": {"type": "enum", "name": "E", "symbols": ["A"]},
                        "default": "Z",
                    }
                ],
            },
            "not a symbol",
        ),
        (
            {
                "type": "record",
                "name": "R",
                "fields": [
                    {
                        "name": "f",
                        "type": {"type": "fixed", "name": "F", "size": 2},
                        "default": "abc",
                    }
                ],
            },
            "fixed",
        ),
        (
            {
                "type": "record",
                "name": "R",
                "fields": [
                    {"name": "a", "type": "int"},
                    {"name": "r", "type": {"type": "record", "name": "R", "fields": []}},
                ],
            },
            "defined more than once",
        ),
        ({"type": "record", "name": "int", "fields": []}, "primitive"),
    ],
)
def test_invalid_schemas_are_refused(schema: object, why: str) -> None:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    with pytest.raises(SchemaParseError, match=why):
        parse_schema(text)


def test_valid_defaults_and_named_references() -> None:
    schema = {
        "type": "record",
        "name": "Order",
        "namespace": "shop",
        "fields": [
            {"name": "id", "type": "long", "default": 0},
            {"name": "note", "type": ["null", "string"], "default": None},
            {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
            {"name": "price", "type": "double", "default": 1},
            {"name": "raw", "type": "bytes", "default": "\u00ff"},
            {"name": "next", "type": ["null", "Order"], "default": None},
            {
                "name": "kind",
                "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]},
                "default": "A",
            },
            {"name": "kind2", "type": "shop.Kind", "default": "B"},
        ],
    }
    parsed = parse_schema(json.dumps(schema))
    assert set(parsed.defined) == {"shop.Order", "shop.Kind"}


def test_references_supply_named_types() -> None:
    address = parse_schema(
        json.dumps(
            {
                "type": "record",
                "name": "Address",
                "namespace": "ex",
                "fields": [{"name": "street", "type": "string"}],
            }
        )
    )
    person = parse_schema(
        json.dumps(
            {
                "type": "record",
                "name": "Person",
                "namespace": "ex",
                "fields": [{"name": "home", "type": "Address"}],
            }
        ),
        address.defined,
    )
    assert "ex.Address" not in person.defined
    with pytest.raises(SchemaParseError, match="unknown type"):
        parse_schema(
            json.dumps(
                {"type": "record", "name": "P", "fields": [{"name": "home", "type": "ex.Address"}]}
            )
        )


CANONICAL_EXAMPLES = [
    "string",
    {"type": "string"},
    {"type": "string", "doc": "ignored"},
    ["null", {"type": "int"}],
    {
        "type": "record",
        "name": "R",
        "namespace": "a.b",
        "doc": "x",
        "fields": [
            {
                "name": "f",
                "type": {"type": "enum", "name": "E", "symbols": ["X", "Y"]},
                "default": "X",
                "doc": "d",
            },
            {"name": "g", "type": "E"},
            {"name": "h", "type": {"type": "fixed", "name": "c.F", "size": 3}},
            {"name": "m", "type": {"type": "map", "values": {"type": "array", "items": "long"}}},
        ],
    },
]


@pytest.mark.parametrize("schema", CANONICAL_EXAMPLES)
def test_parsing_canonical_form_matches_fastavro(schema: object) -> None:
    expected = fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(schema))
    assert pcf(schema) == expected


def test_identity_key_canonicalises_presentation_only() -> None:
    a = {
        "type": "record",
        "name": "User",
        "namespace": "ex",
        "fields": [{"name": "id", "type": "string"}],
    }
    b = {
        "fields": [{"type": {"type": "string"}, "name": "id", "doc": "the id"}],
        "name": "ex.User",
        "type": "record",
        "doc": "a user",
    }
    assert key(a) == key(b)
    assert key("string") == key({"type": "string"})
    # Resolution-relevant differences keep schemas apart even though PCF merges them.
    with_default = {**a, "fields": [{"name": "id", "type": "string", "default": ""}]}
    assert pcf(a) == pcf(with_default) and key(a) != key(with_default)
    date = {"type": "int", "logicalType": "date"}
    assert pcf(date) == pcf("int") and key(date) != key("int")
    aliased = {**a, "aliases": ["Person"]}
    assert key(a) != key(aliased)


_names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
_prims = st.sampled_from(["null", "boolean", "int", "long", "float", "double", "bytes", "string"])


@st.composite
def _records(draw: st.DrawFn) -> dict[str, object]:
    names = draw(st.lists(_names, min_size=1, max_size=5, unique=True))
    fields = []
    for n in names:
        t = draw(
            st.one_of(
                _prims,
                st.builds(lambda p: {"type": "array", "items": p}, _prims),
                st.builds(lambda p: ["null", p], _prims.filter(lambda p: p != "null")),
            )
        )
        fields.append({"name": n, "type": t})
    return {"type": "record", "name": draw(_names).capitalize() or "R", "fields": fields}


@settings(max_examples=60, deadline=None)
@given(_records())
def test_generated_schemas_agree_with_fastavro_pcf(schema: dict[str, object]) -> None:
    assert pcf(schema) == fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(schema))
