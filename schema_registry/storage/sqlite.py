"""SQLite store: the one-machine mode, one database file.

Several registry processes (uvicorn workers) may share the file: ``BEGIN IMMEDIATE`` takes
SQLite's single write lock at the start of every write transaction, so writers are serialized
across processes exactly like PostgreSQL's advisory lock serializes them, and WAL mode lets
readers run while a writer holds the lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from schema_registry.errors import store_error
from schema_registry.storage import Transaction
from schema_registry.storage.relational import SCHEMA_DDL, RelationalTransaction

_BUSY_TIMEOUT_S = 30.0


def _same(sql: str) -> str:
    return sql


class SqliteStore:
    def __init__(self, path: str) -> None:
        if path == ":memory:":
            # Each connection to :memory: is a separate database; a shared-cache URI keeps
            # every thread of this process on the same one (tests, throwaway runs).
            self._target = f"file:bilten-sr-{id(self)}?mode=memory&cache=shared"
            self._uri = True
        else:
            self._target = path
            self._uri = False
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # Held open so an in-memory database lives as long as the store.
        self._keeper = self._connection()
        with self._transaction("BEGIN IMMEDIATE") as cur:
            for statement in SCHEMA_DDL:
                cur.execute(statement)

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._target,
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
                uri=self._uri,
            )
            if not self._uri:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Cursor]:
        conn = self._connection()
        cur = conn.cursor()
        try:
            cur.execute(begin)
        except sqlite3.OperationalError as exc:
            raise store_error(str(exc)) from exc
        try:
            yield cur
        except BaseException:
            conn.rollback()
            raise
        else:
            try:
                conn.commit()
            except sqlite3.OperationalError as exc:
                raise store_error(str(exc)) from exc
        finally:
            cur.close()

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        with self._transaction("BEGIN") as cur:
            yield RelationalTransaction(cur, _same)

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        with self._transaction("BEGIN IMMEDIATE") as cur:
            yield RelationalTransaction(cur, _same)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
