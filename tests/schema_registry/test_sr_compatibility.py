"""Compatibility rules: the data-driven table plus level semantics (unit, no I/O)."""

from __future__ import annotations

import json

import pytest

from schema_registry.avro_schema import NamedType, SchemaParseError, parse_schema
from schema_registry.compatibility import (
    CompatibilityLevel,
    ExistingSchema,
    IncompatibilityType,
    check_level,
    reader_incompatibilities,
)
from tests.schema_registry.compatibility_cases import (
    CASES,
    INVALID,
    PAIRS,
    Case,
    Invalid,
    arr,
    enum,
    fld,
    rec,
)

pytestmark = pytest.mark.unit


def parse(schema: object, refs: tuple[object, ...] = ()):  # type: ignore[no-untyped-def]
    # Referenced schemas are parsed first; their named types are visible to `schema`, as
    # the registry does for Confluent `references`.
    known: dict[str, NamedType] = {}
    for ref in refs:
        known.update(parse_schema(json.dumps(ref), known).defined)
    return parse_schema(json.dumps(schema), known).root


def test_table_is_large_and_covers_both_directions() -> None:
    assert len(CASES) >= 150
    assert len(CASES) == 2 * len(PAIRS)
    # Every incompatibility type appears as an expected failure somewhere.
    seen = {kind for case in CASES if not case.compatible for kind in case.kinds}
    assert seen == set(IncompatibilityType)
    # And each failing rule is also exercised in the direction that passes or fails otherwise.
    assert any(c.compatible for c in CASES) and any(not c.compatible for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reader_writer_case(case: Case) -> None:
    found = reader_incompatibilities(
        parse(case.reader, case.reader_refs), parse(case.writer, case.writer_refs)
    )
    if case.compatible:
        assert found == [], f"{case.reason}: unexpected {[i.render() for i in found]}"
    else:
        assert found, f"{case.reason}: expected an incompatibility"
        kinds = {issue.type for issue in found}
        assert kinds <= case.kinds, f"{case.reason}: got {kinds}, expected within {case.kinds}"


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_union_defaults_are_refused(case: Invalid) -> None:
    with pytest.raises(SchemaParseError, match="first branch"):
        parse(case.schema)


def test_locations_name_the_offending_path() -> None:
    reader = parse(rec("R", fld("a", "int"), fld("b", rec("In", fld("x", "int"), fld("y", "int")))))
    writer = parse(rec("R", fld("a", "int"), fld("b", rec("In", fld("x", "int")))))
    (issue,) = reader_incompatibilities(reader, writer)
    assert issue.type is IncompatibilityType.READER_FIELD_MISSING_DEFAULT_VALUE
    assert issue.location == "/fields/1/type/fields/1"
    assert issue.message == "y"

    reader = parse(rec("R", fld("c", enum("E", "A"))))
    writer = parse(rec("R", fld("c", enum("E", "A", "B", "C"))))
    (issue,) = reader_incompatibilities(reader, writer)
    assert issue.location == "/fields/0/type/symbols"
    assert issue.message == "[B, C]"

    reader = parse(rec("R", fld("xs", arr("int"))))
    writer = parse(rec("R", fld("xs", arr("string"))))
    (issue,) = reader_incompatibilities(reader, writer)
    assert issue.location == "/fields/0/type/items"
    assert "reader type: INT not compatible with writer type: STRING" in issue.message

    reader = parse(["null", "int"])
    writer = parse(["null", "int", "string"])
    (issue,) = reader_incompatibilities(reader, writer)
    assert issue.type is IncompatibilityType.MISSING_UNION_BRANCH
    assert issue.location == "/2"


def _versions(*schemas: object) -> list[ExistingSchema]:
    return [ExistingSchema(i + 1, parse(s), json.dumps(s)) for i, s in enumerate(schemas)]


# v1 has field a; v2 drops a (a had no default); v3 = new schema that reads v2 but not v1.
V1 = rec("R", fld("a", "int"), fld("b", "int"))
V2 = rec("R", fld("b", "int"))
NEW = rec("R", fld("a", "string", default="x"), fld("b", "int"))


@pytest.mark.parametrize(
    ("level", "ok"),
    [
        (CompatibilityLevel.BACKWARD, True),
        (CompatibilityLevel.BACKWARD_TRANSITIVE, False),
        (CompatibilityLevel.NONE, True),
    ],
)
def test_transitive_checks_every_version_latest_only_checks_latest(
    level: CompatibilityLevel, ok: bool
) -> None:
    # NEW reads v2 (a defaults), but reading v1's int a as string fails.
    messages = check_level(parse(NEW), _versions(V1, V2), level)
    assert (messages == []) is ok


def test_forward_and_full_directions() -> None:
    old = _versions(rec("R", fld("a", "int")))
    added_no_default = parse(rec("R", fld("a", "int"), fld("b", "int")))
    # New reader lacks a default for b: BACKWARD fails, FORWARD (old reads new) passes.
    assert check_level(added_no_default, old, CompatibilityLevel.BACKWARD)
    assert not check_level(added_no_default, old, CompatibilityLevel.FORWARD)
    assert check_level(added_no_default, old, CompatibilityLevel.FULL)
    removed = parse(rec("R"))
    assert not check_level(removed, old, CompatibilityLevel.BACKWARD)
    assert check_level(removed, old, CompatibilityLevel.FORWARD)
    assert check_level(removed, old, CompatibilityLevel.FULL_TRANSITIVE)


def test_forward_transitive_checks_all() -> None:
    v1 = rec("R", fld("a", "int"), fld("b", "int"))
    v2 = rec("R", fld("a", "int"), fld("b", "int", default=0))
    new = rec("R", fld("a", "int"))  # drops b: v2 can read it (default), v1 cannot
    assert not check_level(parse(new), _versions(v1, v2), CompatibilityLevel.FORWARD)
    assert check_level(parse(new), _versions(v1, v2), CompatibilityLevel.FORWARD_TRANSITIVE)


# v1 requires b; v2 gives b a default; v3 adds a defaulted c; NEW drops b. NEW and v2 read each other (b defaults
# in v2), so FULL, which checks only the latest version, accepts NEW; v1 cannot read NEW's
# data (b missing, no default), so FULL_TRANSITIVE, which checks every version, refuses it.
FULL_V1 = rec("R", fld("a", "int"), fld("b", "int"))
FULL_V2 = rec("R", fld("a", "int"), fld("b", "int", default=0))
FULL_V3 = rec("R", fld("a", "int"), fld("b", "int", default=0), fld("c", "string", default=""))
FULL_NEW = rec("R", fld("a", "int"))


@pytest.mark.parametrize(
    ("level", "history", "ok"),
    [
        (CompatibilityLevel.FULL, (FULL_V1, FULL_V2), True),
        (CompatibilityLevel.FULL_TRANSITIVE, (FULL_V1, FULL_V2), False),
        # With v1 no longer live (soft-deleted versions are not passed in), both accept.
        (CompatibilityLevel.FULL_TRANSITIVE, (FULL_V2,), True),
        # Three versions: the failing one is the oldest, two versions back.
        (CompatibilityLevel.FULL, (FULL_V1, FULL_V2, FULL_V3), True),
        (CompatibilityLevel.FULL_TRANSITIVE, (FULL_V1, FULL_V2, FULL_V3), False),
    ],
)
def test_full_checks_latest_full_transitive_checks_every_version(
    level: CompatibilityLevel, history: tuple[object, ...], ok: bool
) -> None:
    messages = check_level(parse(FULL_NEW), _versions(*history), level)
    assert (messages == []) is ok, messages
    if not ok:
        assert "{oldSchemaVersion: 1}" in messages
        assert any("READER_FIELD_MISSING_DEFAULT_VALUE" in m for m in messages)


def test_verbose_messages_carry_version_and_level() -> None:
    messages = check_level(
        parse(rec("R", fld("a", "int"), fld("c", "int"))),
        _versions(rec("R", fld("a", "int"))),
        CompatibilityLevel.BACKWARD,
    )
    assert messages[0].startswith("Incompatibility{type:READER_FIELD_MISSING_DEFAULT_VALUE")
    assert "location:/fields/1" in messages[0]
    assert "{oldSchemaVersion: 1}" in messages
    assert "{compatibility: 'BACKWARD'}" in messages
