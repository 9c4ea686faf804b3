"""The registry's domain logic, independent of HTTP: Confluent Schema Registry semantics.

Every public method maps to one REST operation and returns plain JSON-ready data or raises
:class:`~schema_registry.errors.RegistryError`. Methods are synchronous (the stores are);
the HTTP layer runs them in worker threads.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from schema_registry import errors
from schema_registry.avro_schema import (
    AvroType,
    NamedType,
    SchemaParseError,
    fingerprint,
    parse_schema,
    registry_canonical_form,
)
from schema_registry.compatibility import CompatibilityLevel, ExistingSchema, check_level
from schema_registry.errors import RegistryError
from schema_registry.storage import Reference, Store, StoredSchema, SubjectVersion, Transaction

SUPPORTED_SCHEMA_TYPES: tuple[str, ...] = ("AVRO",)
DEFAULT_COMPATIBILITY = CompatibilityLevel.BACKWARD
MAX_VERSION = 2**31 - 1
LATEST = -1


class Mode(enum.StrEnum):
    READWRITE = "READWRITE"
    READONLY = "READONLY"
    READONLY_OVERRIDE = "READONLY_OVERRIDE"
    IMPORT = "IMPORT"


DEFAULT_MODE = Mode.READWRITE


def parse_version(raw: str) -> int:
    """``latest``/``-1`` -> LATEST, else an int in [1, 2^31-1]; anything else is 42202."""
    if raw == "latest" or raw == "-1":
        return LATEST
    try:
        version = int(raw)
    except ValueError:
        raise errors.invalid_version(raw) from None
    if not 1 <= version <= MAX_VERSION:
        raise errors.invalid_version(raw)
    return version


def validate_subject(subject: str) -> None:
    if not subject or any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in subject):
        raise errors.invalid_subject(subject)


def parse_level(raw: object) -> CompatibilityLevel:
    if isinstance(raw, str):
        try:
            return CompatibilityLevel(raw.upper())
        except ValueError:
            pass
    raise errors.invalid_compatibility_level(raw)


def parse_mode(raw: object) -> Mode:
    if isinstance(raw, str):
        try:
            return Mode(raw.upper())
        except ValueError:
            pass
    raise errors.invalid_mode(raw)


@dataclass(frozen=True, slots=True)
class SchemaRequest:
    """A register / lookup / compatibility request body, validated for shape.

    Unknown fields (``metadata``, ``ruleSet``, ...) are accepted and ignored, as Confluent
    clients send them.
    """

    schema: str
    references: tuple[Reference, ...] = ()
    schema_id: int | None = None
    version: int | None = None

    @classmethod
    def from_json(cls, body: object) -> SchemaRequest:
        if not isinstance(body, dict):
            raise errors.RegistryError(42201, "Invalid schema: the request body must be an object")
        schema_type = body.get("schemaType") or "AVRO"
        if schema_type not in SUPPORTED_SCHEMA_TYPES:
            raise errors.RegistryError(
                42201,
                f"Invalid schema type {schema_type!r}: this registry supports"
                f" {', '.join(SUPPORTED_SCHEMA_TYPES)} only",
            )
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise errors.RegistryError(42201, "Empty schema")
        raw_refs = body.get("references") or []
        if not isinstance(raw_refs, list):
            raise errors.invalid_schema("'references' must be a list")
        refs: list[Reference] = []
        for raw in raw_refs:
            if (
                not isinstance(raw, dict)
                or not isinstance(raw.get("name"), str)
                or not isinstance(raw.get("subject"), str)
                or not isinstance(raw.get("version"), int)
                or isinstance(raw.get("version"), bool)
            ):
                raise errors.invalid_schema(
                    f"invalid reference {raw!r}: expected {{name, subject, version}}"
                )
            refs.append(Reference(raw["name"], raw["subject"], raw["version"]))
        schema_id = body.get("id")
        version = body.get("version")
        return cls(
            schema=schema,
            references=tuple(refs),
            schema_id=schema_id if isinstance(schema_id, int) and schema_id > 0 else None,
            version=version if isinstance(version, int) and version > 0 else None,
        )


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A request's schema parsed against its resolved references."""

    root: AvroType
    fingerprint: str
    references: tuple[Reference, ...]


class _ParsedCache:
    """Parsed schemas by id. Ids are immutable, so entries never go stale; LRU-bounded."""

    def __init__(self, capacity: int = 2048) -> None:
        self._items: OrderedDict[int, AvroType] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, schema_id: int) -> AvroType | None:
        with self._lock:
            found = self._items.get(schema_id)
            if found is not None:
                self._items.move_to_end(schema_id)
            return found

    def put(self, schema_id: int, root: AvroType) -> None:
        with self._lock:
            self._items[schema_id] = root
            self._items.move_to_end(schema_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


class SchemaRegistry:
    def __init__(self, store: Store, *, max_schema_bytes: int = 1 << 20) -> None:
        self.store = store
        self.max_schema_bytes = max_schema_bytes
        self._parsed = _ParsedCache()

    # -- parsing -----------------------------------------------------------------------------

    def _resolve_references(
        self, tx: Transaction, refs: Iterable[Reference], chain: tuple[tuple[str, int], ...] = ()
    ) -> tuple[tuple[Reference, ...], dict[str, NamedType]]:
        """Pin ``latest`` references to numbers and collect the named types they define."""
        resolved: list[Reference] = []
        known: dict[str, NamedType] = {}
        for ref in refs:
            versions = [v for v in tx.versions(ref.subject) if not v.deleted]
            if ref.version == LATEST:
                target = versions[-1] if versions else None
            else:
                target = next((v for v in versions if v.version == ref.version), None)
            if target is None:
                raise errors.invalid_schema(
                    f"reference {ref.name!r} points to {ref.subject} version {ref.version},"
                    " which does not exist"
                )
            if (target.subject, target.version) in chain:
                raise errors.invalid_schema(f"circular reference through {ref.subject}")
            stored = tx.schema(target.schema_id)
            assert stored is not None
            _, inner_known = self._resolve_references(
                tx, stored.references, (*chain, (target.subject, target.version))
            )
            try:
                parsed = parse_schema(stored.text, inner_known)
            except SchemaParseError as exc:
                raise errors.invalid_schema(f"referenced schema {ref.subject}: {exc}") from exc
            known.update(inner_known)
            known.update(parsed.defined)
            resolved.append(Reference(ref.name, target.subject, target.version))
        return tuple(resolved), known

    def _candidate(self, tx: Transaction, request: SchemaRequest) -> _Candidate:
        size = len(request.schema.encode())
        if size > self.max_schema_bytes:
            raise errors.schema_too_large(size, self.max_schema_bytes)
        refs, known = self._resolve_references(tx, request.references)
        try:
            parsed = parse_schema(request.schema, known)
        except SchemaParseError as exc:
            raise errors.invalid_schema(str(exc)) from exc
        return _Candidate(
            root=parsed.root,
            fingerprint=fingerprint(
                registry_canonical_form(parsed.root),
                ((r.name, r.subject, r.version) for r in refs),
            ),
            references=refs,
        )

    def _parsed_by_id(self, tx: Transaction, schema_id: int) -> AvroType:
        found = self._parsed.get(schema_id)
        if found is not None:
            return found
        stored = tx.schema(schema_id)
        if stored is None:
            raise errors.schema_not_found(schema_id)
        _, known = self._resolve_references(tx, stored.references)
        root = parse_schema(stored.text, known).root
        self._parsed.put(schema_id, root)
        return root

    # -- settings ----------------------------------------------------------------------------

    @staticmethod
    def _level_in_scope(tx: Transaction, subject: str) -> CompatibilityLevel:
        raw = tx.setting("compatibility", subject) or tx.setting("compatibility", None)
        return CompatibilityLevel(raw) if raw else DEFAULT_COMPATIBILITY

    @staticmethod
    def _mode_in_scope(tx: Transaction, subject: str | None) -> Mode:
        global_mode = Mode(tx.setting("mode", None) or DEFAULT_MODE)
        # READONLY_OVERRIDE on the global level wins over every subject's own mode.
        if subject is None or global_mode is Mode.READONLY_OVERRIDE:
            return global_mode
        raw = tx.setting("mode", subject)
        return Mode(raw) if raw else global_mode

    def _require_writable(self, tx: Transaction, subject: str | None) -> None:
        mode = self._mode_in_scope(tx, subject)
        if mode in (Mode.READONLY, Mode.READONLY_OVERRIDE):
            what = f"Subject {subject}" if subject is not None else "The registry"
            raise errors.operation_not_permitted(f"{what} is in read-only mode")

    # -- schemas by id -----------------------------------------------------------------------

    def schema_by_id(self, schema_id: int) -> StoredSchema:
        with self.store.read() as tx:
            stored = tx.schema(schema_id)
            if stored is None or not tx.versions(schema_id=schema_id):
                raise errors.schema_not_found(schema_id)
            return stored

    def subjects_for_id(self, schema_id: int, *, deleted: bool) -> list[str]:
        return sorted({v.subject for v in self._versions_for_id(schema_id, deleted=deleted)})

    def versions_for_id(self, schema_id: int, *, deleted: bool) -> list[dict[str, Any]]:
        return [
            {"subject": v.subject, "version": v.version}
            for v in self._versions_for_id(schema_id, deleted=deleted)
        ]

    def _versions_for_id(self, schema_id: int, *, deleted: bool) -> list[SubjectVersion]:
        with self.store.read() as tx:
            every = tx.versions(schema_id=schema_id)
        if not every:
            raise errors.schema_not_found(schema_id)
        return [v for v in every if deleted or not v.deleted]

    def list_schemas(
        self, *, prefix: str, deleted: bool, latest_only: bool, offset: int, limit: int
    ) -> list[dict[str, Any]]:
        with self.store.read() as tx:
            rows = [
                v
                for v in tx.versions()
                if v.subject.startswith(prefix) and (deleted or not v.deleted)
            ]
            if latest_only:
                latest: dict[str, SubjectVersion] = {}
                for v in rows:
                    latest[v.subject] = v
                rows = list(latest.values())
            rows = _page(rows, offset, limit)
            schemas = {sid: tx.schema(sid) for sid in {v.schema_id for v in rows}}
        out = []
        for v in rows:
            stored = schemas[v.schema_id]
            assert stored is not None
            out.append(_version_json(v, stored))
        return out

    # -- subjects ----------------------------------------------------------------------------

    def list_subjects(
        self, *, prefix: str, deleted: bool, deleted_only: bool, offset: int, limit: int
    ) -> list[str]:
        with self.store.read() as tx:
            versions = tx.versions()
        live: set[str] = set()
        every: set[str] = set()
        for v in versions:
            every.add(v.subject)
            if not v.deleted:
                live.add(v.subject)
        if deleted_only:
            chosen = every - live
        elif deleted:
            chosen = every
        else:
            chosen = live
        return _page(sorted(s for s in chosen if s.startswith(prefix)), offset, limit)

    def list_versions(self, subject: str, *, deleted: bool, deleted_only: bool) -> list[int]:
        with self.store.read() as tx:
            versions = tx.versions(subject)
        if deleted_only:
            chosen = [v.version for v in versions if v.deleted]
        else:
            chosen = [v.version for v in versions if deleted or not v.deleted]
        if not chosen:
            raise errors.subject_not_found(subject)
        return chosen

    def get_version(self, subject: str, version: int, *, deleted: bool) -> dict[str, Any]:
        with self.store.read() as tx:
            found = self._find_version(tx, subject, version, deleted=deleted)
            stored = tx.schema(found.schema_id)
        assert stored is not None
        return _version_json(found, stored)

    def get_version_text(self, subject: str, version: int, *, deleted: bool) -> str:
        return str(self.get_version(subject, version, deleted=deleted)["schema"])

    @staticmethod
    def _find_version(
        tx: Transaction, subject: str, version: int, *, deleted: bool
    ) -> SubjectVersion:
        versions = [v for v in tx.versions(subject) if deleted or not v.deleted]
        if not versions:
            raise errors.subject_not_found(subject)
        if version == LATEST:
            return versions[-1]
        for v in versions:
            if v.version == version:
                return v
        raise errors.version_not_found(version)

    def referenced_by(self, subject: str, version: int) -> list[int]:
        with self.store.read() as tx:
            found = self._find_version(tx, subject, version, deleted=False)
            return tx.referrers(found.subject, found.version, live_only=True)

    def lookup(self, subject: str, request: SchemaRequest, *, deleted: bool) -> dict[str, Any]:
        with self.store.read() as tx:
            versions = [v for v in tx.versions(subject) if deleted or not v.deleted]
            if not versions:
                raise errors.subject_not_found(subject)
            try:
                candidate = self._candidate(tx, request)
            except RegistryError as exc:
                if exc.error_code == 42201:
                    raise errors.RegistryError(
                        42201,
                        f"Error while looking up schema under subject {subject}: {exc.message}",
                    ) from exc
                raise
            schema_id = tx.schema_id_for(candidate.fingerprint)
            match = next((v for v in reversed(versions) if v.schema_id == schema_id), None)
            if schema_id is None or match is None:
                raise errors.schema_not_found()
            stored = tx.schema(schema_id)
        assert stored is not None
        return _version_json(match, stored)

    # -- registration ------------------------------------------------------------------------

    def register(self, subject: str, request: SchemaRequest) -> int:
        validate_subject(subject)
        # Fast path without the write lock: clients re-register on every start.
        with self.store.read() as tx:
            mode = self._mode_in_scope(tx, subject)
            candidate = self._candidate(tx, request)
            if request.schema_id is None and mode is Mode.READWRITE:
                existing = self._live_version_with(tx, subject, candidate.fingerprint)
                if existing is not None:
                    return existing.schema_id
        with self.store.write() as tx:
            return self._register_locked(tx, subject, request)

    @staticmethod
    def _live_version_with(tx: Transaction, subject: str, fp: str) -> SubjectVersion | None:
        schema_id = tx.schema_id_for(fp)
        if schema_id is None:
            return None
        return next(
            (v for v in tx.versions(subject) if v.schema_id == schema_id and not v.deleted), None
        )

    def _register_locked(self, tx: Transaction, subject: str, request: SchemaRequest) -> int:
        mode = self._mode_in_scope(tx, subject)
        if mode in (Mode.READONLY, Mode.READONLY_OVERRIDE):
            raise errors.operation_not_permitted(f"Subject {subject} is in read-only mode")
        if request.schema_id is not None and mode is not Mode.IMPORT:
            raise errors.operation_not_permitted(f"Subject {subject} is not in import mode")
        if request.schema_id is None and mode is not Mode.READWRITE:
            raise errors.operation_not_permitted(f"Subject {subject} is not in read-write mode")
        # Parsed again under the lock: a referenced version may have changed meanwhile.
        candidate = self._candidate(tx, request)
        versions = tx.versions(subject)
        existing_id = tx.schema_id_for(candidate.fingerprint)

        if request.schema_id is not None:
            return self._import(tx, subject, request, request.schema_id, candidate, versions)

        if existing_id is not None:
            for v in versions:
                if v.schema_id == existing_id and not v.deleted:
                    return existing_id

        live = [v for v in versions if not v.deleted]
        level = self._level_in_scope(tx, subject)
        messages = check_level(candidate.root, [self._existing(tx, v) for v in live], level)
        if messages:
            raise errors.incompatible(subject, messages)

        schema_id = existing_id
        if schema_id is None:
            schema_id = tx.add_schema(candidate.fingerprint, request.schema, candidate.references)
            self._parsed.put(schema_id, candidate.root)
        next_version = (versions[-1].version + 1) if versions else 1
        tx.add_version(subject, next_version, schema_id)
        return schema_id

    def _import(
        self,
        tx: Transaction,
        subject: str,
        request: SchemaRequest,
        schema_id: int,
        candidate: _Candidate,
        versions: list[SubjectVersion],
    ) -> int:
        """IMPORT mode: keep the caller's id (and version); no compatibility check."""
        version = request.version
        stored = tx.schema(schema_id)
        if stored is not None and stored.fingerprint != candidate.fingerprint:
            raise errors.id_mismatch(schema_id)
        existing_id = tx.schema_id_for(candidate.fingerprint)
        if stored is None and existing_id is not None:
            # The same content already has another id; two ids for one schema would break
            # content addressing.
            raise errors.id_mismatch(schema_id)
        if stored is None:
            tx.add_schema(candidate.fingerprint, request.schema, candidate.references, schema_id)
            self._parsed.put(schema_id, candidate.root)
        if version is None:
            same = next((v for v in versions if v.schema_id == schema_id and not v.deleted), None)
            if same is not None:
                return schema_id
            version = (versions[-1].version + 1) if versions else 1
        clash = next((v for v in versions if v.version == version), None)
        if clash is not None:
            if clash.schema_id == schema_id:
                return schema_id
            raise errors.operation_not_permitted(
                f"Version {version} of subject {subject} already holds schema {clash.schema_id}"
            )
        tx.add_version(subject, version, schema_id)
        return schema_id

    def _existing(self, tx: Transaction, v: SubjectVersion) -> ExistingSchema:
        stored = tx.schema(v.schema_id)
        assert stored is not None
        return ExistingSchema(v.version, self._parsed_by_id(tx, v.schema_id), stored.text)

    # -- compatibility endpoint --------------------------------------------------------------

    def test_compatibility(
        self, subject: str, version: int | None, request: SchemaRequest
    ) -> list[str]:
        """Messages (empty when compatible) for ``/compatibility/subjects/{s}/versions[/{v}]``."""
        with self.store.read() as tx:
            candidate = self._candidate(tx, request)
            level = self._level_in_scope(tx, subject)
            live = [v for v in tx.versions(subject) if not v.deleted]
            if version is None:
                return check_level(candidate.root, [self._existing(tx, v) for v in live], level)
            if version == LATEST:
                if not live:
                    # Nothing registered yet: anything is compatible with nothing.
                    return []
                target = live[-1]
            else:
                if not live:
                    raise errors.subject_not_found(subject)
                found = next((v for v in live if v.version == version), None)
                if found is None:
                    raise errors.version_not_found(version)
                target = found
            return check_level(
                candidate.root, [self._existing(tx, target)], level, all_versions=True
            )

    # -- deletion ----------------------------------------------------------------------------

    def delete_subject(self, subject: str, *, permanent: bool) -> list[int]:
        with self.store.write() as tx:
            self._require_writable(tx, subject)
            versions = tx.versions(subject)
            if not versions:
                raise errors.subject_not_found(subject)
            live = [v for v in versions if not v.deleted]
            if permanent:
                if live:
                    raise errors.subject_not_soft_deleted(subject)
                for v in versions:
                    if tx.referrers(subject, v.version, live_only=False):
                        raise errors.reference_exists(subject, v.version)
                for v in versions:
                    tx.remove_version(subject, v.version)
                # A permanently deleted subject forgets its own settings too.
                tx.set_setting("compatibility", subject, None)
                tx.set_setting("mode", subject, None)
                return [v.version for v in versions]
            if not live:
                raise errors.subject_soft_deleted(subject)
            for v in live:
                if tx.referrers(subject, v.version, live_only=True):
                    raise errors.reference_exists(subject, v.version)
            for v in live:
                tx.mark_deleted(subject, v.version)
            return [v.version for v in live]

    def delete_version(self, subject: str, version: int, *, permanent: bool) -> int:
        with self.store.write() as tx:
            self._require_writable(tx, subject)
            versions = tx.versions(subject)
            live = [v for v in versions if not v.deleted]
            if not (versions if permanent else live):
                raise errors.subject_not_found(subject)
            if version == LATEST:
                target = (versions if permanent else live)[-1]
            else:
                found = next((v for v in versions if v.version == version), None)
                if found is None:
                    raise errors.version_not_found(version)
                target = found
            if permanent:
                if not target.deleted:
                    raise errors.version_not_soft_deleted(subject, target.version)
                if tx.referrers(subject, target.version, live_only=False):
                    raise errors.reference_exists(subject, target.version)
                tx.remove_version(subject, target.version)
            else:
                if target.deleted:
                    raise errors.version_soft_deleted(subject, target.version)
                if tx.referrers(subject, target.version, live_only=True):
                    raise errors.reference_exists(subject, target.version)
                tx.mark_deleted(subject, target.version)
            return target.version

    # -- config ------------------------------------------------------------------------------

    def global_compatibility(self) -> CompatibilityLevel:
        with self.store.read() as tx:
            raw = tx.setting("compatibility", None)
        return CompatibilityLevel(raw) if raw else DEFAULT_COMPATIBILITY

    def set_compatibility(self, subject: str | None, level: CompatibilityLevel) -> None:
        if subject is not None:
            validate_subject(subject)
        with self.store.write() as tx:
            self._require_writable(tx, subject)
            tx.set_setting("compatibility", subject, level.value)

    def subject_compatibility(self, subject: str, *, default_to_global: bool) -> CompatibilityLevel:
        with self.store.read() as tx:
            raw = tx.setting("compatibility", subject)
            if raw is None and default_to_global:
                return self._level_in_scope(tx, subject)
        if raw is None:
            raise errors.compatibility_not_configured(subject)
        return CompatibilityLevel(raw)

    def delete_compatibility(self, subject: str | None) -> CompatibilityLevel:
        """Remove a setting; return the level it had (the default for an unset global)."""
        with self.store.write() as tx:
            self._require_writable(tx, subject)
            raw = tx.setting("compatibility", subject)
            if raw is None and subject is not None:
                raise errors.subject_not_found(subject)
            tx.set_setting("compatibility", subject, None)
        return CompatibilityLevel(raw) if raw else DEFAULT_COMPATIBILITY

    # -- mode --------------------------------------------------------------------------------

    def global_mode(self) -> Mode:
        with self.store.read() as tx:
            return self._mode_in_scope(tx, None)

    def subject_mode(self, subject: str, *, default_to_global: bool) -> Mode:
        with self.store.read() as tx:
            raw = tx.setting("mode", subject)
            if raw is None and default_to_global:
                return self._mode_in_scope(tx, subject)
        if raw is None:
            raise errors.mode_not_configured(subject)
        return Mode(raw)

    def set_mode(self, subject: str | None, mode: Mode, *, force: bool) -> None:
        if subject is not None:
            validate_subject(subject)
        with self.store.write() as tx:
            current = tx.setting("mode", subject)
            if mode is Mode.IMPORT and current != Mode.IMPORT.value and not force:
                has_schemas = (
                    tx.has_live_versions()
                    if subject is None
                    else any(not v.deleted for v in tx.versions(subject))
                )
                if has_schemas:
                    raise errors.operation_not_permitted(
                        "Cannot import since found existing subjects"
                    )
            tx.set_setting("mode", subject, mode.value)

    def delete_mode(self, subject: str) -> Mode:
        with self.store.write() as tx:
            raw = tx.setting("mode", subject)
            if raw is None:
                raise errors.subject_not_found(subject)
            tx.set_setting("mode", subject, None)
        return Mode(raw)


def _version_json(v: SubjectVersion, stored: StoredSchema) -> dict[str, Any]:
    out: dict[str, Any] = {
        "subject": v.subject,
        "version": v.version,
        "id": stored.id,
        "schema": stored.text,
    }
    if stored.references:
        out["references"] = [r.to_json() for r in stored.references]
    return out


def schema_json(stored: StoredSchema) -> dict[str, Any]:
    """``GET /schemas/ids/{id}``: AVRO is the default type, so ``schemaType`` is omitted."""
    out: dict[str, Any] = {"schema": stored.text}
    if stored.references:
        out["references"] = [r.to_json() for r in stored.references]
    return out


def _page(items: list[Any], offset: int, limit: int) -> list[Any]:
    start = max(offset, 0)
    return items[start:] if limit < 0 else items[start : start + limit]
