"""Reader/writer compatibility cases: every resolution rule, in both directions.

Each :class:`Pair` names two schemas A and B and gives both verdicts: can A read data written
with B (``a_reads_b``), and can B read data written with A (``b_reads_a``). ``CASES`` expands
every pair into two directed cases (reader, writer, verdict, reason), so a rule is always
tested with the roles swapped as well. Reasons cite the Avro specification's resolution rules;
``kinds`` lists the incompatibility types expected where a direction fails. ``a_refs`` and
``b_refs`` are schemas of referenced subjects (Confluent ``references``) whose named types A
and B use without defining them.

``INVALID`` lists schemas that are refused before any compatibility check (422/42201), each
with its reason: union defaults that do not match the union's first branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schema_registry.compatibility import IncompatibilityType as T

Schema = Any


def rec(name: str, *fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


def fld(name: str, type_: Schema, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


def enum(name: str, *symbols: str, **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": name, "symbols": list(symbols), **extra}


def fixed(name: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"type": "fixed", "name": name, "size": size, **extra}


def arr(items: Schema) -> dict[str, Any]:
    return {"type": "array", "items": items}


def mapof(values: Schema) -> dict[str, Any]:
    return {"type": "map", "values": values}


def dec(precision: int, scale: int, base: Schema = "bytes") -> dict[str, Any]:
    if isinstance(base, dict):
        return {**base, "logicalType": "decimal", "precision": precision, "scale": scale}
    return {"type": base, "logicalType": "decimal", "precision": precision, "scale": scale}


@dataclass(frozen=True)
class Pair:
    name: str
    a: Schema
    b: Schema
    a_reads_b: bool
    b_reads_a: bool
    reason: str
    kinds: frozenset[T] = frozenset()
    a_refs: tuple[Schema, ...] = ()
    b_refs: tuple[Schema, ...] = ()


@dataclass(frozen=True)
class Case:
    id: str
    reader: Schema
    writer: Schema
    compatible: bool
    reason: str
    kinds: frozenset[T]
    reader_refs: tuple[Schema, ...] = ()
    writer_refs: tuple[Schema, ...] = ()


@dataclass(frozen=True)
class Invalid:
    id: str
    schema: Schema
    reason: str


PRIMS = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"]
PROMOTES = {
    ("int", "long"),
    ("int", "float"),
    ("int", "double"),
    ("long", "float"),
    ("long", "double"),
    ("float", "double"),
    ("string", "bytes"),
    ("bytes", "string"),
}

PAIRS: list[Pair] = []

# --- primitives: identity, promotions (writer -> reader), and everything else -----------------
for p in PRIMS:
    PAIRS.append(Pair(f"same-{p}", p, p, True, True, f"identical primitive {p}"))
for i, wa in enumerate(PRIMS):
    for wb in PRIMS[i + 1 :]:
        a_reads_b = (wb, wa) in PROMOTES
        b_reads_a = (wa, wb) in PROMOTES
        if a_reads_b and b_reads_a:
            reason = f"{wa} and {wb} promote to each other (string<->bytes)"
        elif a_reads_b or b_reads_a:
            small, big = (wb, wa) if a_reads_b else (wa, wb)
            reason = f"{small} promotes to {big}, never the reverse"
        else:
            reason = f"no promotion between {wa} and {wb}"
        PAIRS.append(
            Pair(
                f"prim-{wa}-vs-{wb}",
                wa,
                wb,
                a_reads_b,
                b_reads_a,
                reason,
                frozenset({T.TYPE_MISMATCH}),
            )
        )
PAIRS.append(
    Pair(
        "prim-object-form",
        {"type": "string"},
        "string",
        True,
        True,
        '{"type": "string"} and "string" are the same schema',
    )
)

# --- records ---------------------------------------------------------------------------------
V1 = rec("User", fld("id", "long"), namespace="ex")
PAIRS += [
    Pair(
        "record-add-field-with-default",
        rec("User", fld("id", "long"), fld("email", "string", default=""), namespace="ex"),
        V1,
        True,
        True,
        "a reader-only field with a default is filled; a writer-only field is skipped",
    ),
    Pair(
        "record-add-field-without-default",
        rec("User", fld("id", "long"), fld("email", "string"), namespace="ex"),
        V1,
        False,
        True,
        "a reader-only field needs a default; the old reader skips the new field",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
    ),
    Pair(
        "record-add-optional-field",
        rec(
            "User", fld("id", "long"), fld("nick", ["null", "string"], default=None), namespace="ex"
        ),
        V1,
        True,
        True,
        "an optional field with a null default is the classic backward+forward change",
    ),
    Pair(
        "record-remove-field-without-default",
        rec("User", namespace="ex"),
        V1,
        True,
        False,
        "removing a field: new reader skips it; old reader misses it and it had no default",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
    ),
    Pair(
        "record-remove-field-with-default",
        rec("User", namespace="ex"),
        rec("User", fld("id", "long", default=0), namespace="ex"),
        True,
        True,
        "removing a field that has a default is fully compatible",
    ),
    Pair(
        "record-rename-field-with-alias",
        rec("User", fld("user_id", "long", aliases=["id"]), namespace="ex"),
        V1,
        True,
        False,
        "reader field aliases match the writer's old field name; aliases only help the reader",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
    ),
    Pair(
        "record-rename-field-without-alias",
        rec("User", fld("user_id", "long"), namespace="ex"),
        V1,
        False,
        False,
        "a renamed field without alias or default is missing in both directions",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
    ),
    Pair(
        "record-field-promoted",
        rec("User", fld("id", "double"), namespace="ex"),
        V1,
        True,
        False,
        "field types resolve recursively: long promotes to double, not back",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "record-field-type-changed",
        rec("User", fld("id", "string"), namespace="ex"),
        V1,
        False,
        False,
        "long and string do not resolve",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "record-field-order-changed",
        rec("P", fld("x", "int"), fld("y", "int")),
        rec("P", fld("y", "int"), fld("x", "int")),
        True,
        True,
        "fields match by name, not by position",
    ),
    Pair(
        "record-renamed",
        rec("Customer", fld("id", "long"), namespace="ex"),
        V1,
        False,
        False,
        "record full names must match",
        frozenset({T.NAME_MISMATCH}),
    ),
    Pair(
        "record-renamed-with-alias",
        rec("Customer", fld("id", "long"), namespace="ex", aliases=["User"]),
        V1,
        True,
        False,
        "a reader alias (relative to its namespace) matches the writer's full name",
        frozenset({T.NAME_MISMATCH}),
    ),
    Pair(
        "record-namespace-changed",
        rec("User", fld("id", "long"), namespace="other"),
        V1,
        False,
        False,
        "the namespace is part of the full name (specification; fastavro enforces it)",
        frozenset({T.NAME_MISMATCH}),
    ),
    Pair(
        "record-namespace-changed-with-full-alias",
        rec("User", fld("id", "long"), namespace="other", aliases=["ex.User"]),
        V1,
        True,
        False,
        "a fully qualified alias bridges a namespace move",
        frozenset({T.NAME_MISMATCH}),
    ),
    Pair(
        "record-vs-map",
        V1,
        mapof("long"),
        False,
        False,
        "a record never reads a map nor the reverse",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "record-nested-add-default",
        rec(
            "Order",
            fld("buyer", rec("Buyer", fld("id", "long"), fld("vip", "boolean", default=False))),
        ),
        rec("Order", fld("buyer", rec("Buyer", fld("id", "long")))),
        True,
        True,
        "nested records resolve recursively; the default covers the old writer",
    ),
    Pair(
        "record-nested-add-no-default",
        rec("Order", fld("buyer", rec("Buyer", fld("id", "long"), fld("vip", "boolean")))),
        rec("Order", fld("buyer", rec("Buyer", fld("id", "long")))),
        False,
        True,
        "a nested field without default breaks the new reader",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
    ),
    Pair(
        "record-recursive-identical",
        rec("Node", fld("value", "int"), fld("next", ["null", "Node"], default=None)),
        rec("Node", fld("value", "int"), fld("next", ["null", "Node"], default=None)),
        True,
        True,
        "recursive types terminate and match",
    ),
    Pair(
        "record-recursive-promoted",
        rec("Node", fld("value", "long"), fld("next", ["null", "Node"], default=None)),
        rec("Node", fld("value", "int"), fld("next", ["null", "Node"], default=None)),
        True,
        False,
        "promotion inside a recursive type",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "record-default-of-record-type",
        rec(
            "W", fld("id", "int"), fld("meta", rec("Meta", fld("k", "string")), default={"k": "x"})
        ),
        rec("W", fld("id", "int")),
        True,
        True,
        "a record-typed field with a record default fills in for old data",
    ),
    Pair(
        "record-error-vs-record",
        {"type": "error", "name": "Failure", "fields": [fld("code", "int")]},
        rec("Failure", fld("code", "int")),
        True,
        True,
        "error is a record for resolution purposes",
    ),
    Pair(
        "record-empty-vs-fields-with-defaults",
        rec("E"),
        rec("E", fld("a", "int", default=1), fld("b", "string", default="")),
        True,
        True,
        "an empty reader skips everything; defaults fill the other way",
    ),
]

# --- enums -----------------------------------------------------------------------------------
COLORS = enum("Color", "RED", "GREEN")
PAIRS += [
    Pair(
        "enum-add-symbol",
        enum("Color", "RED", "GREEN", "BLUE"),
        COLORS,
        True,
        False,
        "every writer symbol must exist in the reader: the old reader lacks BLUE",
        frozenset({T.MISSING_ENUM_SYMBOLS}),
    ),
    Pair(
        "enum-add-symbol-reader-default",
        enum("Color", "RED", "GREEN", "BLUE", default="RED"),
        enum("Color", "RED", "GREEN", default="RED"),
        True,
        True,
        "a reader enum default absorbs unknown writer symbols",
    ),
    Pair(
        "enum-remove-symbol",
        enum("Color", "RED"),
        COLORS,
        False,
        True,
        "a removed symbol may still be in old data",
        frozenset({T.MISSING_ENUM_SYMBOLS}),
    ),
    Pair(
        "enum-remove-symbol-with-default",
        enum("Color", "RED", default="RED"),
        COLORS,
        True,
        True,
        "a default on the reader makes symbol removal safe",
    ),
    Pair(
        "enum-reordered",
        enum("Color", "GREEN", "RED"),
        COLORS,
        True,
        True,
        "symbols match by name, not ordinal",
    ),
    Pair(
        "enum-renamed",
        enum("Colour", "RED", "GREEN"),
        COLORS,
        False,
        False,
        "enum names must match",
        frozenset({T.NAME_MISMATCH}),
    ),
    Pair(
        "enum-renamed-with-alias",
        enum("Colour", "RED", "GREEN", aliases=["Color"]),
        COLORS,
        True,
        False,
        "a reader alias matches the writer enum name",
        frozenset({T.NAME_MISMATCH}),
    ),
    Pair(
        "enum-vs-string",
        "string",
        COLORS,
        False,
        False,
        "enums do not promote to or from strings",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "enum-field-add-symbol",
        rec("Car", fld("color", enum("Color", "RED", "GREEN", "BLUE"))),
        rec("Car", fld("color", COLORS)),
        True,
        False,
        "enum rules apply inside records; location points at the symbols",
        frozenset({T.MISSING_ENUM_SYMBOLS}),
    ),
]

# --- fixed -----------------------------------------------------------------------------------
PAIRS += [
    Pair("fixed-same", fixed("Hash", 16), fixed("Hash", 16), True, True, "same name and size"),
    Pair(
        "fixed-size-changed",
        fixed("Hash", 32),
        fixed("Hash", 16),
        False,
        False,
        "fixed sizes must match",
        frozenset({T.FIXED_SIZE_MISMATCH}),
    ),
    Pair(
        "fixed-renamed",
        fixed("Digest", 16),
        fixed("Hash", 16),
        False,
        False,
        "fixed names must match",
        frozenset({T.NAME_MISMATCH}),
    ),
    Pair(
        "fixed-renamed-with-alias",
        fixed("Digest", 16, aliases=["Hash"]),
        fixed("Hash", 16),
        True,
        False,
        "a reader alias matches the writer fixed name",
        frozenset({T.NAME_MISMATCH}),
    ),
    Pair(
        "fixed-vs-bytes",
        "bytes",
        fixed("Hash", 16),
        False,
        False,
        "fixed does not promote to bytes",
        frozenset({T.TYPE_MISMATCH}),
    ),
]

# --- arrays and maps -------------------------------------------------------------------------
PAIRS += [
    Pair("array-same", arr("string"), arr("string"), True, True, "same items"),
    Pair(
        "array-items-promoted",
        arr("long"),
        arr("int"),
        True,
        False,
        "array items resolve recursively",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "array-items-changed",
        arr("string"),
        arr("int"),
        False,
        False,
        "array items must resolve",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "array-vs-map",
        arr("string"),
        mapof("string"),
        False,
        False,
        "an array never reads a map",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "array-of-records-add-default",
        arr(rec("I", fld("a", "int"), fld("b", "int", default=0))),
        arr(rec("I", fld("a", "int"))),
        True,
        True,
        "records inside arrays resolve recursively",
    ),
    Pair("map-same", mapof("double"), mapof("double"), True, True, "same values"),
    Pair(
        "map-values-promoted",
        mapof("double"),
        mapof("float"),
        True,
        False,
        "map values resolve recursively",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "map-values-changed",
        mapof("boolean"),
        mapof("int"),
        False,
        False,
        "map values must resolve",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "map-vs-string",
        mapof("string"),
        "string",
        False,
        False,
        "a map never reads a primitive",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "map-of-arrays-promoted",
        mapof(arr("double")),
        mapof(arr("long")),
        True,
        False,
        "nested containers resolve all the way down",
        frozenset({T.TYPE_MISMATCH}),
    ),
]

# --- unions ----------------------------------------------------------------------------------
PAIRS += [
    Pair(
        "union-same",
        ["null", "string"],
        ["null", "string"],
        True,
        True,
        "identical unions",
    ),
    Pair(
        "union-reordered",
        ["string", "null"],
        ["null", "string"],
        True,
        True,
        "union branches match by type, not position",
    ),
    Pair(
        "union-add-branch",
        ["null", "string", "int"],
        ["null", "string"],
        True,
        False,
        "each writer branch needs a reader branch: the old reader lacks int",
        frozenset({T.MISSING_UNION_BRANCH}),
    ),
    Pair(
        "union-branch-promoted",
        ["null", "long"],
        ["null", "int"],
        True,
        False,
        "a writer int branch is read by the reader long branch",
        frozenset({T.MISSING_UNION_BRANCH}),
    ),
    Pair(
        "primitive-into-union",
        ["null", "string"],
        "string",
        True,
        False,
        "a reader union reads a writer value of one of its branches; the reverse fails on null",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "primitive-into-union-promoted",
        ["null", "double"],
        "int",
        True,
        False,
        "a reader union branch may promote the writer value",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "primitive-not-in-union",
        ["null", "string"],
        "boolean",
        False,
        False,
        "no reader union branch can read boolean",
        frozenset({T.MISSING_UNION_BRANCH, T.TYPE_MISMATCH}),
    ),
    Pair(
        "union-single-branch",
        ["string"],
        "string",
        True,
        True,
        "a one-branch union resolves like its branch",
    ),
    Pair(
        "union-with-records",
        ["null", rec("A", fld("x", "int")), rec("B", fld("y", "int"))],
        ["null", rec("A", fld("x", "int"))],
        True,
        False,
        "named branches are matched by name",
        frozenset({T.MISSING_UNION_BRANCH}),
    ),
    Pair(
        "union-record-branch-missing-default",
        ["null", rec("A", fld("x", "int"), fld("z", "int"))],
        ["null", rec("A", fld("x", "int"))],
        False,
        True,
        "an incompatible change hidden inside a union branch is still found",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
    ),
    Pair(
        "union-nested-in-record-changed",
        rec("R", fld("v", ["null", "long"], default=None)),
        rec("R", fld("v", ["null", "string"], default=None)),
        False,
        False,
        "a union field's branches changed type",
        frozenset({T.MISSING_UNION_BRANCH}),
    ),
    Pair(
        "union-of-enum-add-symbol",
        ["null", enum("S", "A", "B", "C")],
        ["null", enum("S", "A", "B")],
        True,
        False,
        "enum rules apply inside union branches",
        frozenset({T.MISSING_ENUM_SYMBOLS}),
    ),
    Pair(
        "union-in-array",
        arr(["null", "int", "string"]),
        arr(["null", "int"]),
        True,
        False,
        "unions nested in arrays",
        frozenset({T.MISSING_UNION_BRANCH}),
    ),
    Pair(
        "union-in-map-in-record",
        rec("M", fld("m", mapof(["null", rec("X", fld("a", "int"), fld("b", "int", default=1))]))),
        rec("M", fld("m", mapof(["null", rec("X", fld("a", "int"))]))),
        True,
        True,
        "deeply nested union of records with a defaulted addition",
    ),
    Pair(
        "union-vs-record",
        rec("A", fld("x", "int")),
        ["null", rec("A", fld("x", "int"))],
        False,
        True,
        "a non-union reader fails when the writer may have written null",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "union-fixed-branches",
        ["null", fixed("F", 4)],
        ["null", fixed("F", 8)],
        False,
        False,
        "fixed size mismatch inside a union",
        frozenset({T.FIXED_SIZE_MISMATCH}),
    ),
]

# --- union defaults --------------------------------------------------------------------------
# A union default must match the union's first branch, which need not be null. A default only
# matters when the reader has a field the writer lacks.
PAIRS += [
    Pair(
        "union-default-string-first",
        rec("R", fld("a", "int"), fld("s", ["string", "null"], default="x")),
        rec("R", fld("a", "int")),
        True,
        True,
        "a reader-only field takes its default 'x', which matches the first branch string",
    ),
    Pair(
        "union-string-first-without-default",
        rec("R", fld("a", "int"), fld("s", ["string", "null"])),
        rec("R", fld("a", "int")),
        False,
        True,
        "a nullable-looking union field is still required when it has no default",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
    ),
    Pair(
        "union-default-long-first-promotes",
        rec("R", fld("a", "int"), fld("n", ["long", "null"], default=0)),
        rec("R", fld("a", "int"), fld("n", ["int", "null"], default=0)),
        True,
        False,
        "defaults are unused when both sides have the field: int widens to long, not back",
        frozenset({T.MISSING_UNION_BRANCH}),
    ),
    Pair(
        "union-default-record-first",
        rec("R", fld("a", "int"), fld("p", [rec("P", fld("x", "int")), "null"], default={"x": 1})),
        rec("R", fld("a", "int")),
        True,
        True,
        "a record default for a union whose first branch is that record fills the missing field",
    ),
    Pair(
        "union-default-reordered-branches",
        rec("R", fld("s", ["string", "null"], default="x")),
        rec("R", fld("s", ["null", "string"], default=None)),
        True,
        True,
        "reordering branches (and the default with them) keeps both directions readable",
    ),
    Pair(
        "union-default-in-nested-record",
        rec("R", fld("in", rec("In", fld("a", "int"), fld("t", ["long", "null"], default=0)))),
        rec("R", fld("in", rec("In", fld("a", "int")))),
        True,
        True,
        "a nested record's reader-only union field takes its long default 0",
    ),
    Pair(
        "union-nested-in-union-record-branch",
        ["null", rec("X", fld("a", "int"), fld("u", ["int", "string"], default=5))],
        ["null", rec("X", fld("a", "int"))],
        True,
        True,
        "a union field inside a union's record branch takes its default from its first branch",
    ),
    Pair(
        "union-nested-in-union-record-branch-no-default",
        ["null", rec("X", fld("a", "int"), fld("u", ["int", "string"]))],
        ["null", rec("X", fld("a", "int"))],
        False,
        True,
        "the same nested union field without a default cannot be filled",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
    ),
]

INVALID: list[Invalid] = [
    Invalid(
        "union-null-default-string-first",
        rec("R", fld("s", ["string", "null"], default=None)),
        "null does not match the first branch string (the default must match the first branch)",
    ),
    Invalid(
        "union-string-default-null-first",
        rec("R", fld("s", ["null", "string"], default="x")),
        "'x' does not match the first branch null, although string is a later branch",
    ),
    Invalid(
        "union-null-default-record-first",
        rec("R", fld("p", [rec("P", fld("x", "int")), "null"], default=None)),
        "null does not match the first branch, record P",
    ),
    Invalid(
        "union-default-in-nested-record-wrong-type",
        rec("R", fld("in", rec("In", fld("t", ["long", "null"], default="0")))),
        "a string does not match the first branch long, also in a nested record",
    ),
]

# --- named type references -------------------------------------------------------------------
ADDR = rec("Address", fld("street", "string"), namespace="ex")
PAIRS += [
    Pair(
        "named-reference-reused",
        rec("Person", fld("home", ADDR), fld("work", "ex.Address"), namespace="ex"),
        rec("Person", fld("home", ADDR), fld("work", "Address"), namespace="ex"),
        True,
        True,
        "a short name resolves in the enclosing namespace to the same type",
    ),
    Pair(
        "named-reference-change-propagates",
        rec(
            "Person",
            fld(
                "home",
                rec("Address", fld("street", "string"), fld("zip", "string"), namespace="ex"),
            ),
            fld("work", "Address"),
            namespace="ex",
        ),
        rec("Person", fld("home", ADDR), fld("work", "Address"), namespace="ex"),
        False,
        True,
        "a change to a named type applies everywhere it is referenced",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
    ),
]

# --- named types from referenced subjects (Confluent `references`) ---------------------------
ADDR_ZIP_REQUIRED = rec("Address", fld("street", "string"), fld("zip", "string"), namespace="ex")
ADDR_ZIP_DEFAULT = rec(
    "Address", fld("street", "string"), fld("zip", "string", default=""), namespace="ex"
)
ORDER = rec("Order", fld("ship", "ex.Address"), namespace="ex")
PAIRS += [
    Pair(
        "referenced-named-type-same",
        ORDER,
        ORDER,
        True,
        True,
        "the same referenced subject version on both sides",
        a_refs=(ADDR,),
        b_refs=(ADDR,),
    ),
    Pair(
        "referenced-vs-inline-named-type",
        ORDER,
        rec("Order", fld("ship", ADDR), namespace="ex"),
        True,
        True,
        "a named type resolves the same whether a reference supplies it or it is inline",
        a_refs=(ADDR,),
    ),
    Pair(
        "referenced-named-type-added-required-field",
        ORDER,
        ORDER,
        False,
        True,
        "a required field added in a newer version of the referenced subject has no default",
        frozenset({T.READER_FIELD_MISSING_DEFAULT_VALUE}),
        a_refs=(ADDR_ZIP_REQUIRED,),
        b_refs=(ADDR,),
    ),
    Pair(
        "referenced-named-type-added-defaulted-field",
        ORDER,
        ORDER,
        True,
        True,
        "a defaulted field added in the referenced subject is filled; the old reader skips it",
        a_refs=(ADDR_ZIP_DEFAULT,),
        b_refs=(ADDR,),
    ),
]

# --- logical types ---------------------------------------------------------------------------
PAIRS += [
    Pair(
        "logical-date-vs-int",
        {"type": "int", "logicalType": "date"},
        "int",
        True,
        True,
        "logical types resolve by their underlying type",
    ),
    Pair(
        "logical-timestamp-vs-long",
        {"type": "long", "logicalType": "timestamp-millis"},
        "long",
        True,
        True,
        "timestamp-millis is a long",
    ),
    Pair(
        "logical-timestamp-millis-vs-micros",
        {"type": "long", "logicalType": "timestamp-micros"},
        {"type": "long", "logicalType": "timestamp-millis"},
        True,
        True,
        "the specification resolves by underlying type only (values are not rescaled)",
    ),
    Pair(
        "logical-date-promoted-to-long",
        "long",
        {"type": "int", "logicalType": "date"},
        True,
        False,
        "the underlying int promotes to long",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "logical-uuid-vs-string",
        {"type": "string", "logicalType": "uuid"},
        "string",
        True,
        True,
        "uuid is a string",
    ),
    Pair(
        "logical-decimal-same",
        dec(10, 2),
        dec(10, 2),
        True,
        True,
        "same precision and scale",
    ),
    Pair(
        "logical-decimal-scale-changed",
        dec(10, 3),
        dec(10, 2),
        False,
        False,
        "decimals resolve only with equal precision and scale (specification)",
        frozenset({T.LOGICAL_TYPE_MISMATCH}),
    ),
    Pair(
        "logical-decimal-precision-changed",
        dec(12, 2),
        dec(10, 2),
        False,
        False,
        "decimals resolve only with equal precision and scale (specification)",
        frozenset({T.LOGICAL_TYPE_MISMATCH}),
    ),
    Pair(
        "logical-decimal-vs-bytes",
        dec(10, 2),
        "bytes",
        True,
        True,
        "a decimal reads plain bytes (only two decimals are compared)",
    ),
    Pair(
        "logical-decimal-fixed-vs-bytes",
        dec(10, 2, fixed("D", 8)),
        dec(10, 2),
        False,
        False,
        "fixed and bytes are different underlying types",
        frozenset({T.TYPE_MISMATCH}),
    ),
    Pair(
        "logical-decimal-fixed-scale",
        dec(10, 2, fixed("D", 8)),
        dec(10, 4, fixed("D", 8)),
        False,
        False,
        "decimal scale mismatch on fixed",
        frozenset({T.LOGICAL_TYPE_MISMATCH}),
    ),
    Pair(
        "logical-invalid-decimal-ignored",
        {"type": "bytes", "logicalType": "decimal", "precision": 2, "scale": 5},
        dec(10, 2),
        True,
        True,
        "an invalid logical type is ignored: the reader is plain bytes",
    ),
]


def _expand(pairs: list[Pair]) -> list[Case]:
    cases: list[Case] = []
    for pair in pairs:
        cases.append(
            Case(
                f"{pair.name}[A<-B]",
                pair.a,
                pair.b,
                pair.a_reads_b,
                pair.reason,
                frozenset() if pair.a_reads_b else pair.kinds,
                pair.a_refs,
                pair.b_refs,
            )
        )
        cases.append(
            Case(
                f"{pair.name}[B<-A]",
                pair.b,
                pair.a,
                pair.b_reads_a,
                pair.reason,
                frozenset() if pair.b_reads_a else pair.kinds,
                pair.b_refs,
                pair.a_refs,
            )
        )
    return cases


CASES: list[Case] = _expand(PAIRS)
