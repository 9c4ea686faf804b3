"""PostgreSQL store: the cluster shape, several registry processes on one database.

Every write transaction starts with ``pg_advisory_xact_lock`` on one registry-wide key, so
writes from all processes are serialized: the id counter, the "same schema -> same id" lookup
and the next-version computation cannot interleave. Registry writes are rare (schema
evolution, not data), so one lock costs nothing measurable, and reads never take it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import psycopg
from psycopg_pool import ConnectionPool

from schema_registry.errors import store_error
from schema_registry.storage import Transaction
from schema_registry.storage.relational import SCHEMA_DDL, RelationalTransaction

# Arbitrary, fixed: "bilten schema registry" writers.
_WRITE_LOCK_KEY = 0x5C4E_3A01


def with_search_path(dsn: str, schema: str) -> str:
    """``dsn`` with its tables placed in PostgreSQL schema ``schema`` (``search_path``)."""
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def throwaway_schema(dsn: str, prefix: str = "sr_tmp") -> Iterator[str]:
    """A DSN whose tables land in a fresh PostgreSQL schema, dropped (with them) on exit.

    Tests and the benchmark use it so that they never write into the database's ``public``
    schema.
    """
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_search_path(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _to_psycopg(sql: str) -> str:
    return sql.replace("?", "%s")


class PostgresStore:
    def __init__(self, dsn: str, *, pool_size: int = 8) -> None:
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=True, kwargs={"autocommit": False}
        )
        self._pool.wait(timeout=30.0)
        # Several processes may start at once; CREATE TABLE IF NOT EXISTS is not safe against
        # itself in PostgreSQL, so schema creation runs under the write lock too.
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))
                for statement in SCHEMA_DDL:
                    cur.execute(statement)
        except psycopg.Error as exc:
            raise store_error(str(exc)) from exc

    @contextmanager
    def _transaction(self, *, exclusive: bool) -> Iterator[Transaction]:
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                if exclusive:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))
                yield RelationalTransaction(cur, _to_psycopg)
        except psycopg.Error as exc:
            raise store_error(str(exc)) from exc

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        with self._transaction(exclusive=False) as tx:
            yield tx

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        with self._transaction(exclusive=True) as tx:
            yield tx

    def close(self) -> None:
        self._pool.close()
