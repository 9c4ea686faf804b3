"""Storage behind one small interface: :class:`Store` hands out :class:`Transaction` objects.

Two implementations exist: SQLite (one machine, a file) and PostgreSQL (several registry
processes on one database). Registry semantics (versions, soft deletes, compatibility) live
in :mod:`schema_registry.registry`; a store only persists rows and guarantees that
``Store.write()`` transactions are serialized across every process using the same database,
which is what makes "one id per schema, no lost versions, ids only grow" hold.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

SettingKind = Literal["compatibility", "mode"]


@dataclass(frozen=True, slots=True)
class Reference:
    """A named type imported from another subject's version (Confluent ``references``)."""

    name: str
    subject: str
    version: int

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "subject": self.subject, "version": self.version}


@dataclass(frozen=True, slots=True)
class StoredSchema:
    """Immutable once written: the content behind a global id never changes."""

    id: int
    text: str
    references: tuple[Reference, ...]
    fingerprint: str
    schema_type: str = "AVRO"


@dataclass(frozen=True, slots=True)
class SubjectVersion:
    subject: str
    version: int
    schema_id: int
    deleted: bool


class Transaction(Protocol):
    def schema(self, schema_id: int) -> StoredSchema | None:
        """The schema with this id, whether or not any version still uses it."""

    def schema_id_for(self, fingerprint: str) -> int | None: ...

    def add_schema(
        self,
        fingerprint: str,
        text: str,
        references: tuple[Reference, ...],
        schema_id: int | None = None,
    ) -> int:
        """Store a new schema; allocate the next id unless ``schema_id`` is imported.

        Allocated ids are strictly greater than every id ever stored, including imported and
        permanently deleted ones.
        """

    def versions(
        self, subject: str | None = None, *, schema_id: int | None = None
    ) -> list[SubjectVersion]:
        """Versions (soft-deleted included) ordered by subject then version, optionally filtered."""

    def add_version(self, subject: str, version: int, schema_id: int) -> None: ...

    def mark_deleted(self, subject: str, version: int) -> None: ...

    def remove_version(self, subject: str, version: int) -> None: ...

    def referrers(self, subject: str, version: int, *, live_only: bool) -> list[int]:
        """Ids of schemas whose references name ``subject``/``version``.

        ``live_only`` keeps those still used by at least one not-soft-deleted version.
        """

    def has_live_versions(self) -> bool: ...

    def setting(self, kind: SettingKind, subject: str | None) -> str | None:
        """A compatibility level or mode; ``subject=None`` is the global one."""

    def set_setting(self, kind: SettingKind, subject: str | None, value: str | None) -> None:
        """Set, or with ``value=None`` remove, a setting."""


class Store(Protocol):
    def read(self) -> AbstractContextManager[Transaction]: ...

    def write(self) -> AbstractContextManager[Transaction]:
        """A transaction serialized with every other ``write()`` on the same database."""

    def close(self) -> None: ...


def open_store(url: str, *, pool_size: int = 8) -> Store:
    """``sqlite:///path/to/file.db`` or ``postgresql://user@host:port/db``."""
    if url.startswith("sqlite://"):
        from schema_registry.storage.sqlite import SqliteStore

        path = url.removeprefix("sqlite://")
        # sqlite:///abs/path -> /abs/path ; sqlite://relative.db -> relative.db
        return SqliteStore(path if path else ":memory:")
    if url.startswith(("postgresql://", "postgres://")):
        from schema_registry.storage.postgres import PostgresStore

        return PostgresStore(url, pool_size=pool_size)
    raise ValueError(f"unsupported storage URL {url!r}: use sqlite:///PATH or postgresql://...")
