"""The subject key store on PostgreSQL: one key store for every pod of the cluster shape.

Crypto-shredding only works when the pod that seals (ingestion), the pods that open (the
stream-processor hosts) and the pod that destroys (compliance) read the same keys. With
`metadata_store_url` set they all use these tables, in the metadata database (same
`search_path` schema as services/storage/postgres_metadata_store.py, same pool approach).

Same behaviour as the SQLite store (subject_keys.py has it, in `BaseSubjectKeyStore`):
wrapped keys, subject ids only as HMACs, the destruction time kept, "an event received at
or before the destruction never gets a key", leases.

What SQLite's single writer gave for free is explicit here: `get_or_create`'s insert and
`destroy` take a transaction-scoped advisory lock per (tenant, subject hash), so the
tombstone check and the insert cannot interleave with a destruction in another pod.

Cross-process invalidation is a short poll, not LISTEN/NOTIFY: a cached key is trusted for
`revalidate_seconds` (default 1 s) and then read again, so a pod stops opening with a key
destroyed in another pod within that bound. Polling needs no listener connection to keep
alive and cannot miss a notification across a reconnect. Erasure's per-host step calls
`fence()` (forgets every cached key at once) before it deletes rows, so the bound only
matters for batches opened between the destruction and that step.

Not like SQLite's `secure_delete`: PostgreSQL keeps a deleted row's old version in the
table file until VACUUM reuses the space, and in the WAL (and WAL archives / base backups)
until they are recycled. The key there is wrapped under the key-encryption secret, so the
backup caveat of subject_keys.py applies to the database's backups and WAL archives too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import datetime

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from services.compliance.subject_keys import BaseSubjectKeyStore, _iso, _parse, _Row
from services.storage.postgres_schema import create_search_path_schema, pooled_transaction

# Advisory lock keys (two-int form), a class of their own next to the metadata store's.
_LOCK_CLASS = 0x6B65_7973  # "keys"
_DDL_LOCK = 0

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS subject_keys (
      tenant_id    TEXT NOT NULL,
      subject_hash TEXT NOT NULL,
      key_id       TEXT NOT NULL,
      wrapped_key  BYTEA NOT NULL,
      created_at   TEXT NOT NULL,
      not_before   TEXT,
      PRIMARY KEY (tenant_id, subject_hash)
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS subject_keys_by_id ON subject_keys (tenant_id, key_id)",
    """CREATE TABLE IF NOT EXISTS destroyed_subject_keys (
      tenant_id    TEXT NOT NULL,
      subject_hash TEXT NOT NULL,
      destroyed_at TEXT NOT NULL,
      PRIMARY KEY (tenant_id, subject_hash)
    )""",
    """CREATE TABLE IF NOT EXISTS subject_key_store_meta (
      name  TEXT PRIMARY KEY,
      value TEXT NOT NULL
    )""",
)

Connection = psycopg.Connection[TupleRow]


class PostgresSubjectKeyStore(BaseSubjectKeyStore):
    """`SubjectKeyStore` on PostgreSQL through a psycopg connection pool; thread-safe."""

    def __init__(
        self,
        dsn: str,
        secret: str,
        *,
        pool_size: int = 4,
        open_timeout: float = 30.0,
        revalidate_seconds: float = 1.0,
        lease_wait_seconds: float = 30.0,
    ) -> None:
        super().__init__(
            secret, revalidate_seconds=revalidate_seconds, lease_wait_seconds=lease_wait_seconds
        )
        # The DSN (it may carry the password) is handed to the pool and not kept here.
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True},
            name="bilten-subject-keys",
        )
        try:
            self._pool.open(wait=True, timeout=open_timeout)
            with self._transaction() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _DDL_LOCK))
                create_search_path_schema(conn, "key store")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO subject_key_store_meta (name, value) VALUES ('created_at', %s)"
                    " ON CONFLICT (name) DO NOTHING",
                    (_iso(self._clock()),),
                )
        except BaseException:
            self._pool.close()
            raise

    def _transaction(self) -> AbstractContextManager[Connection]:
        return pooled_transaction(self._pool)

    def _one(self, statement: str, params: tuple[str, ...]) -> TupleRow | None:
        with self._pool.connection() as conn:
            return conn.execute(statement, params).fetchone()

    @staticmethod
    def _lock_subject(conn: Connection, tenant_id: str, subject_hash: str) -> None:
        # hashtext collisions only serialise two unrelated subjects, never mix them up.
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
            (_LOCK_CLASS, f"{tenant_id}\x1f{subject_hash}"),
        )

    def close(self) -> None:
        self._pool.close()

    def __repr__(self) -> str:
        return "PostgresSubjectKeyStore()"  # never the DSN: it may carry the password

    @staticmethod
    def _row(found: TupleRow | None) -> _Row | None:
        if found is None:
            return None
        return (found[0], found[1], bytes(found[2]), found[3])

    def _select_by_subject(self, tenant_id: str, subject_hash: str) -> _Row | None:
        return self._row(
            self._one(
                "SELECT subject_hash, key_id, wrapped_key, not_before FROM subject_keys"
                " WHERE tenant_id = %s AND subject_hash = %s",
                (tenant_id, subject_hash),
            )
        )

    def _select_by_key_id(self, tenant_id: str, key_id: str) -> _Row | None:
        return self._row(
            self._one(
                "SELECT subject_hash, key_id, wrapped_key, not_before FROM subject_keys"
                " WHERE tenant_id = %s AND key_id = %s",
                (tenant_id, key_id),
            )
        )

    def _select_many(self, tenant_id: str, column: str, values: list[str]) -> list[_Row]:
        statement = sql.SQL(
            "SELECT subject_hash, key_id, wrapped_key, not_before FROM subject_keys"
            " WHERE tenant_id = %s AND {} = ANY(%s)"
        ).format(sql.Identifier(column))
        with self._pool.connection() as conn:
            found = conn.execute(statement, (tenant_id, values)).fetchall()
        return [row for row in (self._row(f) for f in found) if row is not None]

    def _select_destroyed_at(self, tenant_id: str, subject_hash: str) -> str | None:
        row = self._one(
            "SELECT destroyed_at FROM destroyed_subject_keys"
            " WHERE tenant_id = %s AND subject_hash = %s",
            (tenant_id, subject_hash),
        )
        return str(row[0]) if row else None

    def _select_created_at(self) -> str:
        row = self._one("SELECT value FROM subject_key_store_meta WHERE name = 'created_at'", ())
        assert row is not None
        return str(row[0])

    def _insert_key(
        self,
        tenant_id: str,
        subject_hash: str,
        key_id: str,
        wrapped: bytes,
        received_at: datetime | None,
    ) -> _Row | None:
        with self._transaction() as conn:
            self._lock_subject(conn, tenant_id, subject_hash)
            tomb = conn.execute(
                "SELECT destroyed_at FROM destroyed_subject_keys"
                " WHERE tenant_id = %s AND subject_hash = %s",
                (tenant_id, subject_hash),
            ).fetchone()
            if tomb is not None and received_at is not None and received_at <= _parse(tomb[0]):
                return None
            # Another pod may have created it meanwhile: its key wins.
            conn.execute(
                "INSERT INTO subject_keys"
                " (tenant_id, subject_hash, key_id, wrapped_key, created_at, not_before)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id, subject_hash) DO NOTHING",
                (
                    tenant_id,
                    subject_hash,
                    key_id,
                    wrapped,
                    _iso(self._clock()),
                    tomb[0] if tomb is not None else None,
                ),
            )
            return self._row(
                conn.execute(
                    "SELECT subject_hash, key_id, wrapped_key, not_before FROM subject_keys"
                    " WHERE tenant_id = %s AND subject_hash = %s",
                    (tenant_id, subject_hash),
                ).fetchone()
            )

    def _delete_key(self, tenant_id: str, subject_hash: str, destroyed_at: str) -> str | None:
        with self._transaction() as conn:
            self._lock_subject(conn, tenant_id, subject_hash)
            row = conn.execute(
                "DELETE FROM subject_keys WHERE tenant_id = %s AND subject_hash = %s"
                " RETURNING key_id",
                (tenant_id, subject_hash),
            ).fetchone()
            conn.execute(
                "INSERT INTO destroyed_subject_keys (tenant_id, subject_hash, destroyed_at)"
                " VALUES (%s, %s, %s) ON CONFLICT (tenant_id, subject_hash)"
                " DO UPDATE SET destroyed_at = excluded.destroyed_at",
                (tenant_id, subject_hash, destroyed_at),
            )
        return str(row[0]) if row is not None else None
