"""Avro reader/writer compatibility and the registry's seven compatibility levels.

``reader_incompatibilities(reader, writer)`` answers "can data written with ``writer`` be read
with ``reader``?" following the specification's schema-resolution rules. The incompatibility
types and locations (JSON-pointer-like paths into the reader schema) mirror Avro Java's
``SchemaCompatibility``, which Confluent reports in verbose mode, so operators see familiar
messages. Where the Java implementation is laxer than the specification we follow the
specification, because the consumers of this platform decode with fastavro, which enforces it:

* named types match by *full* name (or a reader alias of the writer's full name), not by the
  unqualified name;
* two ``decimal`` schemas must agree on precision and scale.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from schema_registry.avro_schema import (
    Array,
    AvroType,
    Enum,
    Fixed,
    LogicalType,
    Map,
    Primitive,
    Record,
    Union,
    describe,
    short_name,
)


class IncompatibilityType(enum.StrEnum):
    NAME_MISMATCH = "NAME_MISMATCH"
    FIXED_SIZE_MISMATCH = "FIXED_SIZE_MISMATCH"
    MISSING_ENUM_SYMBOLS = "MISSING_ENUM_SYMBOLS"
    READER_FIELD_MISSING_DEFAULT_VALUE = "READER_FIELD_MISSING_DEFAULT_VALUE"
    TYPE_MISMATCH = "TYPE_MISMATCH"
    MISSING_UNION_BRANCH = "MISSING_UNION_BRANCH"
    LOGICAL_TYPE_MISMATCH = "LOGICAL_TYPE_MISMATCH"


@dataclass(frozen=True, slots=True)
class Incompatibility:
    type: IncompatibilityType
    location: str
    message: str
    reader: str
    writer: str

    def render(self) -> str:
        return (
            f"Incompatibility{{type:{self.type}, location:{self.location}, "
            f"message:{self.message}, reader:{self.reader}, writer:{self.writer}}}"
        )


# Writer type -> reader types that can read it (specification "promotions").
_PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}


def reader_incompatibilities(reader: AvroType, writer: AvroType) -> list[Incompatibility]:
    """Everything that stops ``reader`` from reading data written with ``writer``."""
    return _Checker().check(reader, writer, "")


def can_read(reader: AvroType, writer: AvroType) -> bool:
    return not reader_incompatibilities(reader, writer)


class _Checker:
    def __init__(self) -> None:
        # Pairs being checked further up the stack. Recursive records meet themselves again;
        # the pair is assumed compatible there and any real problem is found at the first visit.
        self._in_progress: set[tuple[int, int]] = set()
        self._done: dict[tuple[int, int], bool] = {}

    def check(self, reader: AvroType, writer: AvroType, location: str) -> list[Incompatibility]:
        key = (id(reader), id(writer))
        if key in self._in_progress or self._done.get(key) is True:
            return []
        self._in_progress.add(key)
        try:
            found = self._check(reader, writer, location)
        finally:
            self._in_progress.discard(key)
        self._done[key] = not found
        return found

    def _check(self, reader: AvroType, writer: AvroType, loc: str) -> list[Incompatibility]:
        if isinstance(writer, Union):
            if isinstance(reader, Union):
                return self._union_to_union(reader, writer, loc)
            # Every value the writer may have written must be readable.
            found: list[Incompatibility] = []
            for branch in writer.branches:
                found += self.check(reader, branch, loc)
            return found
        if isinstance(reader, Union):
            for branch in reader.branches:
                if not self.check(branch, writer, loc):
                    return []
            return [
                _issue(
                    IncompatibilityType.MISSING_UNION_BRANCH,
                    loc,
                    f"reader union lacking writer type: {describe(writer).upper()}",
                    reader,
                    writer,
                )
            ]
        if isinstance(reader, Primitive) and isinstance(writer, Primitive):
            return self._primitives(reader, writer, loc)
        if isinstance(reader, Record) and isinstance(writer, Record):
            return self._records(reader, writer, loc)
        if isinstance(reader, Enum) and isinstance(writer, Enum):
            return self._enums(reader, writer, loc)
        if isinstance(reader, Fixed) and isinstance(writer, Fixed):
            return self._fixed(reader, writer, loc)
        if isinstance(reader, Array) and isinstance(writer, Array):
            return self.check(reader.items, writer.items, f"{loc}/items")
        if isinstance(reader, Map) and isinstance(writer, Map):
            return self.check(reader.values, writer.values, f"{loc}/values")
        return [_type_mismatch(reader, writer, loc)]

    def _union_to_union(self, reader: Union, writer: Union, loc: str) -> list[Incompatibility]:
        found: list[Incompatibility] = []
        for index, branch in enumerate(writer.branches):
            where = f"{loc}/{index}"
            missing = self.check(reader, branch, where)
            if not missing:
                continue
            best = _closest_branch(reader, branch)
            # A branch of the same kind exists but differs inside (a nested record lost a
            # default, say): report that nested cause, not only "missing branch".
            found += self.check(best, branch, where) if best is not None else missing
        return found

    def _primitives(self, reader: Primitive, writer: Primitive, loc: str) -> list[Incompatibility]:
        if reader.type != writer.type and reader.type not in _PROMOTIONS.get(writer.type, ()):
            return [_type_mismatch(reader, writer, loc)]
        return _decimal_check(reader.logical, writer.logical, reader, writer, loc)

    def _names(
        self, reader: Record | Enum | Fixed, writer: Record | Enum | Fixed, loc: str
    ) -> list[Incompatibility]:
        if reader.fullname == writer.fullname or writer.fullname in reader.aliases:
            return []
        return [
            _issue(
                IncompatibilityType.NAME_MISMATCH,
                f"{loc}/name",
                f"expected: {writer.fullname}",
                reader,
                writer,
            )
        ]

    def _records(self, reader: Record, writer: Record, loc: str) -> list[Incompatibility]:
        found = self._names(reader, writer, loc)
        writer_fields = {f.name: f for f in writer.fields}
        for fld in reader.fields:
            where = f"{loc}/fields/{fld.position}"
            source = writer_fields.get(fld.name)
            if source is None:
                source = next((writer_fields[a] for a in fld.aliases if a in writer_fields), None)
            if source is None:
                if not fld.has_default:
                    found.append(
                        _issue(
                            IncompatibilityType.READER_FIELD_MISSING_DEFAULT_VALUE,
                            where,
                            fld.name,
                            reader,
                            writer,
                        )
                    )
                continue
            found += self.check(fld.type, source.type, f"{where}/type")
        return found

    def _enums(self, reader: Enum, writer: Enum, loc: str) -> list[Incompatibility]:
        found = self._names(reader, writer, loc)
        missing = sorted(set(writer.symbols) - set(reader.symbols))
        if missing and reader.default is None:
            found.append(
                _issue(
                    IncompatibilityType.MISSING_ENUM_SYMBOLS,
                    f"{loc}/symbols",
                    f"[{', '.join(missing)}]",
                    reader,
                    writer,
                )
            )
        return found

    def _fixed(self, reader: Fixed, writer: Fixed, loc: str) -> list[Incompatibility]:
        found = self._names(reader, writer, loc)
        if reader.size != writer.size:
            found.append(
                _issue(
                    IncompatibilityType.FIXED_SIZE_MISMATCH,
                    f"{loc}/size",
                    f"expected: {writer.size}, found: {reader.size}",
                    reader,
                    writer,
                )
            )
        return found + _decimal_check(reader.logical, writer.logical, reader, writer, loc)


def _closest_branch(reader: Union, writer: AvroType) -> AvroType | None:
    """The reader branch the writer's value would be resolved to, if one has its kind/name."""
    for branch in reader.branches:
        if isinstance(writer, Record | Enum | Fixed) and isinstance(branch, type(writer)):
            if short_name(branch.fullname) == short_name(writer.fullname):
                return branch
        elif (
            type(branch) is type(writer)
            and not isinstance(branch, Record | Enum | Fixed)
            and (not isinstance(branch, Primitive) or branch.type == writer.type)
        ):
            return branch
    return None


def _decimal_check(
    reader_logical: LogicalType | None,
    writer_logical: LogicalType | None,
    reader: AvroType,
    writer: AvroType,
    loc: str,
) -> list[Incompatibility]:
    if (
        reader_logical is not None
        and writer_logical is not None
        and reader_logical.name == writer_logical.name == "decimal"
        and (reader_logical.precision, reader_logical.scale)
        != (writer_logical.precision, writer_logical.scale)
    ):
        return [
            _issue(
                IncompatibilityType.LOGICAL_TYPE_MISMATCH,
                f"{loc}/logicalType",
                f"decimal precision/scale differ: reader ({reader_logical.precision},"
                f" {reader_logical.scale}), writer ({writer_logical.precision},"
                f" {writer_logical.scale})",
                reader,
                writer,
            )
        ]
    return []


def _type_mismatch(reader: AvroType, writer: AvroType, loc: str) -> Incompatibility:
    return _issue(
        IncompatibilityType.TYPE_MISMATCH,
        loc or "/",
        f"reader type: {describe(reader).upper()} not compatible with writer type:"
        f" {describe(writer).upper()}",
        reader,
        writer,
    )


def _issue(
    kind: IncompatibilityType, loc: str, message: str, reader: AvroType, writer: AvroType
) -> Incompatibility:
    return Incompatibility(kind, loc or "/", message, describe(reader), describe(writer))


# ---------------------------------------------------------------------------------------------
# Levels


class CompatibilityLevel(enum.StrEnum):
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")

    @property
    def new_reads_old(self) -> bool:
        return self in _BACKWARD_LIKE

    @property
    def old_reads_new(self) -> bool:
        return self in _FORWARD_LIKE


_BACKWARD_LIKE = frozenset(
    {
        CompatibilityLevel.BACKWARD,
        CompatibilityLevel.BACKWARD_TRANSITIVE,
        CompatibilityLevel.FULL,
        CompatibilityLevel.FULL_TRANSITIVE,
    }
)
_FORWARD_LIKE = frozenset(
    {
        CompatibilityLevel.FORWARD,
        CompatibilityLevel.FORWARD_TRANSITIVE,
        CompatibilityLevel.FULL,
        CompatibilityLevel.FULL_TRANSITIVE,
    }
)


@dataclass(frozen=True, slots=True)
class ExistingSchema:
    """A live (not soft-deleted) version to check against; ``text`` goes into messages."""

    version: int
    schema: AvroType
    text: str


def check_level(
    new: AvroType,
    existing: Sequence[ExistingSchema],
    level: CompatibilityLevel,
    *,
    all_versions: bool | None = None,
) -> list[str]:
    """Messages explaining why ``new`` breaks ``level`` against ``existing`` (oldest first).

    Non-transitive levels look at the newest version only; transitive ones at every version.
    ``all_versions`` overrides that choice (the test-against-one-version endpoint passes a
    single version and wants it checked whatever the level says).
    """
    if level is CompatibilityLevel.NONE or not existing:
        return []
    transitive = level.transitive if all_versions is None else all_versions
    targets = list(existing) if transitive else [existing[-1]]
    messages: list[str] = []
    for old in reversed(targets):
        found: list[Incompatibility] = []
        if level.new_reads_old:
            found += reader_incompatibilities(new, old.schema)
        if level.old_reads_new:
            found += reader_incompatibilities(old.schema, new)
        if found:
            messages += [issue.render() for issue in found]
            messages.append(f"{{oldSchemaVersion: {old.version}}}")
            messages.append(f"{{oldSchema: '{old.text}'}}")
            messages.append(f"{{compatibility: '{level.value}'}}")
    return messages
