"""What the PostgreSQL-backed stores (metadata, subject keys) share: the transaction of a
pooled connection, and the creation of their schema when the URL names one that does not
exist yet."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool


@contextmanager
def pooled_transaction(pool: ConnectionPool[Any]) -> Iterator[Any]:
    """A pooled connection inside one transaction: commits when the block ends normally,
    rolls back on an exception."""
    with pool.connection() as conn, conn.transaction():
        yield conn


def create_search_path_schema(conn: psycopg.Connection[Any], store: str) -> None:
    """Creates the first schema of `search_path` when none of them exists yet (a dedicated
    schema named in the URL's options, e.g. `options=-csearch_path=bilten_metadata`).
    Either store may open the database first, so both call this under their DDL lock."""
    with conn.cursor(row_factory=tuple_row) as cursor:
        row = cursor.execute("SELECT current_schema()").fetchone()
        if row is not None and row[0] is not None:
            return
        path = cursor.execute("SELECT current_setting('search_path')").fetchone()
    names = [n.strip().strip('"') for n in (str(path[0]) if path else "").split(",")]
    wanted = next((n for n in names if n and n != "$user"), "")
    if not wanted:
        raise RuntimeError(f"the {store} connection has no schema to create in")
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(wanted)))
