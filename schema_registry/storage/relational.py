"""The SQL shared by the SQLite and PostgreSQL stores.

Both engines accept the same statements (``ON CONFLICT``, ``RETURNING``, ``TRUE``/``FALSE``);
only the parameter marker differs (``?`` vs ``%s``), so statements are written once with
``?`` and translated for PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson

from schema_registry.storage import Reference, SettingKind, StoredSchema, SubjectVersion

# The global setting is stored under this subject: an empty subject is refused at the API.
GLOBAL_SUBJECT = ""

SCHEMA_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS sr_state (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        next_id BIGINT NOT NULL
    )""",
    "INSERT INTO sr_state (singleton, next_id) VALUES (1, 1) ON CONFLICT (singleton) DO NOTHING",
    """CREATE TABLE IF NOT EXISTS sr_schemas (
        id BIGINT PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        schema_type TEXT NOT NULL,
        schema_text TEXT NOT NULL,
        refs TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS sr_versions (
        subject TEXT NOT NULL,
        version INTEGER NOT NULL,
        schema_id BIGINT NOT NULL REFERENCES sr_schemas (id),
        deleted BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (subject, version)
    )""",
    "CREATE INDEX IF NOT EXISTS sr_versions_by_schema ON sr_versions (schema_id)",
    """CREATE TABLE IF NOT EXISTS sr_references (
        schema_id BIGINT NOT NULL REFERENCES sr_schemas (id),
        ref_subject TEXT NOT NULL,
        ref_version INTEGER NOT NULL,
        name TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sr_references_target ON sr_references (ref_subject, ref_version)",
    """CREATE TABLE IF NOT EXISTS sr_settings (
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (kind, subject)
    )""",
)


class Cursor(Protocol):
    """The slice of DB-API cursors (sqlite3, psycopg) the stores use."""

    def execute(self, query: Any, params: Sequence[Any] = ..., /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class RelationalTransaction:
    """:class:`schema_registry.storage.Transaction` over one open database transaction."""

    def __init__(self, cursor: Cursor, translate: Callable[[str], str]) -> None:
        self._cursor = cursor
        self._translate = translate

    def _run(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self._cursor.execute(self._translate(sql), params)
        return self._cursor

    def schema(self, schema_id: int) -> StoredSchema | None:
        row = self._run(
            "SELECT id, schema_text, refs, fingerprint, schema_type FROM sr_schemas WHERE id = ?",
            (schema_id,),
        ).fetchone()
        if row is None:
            return None
        refs = tuple(Reference(r["name"], r["subject"], r["version"]) for r in orjson.loads(row[2]))
        return StoredSchema(int(row[0]), row[1], refs, row[3], row[4])

    def schema_id_for(self, fingerprint: str) -> int | None:
        row = self._run(
            "SELECT id FROM sr_schemas WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        return None if row is None else int(row[0])

    def add_schema(
        self,
        fingerprint: str,
        text: str,
        references: tuple[Reference, ...],
        schema_id: int | None = None,
    ) -> int:
        if schema_id is None:
            row = self._run(
                "UPDATE sr_state SET next_id = next_id + 1"
                " WHERE singleton = 1 RETURNING next_id - 1"
            ).fetchone()
            schema_id = int(row[0])
        else:
            # Imported ids push the counter past them so that later ids keep growing.
            self._run(
                "UPDATE sr_state SET next_id = ? WHERE singleton = 1 AND next_id <= ?",
                (schema_id + 1, schema_id),
            )
        refs_json = orjson.dumps([r.to_json() for r in references]).decode()
        self._run(
            "INSERT INTO sr_schemas (id, fingerprint, schema_type, schema_text, refs)"
            " VALUES (?, ?, ?, ?, ?)",
            (schema_id, fingerprint, "AVRO", text, refs_json),
        )
        for ref in references:
            self._run(
                "INSERT INTO sr_references (schema_id, ref_subject, ref_version, name)"
                " VALUES (?, ?, ?, ?)",
                (schema_id, ref.subject, ref.version, ref.name),
            )
        return schema_id

    def versions(
        self, subject: str | None = None, *, schema_id: int | None = None
    ) -> list[SubjectVersion]:
        sql = "SELECT subject, version, schema_id, deleted FROM sr_versions"
        clauses: list[str] = []
        params: list[Any] = []
        if subject is not None:
            clauses.append("subject = ?")
            params.append(subject)
        if schema_id is not None:
            clauses.append("schema_id = ?")
            params.append(schema_id)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY subject, version"
        return [
            SubjectVersion(row[0], int(row[1]), int(row[2]), bool(row[3]))
            for row in self._run(sql, params).fetchall()
        ]

    def add_version(self, subject: str, version: int, schema_id: int) -> None:
        self._run(
            "INSERT INTO sr_versions (subject, version, schema_id, deleted)"
            " VALUES (?, ?, ?, FALSE)",
            (subject, version, schema_id),
        )

    def mark_deleted(self, subject: str, version: int) -> None:
        self._run(
            "UPDATE sr_versions SET deleted = TRUE WHERE subject = ? AND version = ?",
            (subject, version),
        )

    def remove_version(self, subject: str, version: int) -> None:
        self._run("DELETE FROM sr_versions WHERE subject = ? AND version = ?", (subject, version))

    def referrers(self, subject: str, version: int, *, live_only: bool) -> list[int]:
        sql = (
            "SELECT DISTINCT r.schema_id FROM sr_references r"
            " WHERE r.ref_subject = ? AND r.ref_version = ?"
        )
        if live_only:
            sql += (
                " AND EXISTS (SELECT 1 FROM sr_versions v"
                " WHERE v.schema_id = r.schema_id AND v.deleted = FALSE)"
            )
        else:
            sql += " AND EXISTS (SELECT 1 FROM sr_versions v WHERE v.schema_id = r.schema_id)"
        sql += " ORDER BY r.schema_id"
        return [int(row[0]) for row in self._run(sql, (subject, version)).fetchall()]

    def has_live_versions(self) -> bool:
        return (
            self._run("SELECT 1 FROM sr_versions WHERE deleted = FALSE LIMIT 1").fetchone()
            is not None
        )

    def setting(self, kind: SettingKind, subject: str | None) -> str | None:
        row = self._run(
            "SELECT value FROM sr_settings WHERE kind = ? AND subject = ?",
            (kind, GLOBAL_SUBJECT if subject is None else subject),
        ).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, kind: SettingKind, subject: str | None, value: str | None) -> None:
        key = GLOBAL_SUBJECT if subject is None else subject
        if value is None:
            self._run("DELETE FROM sr_settings WHERE kind = ? AND subject = ?", (kind, key))
        else:
            self._run(
                "INSERT INTO sr_settings (kind, subject, value) VALUES (?, ?, ?)"
                " ON CONFLICT (kind, subject) DO UPDATE SET value = excluded.value",
                (kind, key, value),
            )
