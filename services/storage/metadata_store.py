"""The embedded metadata store: tenants, API keys and the quarantine, in one SQLite file.

SQLite runs in WAL mode with `synchronous = FULL`: every commit fsyncs the WAL, so what
a method wrote survives a crash or power cut once it returns (NORMAL, the usual WAL
pairing, may lose the last commits on power loss). The store is synchronous and
thread-safe (one connection behind a lock; its statements take microseconds); async
callers use `asyncio.to_thread`.

Times are stored as fixed-width UTC ISO-8601 text (`2024-05-01T12:00:00.000000Z`), which
sorts like the instants and stays readable in the sqlite3 shell.

API keys: only `secret_hash` is kept, the hex HMAC-SHA256 of the secret keyed with the
server pepper (`services.platform.auth.hash_api_key_secret`); the secret itself never
reaches this module. A fast hash is right here because secrets are 256-bit random
tokens, not passwords; the pepper keeps a stolen database from being checked offline.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Protocol

SCHEMA_VERSION = 1
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# SQLite caps bound parameters per statement; id lists are sent in chunks below it.
_IDS_PER_STATEMENT = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
  tenant_id  TEXT PRIMARY KEY,
  name       TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
  key_id      TEXT PRIMARY KEY,
  tenant_id   TEXT NOT NULL REFERENCES tenants (tenant_id),
  secret_hash TEXT NOT NULL UNIQUE,
  scopes      TEXT NOT NULL,  -- space-separated, sorted
  created_at  TEXT NOT NULL,
  revoked_at  TEXT
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant_id);
CREATE TABLE IF NOT EXISTS quarantined_events (
  quarantined_event_id TEXT PRIMARY KEY,
  tenant_id            TEXT NOT NULL,
  received_at          TEXT NOT NULL,
  reason               TEXT NOT NULL,  -- RejectionReason name, e.g. SCHEMA_VIOLATION
  field_path           TEXT NOT NULL,
  message              TEXT NOT NULL,
  event_json           TEXT NOT NULL   -- the event as received (canonical proto JSON)
);
-- Serves the newest-first keyset pages of one tenant.
CREATE INDEX IF NOT EXISTS quarantined_events_page
  ON quarantined_events (tenant_id, received_at, quarantined_event_id);
"""


@dataclass(frozen=True, slots=True)
class Tenant:
    tenant_id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A stored API key (write key): never the secret, only its peppered hash."""

    key_id: str
    tenant_id: str
    secret_hash: str  # hex HMAC-SHA256(pepper, secret)
    scopes: frozenset[str]
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """A rejected event kept for inspection and replay (same fields as ingestion's)."""

    quarantined_event_id: str
    tenant_id: str
    received_at: datetime
    reason: str
    field_path: str
    message: str
    event_json: str


class AlreadyExistsError(Exception):
    """A tenant or API key with that id (or hash) is already stored."""


class InvalidPageTokenError(ValueError):
    """The page token is malformed or belongs to another listing (AIP-158)."""


class MetadataStore(Protocol):
    def create_tenant(self, tenant: Tenant) -> None: ...

    def get_tenant(self, tenant_id: str) -> Tenant | None: ...

    def list_tenants(self) -> list[Tenant]: ...

    def add_api_key(self, key: ApiKeyRecord) -> None: ...

    def find_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    def find_api_key_by_hash(self, secret_hash: str) -> ApiKeyRecord | None: ...

    def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]: ...

    def revoke_api_key(self, tenant_id: str, key_id: str, revoked_at: datetime) -> bool: ...

    def add_quarantined(self, entries: Sequence[QuarantineEntry]) -> None: ...

    def list_quarantined(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[QuarantineEntry], str]: ...

    def get_quarantined(self, tenant_id: str, ids: Sequence[str]) -> dict[str, QuarantineEntry]: ...

    def delete_quarantined(self, tenant_id: str, ids: Sequence[str]) -> int: ...

    def close(self) -> None: ...


def _to_text(value: datetime) -> str:
    if value.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _from_text(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), _IDS_PER_STATEMENT):
        yield ids[start : start + _IDS_PER_STATEMENT]


def _encode_page_token(tenant_id: str, received_at: str, last_id: str) -> str:
    # Opaque to clients (AIP-158), but not secret: it carries the tenant so a token
    # cannot be replayed against another tenant's listing, and the keyset position so
    # pages stay stable while entries are added or deleted.
    body = json.dumps({"v": 1, "t": tenant_id, "r": received_at, "i": last_id})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode_page_token(tenant_id: str, token: str) -> tuple[str, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if body["v"] != 1 or body["t"] != tenant_id:
            raise InvalidPageTokenError("page token belongs to another listing")
        received_at, last_id = body["r"], body["i"]
        if not isinstance(received_at, str) or not isinstance(last_id, str):
            raise InvalidPageTokenError("malformed page token")
        return received_at, last_id
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        if isinstance(exc, InvalidPageTokenError):
            raise
        raise InvalidPageTokenError("malformed page token") from exc


def _api_key(row: sqlite3.Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row["key_id"],
        tenant_id=row["tenant_id"],
        secret_hash=row["secret_hash"],
        scopes=frozenset(row["scopes"].split()),
        created_at=_from_text(row["created_at"]),
        revoked_at=_from_text(row["revoked_at"]) if row["revoked_at"] else None,
    )


def _quarantine_entry(row: sqlite3.Row) -> QuarantineEntry:
    return QuarantineEntry(
        quarantined_event_id=row["quarantined_event_id"],
        tenant_id=row["tenant_id"],
        received_at=_from_text(row["received_at"]),
        reason=row["reason"],
        field_path=row["field_path"],
        message=row["message"],
        event_json=row["event_json"],
    )


class SQLiteMetadataStore:
    """`MetadataStore` on one SQLite file (WAL, synchronous=FULL); thread-safe."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly in `_transaction`.
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        # Another process (an admin CLI) may hold the write lock briefly.
        self._conn.execute("PRAGMA busy_timeout = 5000")
        with self._transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(
                    f"{self.path} has metadata schema v{version}; this build reads "
                    f"v{SCHEMA_VERSION}"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            # IMMEDIATE takes the write lock up front, so a transaction never fails
            # half-way with SQLITE_BUSY when another process writes.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SQLiteMetadataStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- tenants ---------------------------------------------------------------------

    def create_tenant(self, tenant: Tenant) -> None:
        try:
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO tenants (tenant_id, name, created_at) VALUES (?, ?, ?)",
                    (tenant.tenant_id, tenant.name, _to_text(tenant.created_at)),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExistsError(f"tenant {tenant.tenant_id!r} exists") from exc

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        rows = self._query("SELECT * FROM tenants WHERE tenant_id = ?", (tenant_id,))
        if not rows:
            return None
        row = rows[0]
        return Tenant(row["tenant_id"], row["name"], _from_text(row["created_at"]))

    def list_tenants(self) -> list[Tenant]:
        rows = self._query("SELECT * FROM tenants ORDER BY tenant_id")
        return [Tenant(r["tenant_id"], r["name"], _from_text(r["created_at"])) for r in rows]

    # --- API keys --------------------------------------------------------------------

    def add_api_key(self, key: ApiKeyRecord) -> None:
        """Stores a key; its tenant must exist. Raises `AlreadyExistsError` on a reused id."""
        try:
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO api_keys (key_id, tenant_id, secret_hash, scopes, created_at,"
                    " revoked_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        key.key_id,
                        key.tenant_id,
                        key.secret_hash,
                        " ".join(sorted(key.scopes)),
                        _to_text(key.created_at),
                        _to_text(key.revoked_at) if key.revoked_at else None,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" in str(exc):
                raise LookupError(f"tenant {key.tenant_id!r} does not exist") from exc
            raise AlreadyExistsError(f"API key {key.key_id!r} exists") from exc

    def find_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = self._query("SELECT * FROM api_keys WHERE key_id = ?", (key_id,))
        return _api_key(rows[0]) if rows else None

    def find_api_key_by_hash(self, secret_hash: str) -> ApiKeyRecord | None:
        rows = self._query("SELECT * FROM api_keys WHERE secret_hash = ?", (secret_hash,))
        return _api_key(rows[0]) if rows else None

    def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        rows = self._query(
            "SELECT * FROM api_keys WHERE tenant_id = ? ORDER BY created_at, key_id", (tenant_id,)
        )
        return [_api_key(r) for r in rows]

    def revoke_api_key(self, tenant_id: str, key_id: str, revoked_at: datetime) -> bool:
        """Marks the key revoked (keeps the first revocation time); False if not found."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?)"
                " WHERE tenant_id = ? AND key_id = ?",
                (_to_text(revoked_at), tenant_id, key_id),
            )
            return cursor.rowcount > 0

    # --- quarantine ------------------------------------------------------------------

    def add_quarantined(self, entries: Sequence[QuarantineEntry]) -> None:
        """Stores all entries in one transaction (all or none)."""
        if not entries:
            return
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO quarantined_events (quarantined_event_id, tenant_id, received_at,"
                " reason, field_path, message, event_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.quarantined_event_id,
                        e.tenant_id,
                        _to_text(e.received_at),
                        e.reason,
                        e.field_path,
                        e.message,
                        e.event_json,
                    )
                    for e in entries
                ],
            )

    def list_quarantined(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[QuarantineEntry], str]:
        """One page of the tenant's entries, newest first, and the next page's token.

        `page_size` 0 means `DEFAULT_PAGE_SIZE`; above `MAX_PAGE_SIZE` it is lowered to
        it (AIP-158). The token is "" on the last page.
        """
        if page_size < 0:
            raise ValueError("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if page_token:
            received_at, last_id = _decode_page_token(tenant_id, page_token)
            rows = self._query(
                "SELECT * FROM quarantined_events WHERE tenant_id = ?"
                " AND (received_at, quarantined_event_id) < (?, ?)"
                " ORDER BY received_at DESC, quarantined_event_id DESC LIMIT ?",
                (tenant_id, received_at, last_id, size + 1),
            )
        else:
            rows = self._query(
                "SELECT * FROM quarantined_events WHERE tenant_id = ?"
                " ORDER BY received_at DESC, quarantined_event_id DESC LIMIT ?",
                (tenant_id, size + 1),
            )
        page = rows[:size]
        next_token = ""
        if len(rows) > size:
            last = page[-1]
            next_token = _encode_page_token(
                tenant_id, last["received_at"], last["quarantined_event_id"]
            )
        return [_quarantine_entry(r) for r in page], next_token

    def get_quarantined(self, tenant_id: str, ids: Sequence[str]) -> dict[str, QuarantineEntry]:
        """The tenant's entries among `ids`, by id; other tenants' ids are simply absent."""
        found: dict[str, QuarantineEntry] = {}
        for chunk in _chunks(ids):
            marks = ", ".join("?" * len(chunk))
            rows = self._query(
                "SELECT * FROM quarantined_events WHERE tenant_id = ?"
                f" AND quarantined_event_id IN ({marks})",
                (tenant_id, *chunk),
            )
            found.update((r["quarantined_event_id"], _quarantine_entry(r)) for r in rows)
        return found

    def delete_quarantined(self, tenant_id: str, ids: Sequence[str]) -> int:
        """Deletes the tenant's entries among `ids` in one transaction; returns how many."""
        deleted = 0
        with self._transaction() as conn:
            for chunk in _chunks(ids):
                marks = ", ".join("?" * len(chunk))
                cursor = conn.execute(
                    "DELETE FROM quarantined_events WHERE tenant_id = ?"
                    f" AND quarantined_event_id IN ({marks})",
                    (tenant_id, *chunk),
                )
                deleted += cursor.rowcount
        return deleted
