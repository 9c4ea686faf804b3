"""Avro schema parsing, validation and canonical forms (Avro specification 1.11/1.12).

The registry parses schemas itself rather than through fastavro so that it controls three
things clients depend on: the exact validation (a union default must match the first branch,
every default must fit its type), how named types from ``references`` are made visible to the
schema being parsed, and the canonical forms that give schemas their global ids.

Named types are shared objects: a name used twice refers to the same :class:`Record`,
:class:`Enum` or :class:`Fixed`, so a parsed schema is a graph (recursive records are cycles).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import orjson

PRIMITIVES: Final = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1

# Attributes the specification gives a meaning to, per kind of schema object. Anything
# else is a custom attribute (Avro keeps them, e.g. the platform's `"personal": true`): it
# is part of a schema's identity, so two schemas differing only in one get two ids.
_COMMON_ATTRS: Final = frozenset({"type", "doc"})
_NAMED_ATTRS: Final = _COMMON_ATTRS | {"name", "namespace", "aliases"}
_LOGICAL_ATTRS: Final = frozenset({"logicalType", "precision", "scale"})
_RESERVED_ATTRS: Final[dict[str, frozenset[str]]] = {
    "primitive": _COMMON_ATTRS | _LOGICAL_ATTRS,
    "record": _NAMED_ATTRS | {"fields"},
    "enum": _NAMED_ATTRS | {"symbols", "default"},
    "fixed": _NAMED_ATTRS | {"size"} | _LOGICAL_ATTRS,
    "array": _COMMON_ATTRS | {"items"},
    "map": _COMMON_ATTRS | {"values"},
    "field": frozenset({"name", "type", "default", "doc", "aliases", "order"}),
}

# The logical types of the specification and the underlying types they annotate. A logical
# type on any other underlying type is ignored, as the specification requires.
_LOGICAL_ON: Final[dict[str, frozenset[str]]] = {
    "decimal": frozenset({"bytes", "fixed"}),
    "big-decimal": frozenset({"bytes"}),
    "uuid": frozenset({"string", "fixed"}),
    "date": frozenset({"int"}),
    "time-millis": frozenset({"int"}),
    "time-micros": frozenset({"long"}),
    "timestamp-millis": frozenset({"long"}),
    "timestamp-micros": frozenset({"long"}),
    "timestamp-nanos": frozenset({"long"}),
    "local-timestamp-millis": frozenset({"long"}),
    "local-timestamp-micros": frozenset({"long"}),
    "local-timestamp-nanos": frozenset({"long"}),
    "duration": frozenset({"fixed"}),
}


class SchemaParseError(ValueError):
    """The text is not a valid Avro schema; the message says where and why."""


class _NoDefault:
    """Marker for "this field has no default" (``None`` is the null default)."""

    _instance: _NoDefault | None = None

    def __new__(cls) -> _NoDefault:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Final = _NoDefault()


@dataclass(frozen=True, slots=True)
class LogicalType:
    """A valid logical type annotation; invalid ones are dropped while parsing."""

    name: str
    precision: int | None = None
    scale: int | None = None


@dataclass(eq=False, slots=True)
class Primitive:
    type: str
    logical: LogicalType | None = None
    props: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Field:
    name: str
    type: AvroType
    default: Any = NO_DEFAULT
    aliases: tuple[str, ...] = ()
    order: str = "ascending"
    position: int = 0
    props: dict[str, Any] = field(default_factory=dict)

    @property
    def has_default(self) -> bool:
        return self.default is not NO_DEFAULT


@dataclass(eq=False, slots=True)
class Record:
    fullname: str
    aliases: tuple[str, ...] = ()
    fields: list[Field] = field(default_factory=list)
    is_error: bool = False
    type: str = "record"
    props: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Enum:
    fullname: str
    symbols: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    default: str | None = None
    type: str = "enum"
    props: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Fixed:
    fullname: str
    size: int
    aliases: tuple[str, ...] = ()
    logical: LogicalType | None = None
    type: str = "fixed"
    props: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Array:
    items: AvroType
    type: str = "array"
    props: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Map:
    values: AvroType
    type: str = "map"
    props: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Union:
    branches: tuple[AvroType, ...]
    type: str = "union"


AvroType: TypeAlias = Primitive | Record | Enum | Fixed | Array | Map | Union
NamedType: TypeAlias = Record | Enum | Fixed


def short_name(fullname: str) -> str:
    return fullname.rpartition(".")[2]


def namespace_of(fullname: str) -> str:
    return fullname.rpartition(".")[0]


def describe(schema: AvroType) -> str:
    """A short human name for messages: the full name for named types, else the type."""
    if isinstance(schema, Record | Enum | Fixed):
        return f"{schema.type} {schema.fullname}"
    if isinstance(schema, Primitive):
        return schema.type
    return schema.type


@dataclass(slots=True)
class ParsedSchema:
    """A parsed schema plus the named types it defines (usable by schemas that reference it)."""

    root: AvroType
    defined: dict[str, NamedType]
    json: Any


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_schema(text: str, known: Mapping[str, NamedType] | None = None) -> ParsedSchema:
    """Parse and validate ``text``; ``known`` holds named types defined by referenced schemas."""
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise SchemaParseError(f"not valid JSON: {exc}") from exc
    parser = _Parser(dict(known or {}))
    root = parser.parse(document, "", "")
    return ParsedSchema(root=root, defined=parser.defined, json=document)


class _Parser:
    def __init__(self, known: dict[str, NamedType]) -> None:
        self.names: dict[str, NamedType] = known
        self.defined: dict[str, NamedType] = {}
        # Defaults are checked after the whole schema is parsed: a default may use a named
        # type whose fields are still being parsed (recursive records).
        self.pending_defaults: list[tuple[Field, str]] = []

    def parse(self, node: Any, namespace: str, path: str) -> AvroType:
        root = self._parse(node, namespace, path or "/")
        for fld, where in self.pending_defaults:
            problem = default_problem(fld.type, fld.default)
            if problem is not None:
                raise SchemaParseError(
                    f"invalid default for field '{fld.name}' at {where}: {problem}"
                )
        return root

    def _parse(self, node: Any, namespace: str, path: str) -> AvroType:
        if isinstance(node, str):
            return self._parse_name(node, namespace, path)
        if isinstance(node, list):
            return self._parse_union(node, namespace, path)
        if not isinstance(node, dict):
            raise SchemaParseError(f"{path}: expected a type name, object or array, got {node!r}")
        type_attr = node.get("type")
        if type_attr is None:
            raise SchemaParseError(f"{path}: missing 'type'")
        if isinstance(type_attr, (dict, list)):
            # {"type": {"type": "int"}} wraps another schema; Avro implementations accept it.
            return self._parse(type_attr, namespace, f"{path}/type")
        if not isinstance(type_attr, str):
            raise SchemaParseError(f"{path}: 'type' must be a string, got {type_attr!r}")
        if type_attr in PRIMITIVES:
            return Primitive(
                type_attr, self._logical(node, type_attr, None), custom_props(node, "primitive")
            )
        if type_attr in ("record", "error"):
            return self._parse_record(node, namespace, path, type_attr == "error")
        if type_attr == "enum":
            return self._parse_enum(node, namespace, path)
        if type_attr == "fixed":
            return self._parse_fixed(node, namespace, path)
        if type_attr == "array":
            if "items" not in node:
                raise SchemaParseError(f"{path}: array without 'items'")
            return Array(
                self._parse(node["items"], namespace, f"{path}/items"),
                props=custom_props(node, "array"),
            )
        if type_attr == "map":
            if "values" not in node:
                raise SchemaParseError(f"{path}: map without 'values'")
            return Map(
                self._parse(node["values"], namespace, f"{path}/values"),
                props=custom_props(node, "map"),
            )
        # {"type": "com.example.Foo"} refers to a named type.
        return self._parse_name(type_attr, namespace, path)

    def _parse_name(self, name: str, namespace: str, path: str) -> AvroType:
        if name in PRIMITIVES:
            return Primitive(name)
        candidates = [name] if "." in name else [_join(namespace, name), name]
        for candidate in candidates:
            found = self.names.get(candidate)
            if found is not None:
                return found
        raise SchemaParseError(f"{path}: unknown type '{name}'")

    def _parse_union(self, node: list[Any], namespace: str, path: str) -> Union:
        branches: list[AvroType] = []
        seen: set[str] = set()
        for index, item in enumerate(node):
            branch = self._parse(item, namespace, f"{path}/{index}")
            if isinstance(branch, Union):
                raise SchemaParseError(
                    f"{path}/{index}: a union may not immediately contain a union"
                )
            key = branch.fullname if isinstance(branch, Record | Enum | Fixed) else branch.type
            if key in seen:
                raise SchemaParseError(f"{path}: duplicate union branch '{key}'")
            seen.add(key)
            branches.append(branch)
        return Union(tuple(branches))

    def _define_name(self, node: dict[str, Any], namespace: str, path: str) -> tuple[str, str]:
        name = node.get("name")
        if not isinstance(name, str) or not name:
            raise SchemaParseError(f"{path}: named type without a valid 'name'")
        if "." in name:
            fullname = name
        else:
            explicit = node.get("namespace")
            if explicit is not None and not isinstance(explicit, str):
                raise SchemaParseError(f"{path}: 'namespace' must be a string")
            fullname = _join(explicit if explicit is not None else namespace, name)
        for part in fullname.split("."):
            if not _NAME_RE.match(part):
                raise SchemaParseError(f"{path}: invalid name '{fullname}'")
        if short_name(fullname) in PRIMITIVES:
            raise SchemaParseError(f"{path}: '{fullname}' redefines a primitive type")
        if fullname in self.names:
            raise SchemaParseError(f"{path}: '{fullname}' is defined more than once")
        return fullname, namespace_of(fullname)

    def _aliases(self, node: dict[str, Any], namespace: str, path: str) -> tuple[str, ...]:
        aliases = node.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise SchemaParseError(f"{path}: 'aliases' must be a list of strings")
        return tuple(a if "." in a else _join(namespace, a) for a in aliases)

    def _register(self, named: NamedType) -> None:
        self.names[named.fullname] = named
        self.defined[named.fullname] = named

    def _parse_record(
        self, node: dict[str, Any], namespace: str, path: str, is_error: bool
    ) -> Record:
        fullname, own_namespace = self._define_name(node, namespace, path)
        record = Record(
            fullname,
            self._aliases(node, own_namespace, path),
            is_error=is_error,
            props=custom_props(node, "record"),
        )
        # Registered before the fields so that fields can refer to the record itself.
        self._register(record)
        fields = node.get("fields")
        if not isinstance(fields, list):
            raise SchemaParseError(f"{path}: record '{fullname}' needs a 'fields' list")
        seen: set[str] = set()
        for index, fnode in enumerate(fields):
            where = f"{path}/fields/{index}"
            if not isinstance(fnode, dict):
                raise SchemaParseError(f"{where}: a field must be an object")
            fname = fnode.get("name")
            if not isinstance(fname, str) or not _NAME_RE.match(fname):
                raise SchemaParseError(f"{where}: invalid field name {fname!r}")
            if fname in seen:
                raise SchemaParseError(f"{where}: duplicate field '{fname}' in '{fullname}'")
            seen.add(fname)
            if "type" not in fnode:
                raise SchemaParseError(f"{where}: field '{fname}' has no 'type'")
            ftype = self._parse(fnode["type"], own_namespace, f"{where}/type")
            order = fnode.get("order", "ascending")
            if order not in ("ascending", "descending", "ignore"):
                raise SchemaParseError(f"{where}: invalid order {order!r}")
            aliases = fnode.get("aliases", [])
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise SchemaParseError(f"{where}: 'aliases' must be a list of strings")
            fld = Field(
                name=fname,
                type=ftype,
                default=fnode.get("default", NO_DEFAULT),
                aliases=tuple(aliases),
                order=order,
                position=index,
                props=custom_props(fnode, "field"),
            )
            if fld.has_default:
                self.pending_defaults.append((fld, where))
            record.fields.append(fld)
        return record

    def _parse_enum(self, node: dict[str, Any], namespace: str, path: str) -> Enum:
        fullname, own_namespace = self._define_name(node, namespace, path)
        symbols = node.get("symbols")
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise SchemaParseError(f"{path}: enum '{fullname}' needs a 'symbols' list of strings")
        for symbol in symbols:
            if not _NAME_RE.match(symbol):
                raise SchemaParseError(f"{path}: invalid enum symbol '{symbol}'")
        if len(set(symbols)) != len(symbols):
            raise SchemaParseError(f"{path}: duplicate symbols in enum '{fullname}'")
        default = node.get("default")
        if default is not None and default not in symbols:
            raise SchemaParseError(
                f"{path}: enum default '{default}' is not a symbol of '{fullname}'"
            )
        enum = Enum(
            fullname,
            tuple(symbols),
            self._aliases(node, own_namespace, path),
            default,
            props=custom_props(node, "enum"),
        )
        self._register(enum)
        return enum

    def _parse_fixed(self, node: dict[str, Any], namespace: str, path: str) -> Fixed:
        fullname, own_namespace = self._define_name(node, namespace, path)
        size = node.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise SchemaParseError(f"{path}: fixed '{fullname}' needs a non-negative 'size'")
        fixed = Fixed(
            fullname,
            size,
            self._aliases(node, own_namespace, path),
            props=custom_props(node, "fixed"),
        )
        fixed.logical = self._logical(node, "fixed", size)
        self._register(fixed)
        return fixed

    @staticmethod
    def _logical(node: dict[str, Any], underlying: str, size: int | None) -> LogicalType | None:
        name = node.get("logicalType")
        if not isinstance(name, str) or underlying not in _LOGICAL_ON.get(name, frozenset()):
            return None
        if name == "decimal":
            precision, scale = node.get("precision"), node.get("scale", 0)
            if not isinstance(precision, int) or isinstance(precision, bool) or precision < 1:
                return None
            if not isinstance(scale, int) or isinstance(scale, bool) or not 0 <= scale <= precision:
                return None
            if size is not None and precision > math.floor(math.log10(2) * (8 * size - 1)):
                return None
            return LogicalType(name, precision, scale)
        if name == "duration" and size != 12:
            return None
        if name == "uuid" and underlying == "fixed" and size != 16:
            return None
        return LogicalType(name)


def custom_props(node: dict[str, Any], kind: str) -> dict[str, Any]:
    """The custom attributes of a schema object, normalised: sorted keys at every level."""
    reserved = _RESERVED_ATTRS[kind]
    return {key: _normalised(node[key]) for key in sorted(node) if key not in reserved}


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _normalised(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_normalised(item) for item in value]
    return value


def _join(namespace: str, name: str) -> str:
    return f"{namespace}.{name}" if namespace else name


# ---------------------------------------------------------------------------------------------
# Default values


def default_problem(schema: AvroType, value: Any) -> str | None:
    """Why ``value`` is not a valid default for ``schema`` (JSON encoding), or None if it is."""
    return _default_problem(schema, value, set())


def _default_problem(schema: AvroType, value: Any, active: set[int]) -> str | None:
    if isinstance(schema, Primitive):
        return _primitive_default_problem(schema.type, value)
    if isinstance(schema, Union):
        # The specification: a union's default corresponds to its first branch.
        if not schema.branches:
            return "an empty union has no valid default"
        problem = _default_problem(schema.branches[0], value, active)
        if problem is not None:
            first = describe(schema.branches[0])
            return f"a union default must match the first branch ({first}): {problem}"
        return None
    if isinstance(schema, Enum):
        if not isinstance(value, str) or value not in schema.symbols:
            return f"{value!r} is not a symbol of enum {schema.fullname}"
        return None
    if isinstance(schema, Fixed):
        if not isinstance(value, str) or len(value) != schema.size:
            return f"expected a string of {schema.size} characters for fixed {schema.fullname}"
        if any(ord(ch) > 255 for ch in value):
            return "fixed defaults use code points 0-255"
        return None
    if isinstance(schema, Array):
        if not isinstance(value, list):
            return f"expected a JSON array, got {value!r}"
        for item in value:
            problem = _default_problem(schema.items, item, active)
            if problem is not None:
                return problem
        return None
    if isinstance(schema, Map):
        if not isinstance(value, dict):
            return f"expected a JSON object, got {value!r}"
        for item in value.values():
            problem = _default_problem(schema.values, item, active)
            if problem is not None:
                return problem
        return None
    # Record
    if not isinstance(value, dict):
        return f"expected a JSON object for record {schema.fullname}, got {value!r}"
    for fld in schema.fields:
        if fld.name in value:
            problem = _default_problem(fld.type, value[fld.name], active)
            if problem is not None:
                return f"field {fld.name}: {problem}"
        elif not fld.has_default:
            return f"missing field '{fld.name}' of record {schema.fullname}"
    return None


def _primitive_default_problem(type_name: str, value: Any) -> str | None:
    ok: bool
    if type_name == "null":
        ok = value is None
    elif type_name == "boolean":
        ok = isinstance(value, bool)
    elif type_name == "int":
        ok = (
            isinstance(value, int) and not isinstance(value, bool) and _INT_MIN <= value <= _INT_MAX
        )
    elif type_name == "long":
        ok = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and _LONG_MIN <= value <= _LONG_MAX
        )
    elif type_name in ("float", "double"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif type_name == "bytes":
        ok = isinstance(value, str) and all(ord(ch) <= 255 for ch in value)
    else:  # string
        ok = isinstance(value, str)
    return None if ok else f"{value!r} is not a valid {type_name}"


# ---------------------------------------------------------------------------------------------
# Canonical forms


def parsing_canonical_form(schema: AvroType) -> str:
    """The specification's Parsing Canonical Form (PCF): what determines how bytes are read."""
    return orjson.dumps(_canonical(schema, set(), extended=False)).decode()


def registry_canonical_form(schema: AvroType) -> str:
    """PCF plus the attributes that change how data resolves or is handled: the identity key.

    PCF strips ``default``, ``aliases``, logical types and custom attributes. Two schemas
    differing only in those would share an id, and a deserializer fetching that id would get
    the other text: a date read back as a plain int, a default the consumer relies on
    missing, a field marked ``"personal": true`` served without its mark. So the identity
    keeps them (in a fixed order, custom attributes after the standard ones with their keys
    sorted); docs, whitespace, key order, ``"string"`` vs ``{"type": "string"}`` and short
    vs full names still canonicalise away.
    """
    return orjson.dumps(_canonical(schema, set(), extended=True)).decode()


def _canonical(schema: AvroType, seen: set[str], *, extended: bool) -> Any:
    if isinstance(schema, Primitive):
        if extended and (schema.logical is not None or schema.props):
            logical = _logical_json(schema.logical) if schema.logical is not None else {}
            return {"type": schema.type, **logical, **schema.props}
        return schema.type
    if isinstance(schema, Union):
        return [_canonical(b, seen, extended=extended) for b in schema.branches]
    if isinstance(schema, Array):
        items = _canonical(schema.items, seen, extended=extended)
        return {"type": "array", "items": items, **(schema.props if extended else {})}
    if isinstance(schema, Map):
        values = _canonical(schema.values, seen, extended=extended)
        return {"type": "map", "values": values, **(schema.props if extended else {})}
    if schema.fullname in seen:
        return schema.fullname
    seen.add(schema.fullname)
    out: dict[str, Any] = {"name": schema.fullname}
    if isinstance(schema, Record):
        out["type"] = "error" if schema.is_error else "record"
        fields = []
        for fld in schema.fields:
            fjson: dict[str, Any] = {
                "name": fld.name,
                "type": _canonical(fld.type, seen, extended=extended),
            }
            if extended:
                if fld.has_default:
                    fjson["default"] = fld.default
                if fld.aliases:
                    fjson["aliases"] = sorted(fld.aliases)
                fjson.update(fld.props)
            fields.append(fjson)
        out["fields"] = fields
    elif isinstance(schema, Enum):
        out["type"] = "enum"
        out["symbols"] = list(schema.symbols)
        if extended and schema.default is not None:
            out["default"] = schema.default
    else:
        out["type"] = "fixed"
        out["size"] = schema.size
        if extended and schema.logical is not None:
            out.update(_logical_json(schema.logical))
    if extended:
        if schema.aliases:
            out["aliases"] = sorted(schema.aliases)
        out.update(schema.props)
    return out


def _logical_json(logical: LogicalType) -> dict[str, Any]:
    out: dict[str, Any] = {"logicalType": logical.name}
    if logical.precision is not None:
        out["precision"] = logical.precision
    if logical.scale is not None:
        out["scale"] = logical.scale
    return out


def fingerprint(canonical: str, references: Iterable[tuple[str, str, int]] = ()) -> str:
    """The content address of a schema: its canonical form plus the references it resolves.

    The same text with references to different subject versions is a different schema.
    """
    digest = hashlib.sha256(canonical.encode())
    for name, subject, version in references:
        digest.update(orjson.dumps([name, subject, version]))
    return digest.hexdigest()


def iter_named(schema: AvroType) -> Iterable[NamedType]:
    """Every named type reachable from ``schema``, each once."""
    seen: set[int] = set()
    stack: list[AvroType] = [schema]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Record):
            yield node
            stack.extend(f.type for f in node.fields)
        elif isinstance(node, Enum | Fixed):
            yield node
        elif isinstance(node, Array):
            stack.append(node.items)
        elif isinstance(node, Map):
            stack.append(node.values)
        elif isinstance(node, Union):
            stack.extend(node.branches)
