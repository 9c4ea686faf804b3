"""The embedded metadata store: tenants, API keys, the quarantine and compliance records
(audit log, consent, erasure requests, retention policies, used single-use token ids), in
one SQLite file.

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
A rotated key keeps its previous hash with an expiry (`previous_valid_until`) so the old
secret works for the grace period.

Audit log: append-only per tenant, each entry's SHA-256 chained to the previous entry's
(`audit_entry_hash`); `verify_audit_chain` recomputes the chain, so an edit of any row
(or a deleted row in the middle) is found. Schema v2 adds these tables and the API key
columns; a v1 file is upgraded in place when opened (columns added, nothing rewritten).

The cluster shape uses `PostgresMetadataStore` (postgres_metadata_store.py) instead: the
same `MetadataStore` Protocol over the same tables, sharing the dataclasses, the row
mapping (`*_from_row`, on any row readable by column name) and the page tokens defined
here, and the SQL both dialects run alike (`_SqlMetadataStore`, written once with `?`
placeholders; each store keeps only its connections, schema, locks and the statements
that differ). `open_metadata_store` picks one from the `metadata_store_url` setting.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

SCHEMA_VERSION = 2
# Files this build opens; older ones are upgraded by `_upgrade`.
_READABLE_VERSIONS = (0, 1, 2)
AUDIT_GENESIS_HASH = "0" * 64
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
-- One hash chain per tenant ('' for platform-level actions), sequence from 1.
CREATE TABLE IF NOT EXISTS audit_log (
  tenant_id  TEXT NOT NULL,
  sequence   INTEGER NOT NULL,
  actor      TEXT NOT NULL,
  action     TEXT NOT NULL,
  resource   TEXT NOT NULL,
  peer       TEXT NOT NULL,
  outcome    TEXT NOT NULL,
  at         TEXT NOT NULL,
  prev_hash  TEXT NOT NULL,
  entry_hash TEXT NOT NULL,
  PRIMARY KEY (tenant_id, sequence)
);
CREATE TABLE IF NOT EXISTS consents (
  consent_id     INTEGER PRIMARY KEY AUTOINCREMENT,
  tenant_id      TEXT NOT NULL,
  subject_id     TEXT NOT NULL,
  purpose        TEXT NOT NULL,  -- ANALYTICS | MARKETING | PERSONALISATION
  granted        INTEGER NOT NULL,
  source         TEXT NOT NULL,
  policy_version TEXT NOT NULL,
  recorded_at    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS consents_by_subject ON consents (tenant_id, subject_id, consent_id);
CREATE TABLE IF NOT EXISTS tenant_compliance_settings (
  tenant_id    TEXT PRIMARY KEY,
  consent_mode TEXT NOT NULL  -- 'assumed' | 'required'
);
CREATE TABLE IF NOT EXISTS retention_policies (
  tenant_id          TEXT PRIMARY KEY,
  raw_days           INTEGER NOT NULL,
  minute_rollup_days INTEGER NOT NULL,
  hour_rollup_days   INTEGER NOT NULL,
  day_rollup_days    INTEGER NOT NULL,
  updated_at         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS erasure_requests (
  erasure_request_id TEXT PRIMARY KEY,
  tenant_id          TEXT NOT NULL,
  request_id         TEXT NOT NULL,
  subject_id         TEXT NOT NULL,
  state              TEXT NOT NULL,  -- ACCEPTED | IN_PROGRESS | DONE | FAILED
  created_at         TEXT NOT NULL,
  deadline_at        TEXT NOT NULL,
  finished_at        TEXT,
  certificate_json   TEXT NOT NULL,  -- JSON list of lines
  error_message      TEXT NOT NULL,
  UNIQUE (tenant_id, request_id)
);
-- `jti`s of single-use tokens already presented (rows past `expires_at` are pruned).
CREATE TABLE IF NOT EXISTS used_token_ids (
  jti        TEXT PRIMARY KEY,
  expires_at TEXT NOT NULL
);
-- Counters other processes poll: `consent_resets` grows with every change to consent that
-- is not an appended decision (a subject's decisions deleted, a tenant's mode changed), so
-- a process following the store knows to reload instead of reading new rows only.
CREATE TABLE IF NOT EXISTS metadata_counters (
  name  TEXT PRIMARY KEY,
  value INTEGER NOT NULL
);
"""

CONSENT_RESETS_COUNTER = "consent_resets"

# Columns schema v2 added to v1 tables: (table, column, definition).
_ADDED_COLUMNS = (
    ("api_keys", "display_name", "TEXT NOT NULL DEFAULT ''"),
    ("api_keys", "previous_secret_hash", "TEXT"),
    ("api_keys", "previous_valid_until", "TEXT"),
)


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
    display_name: str = ""
    # After a rotation: the old secret's hash and until when it still authenticates.
    previous_secret_hash: str = ""
    previous_valid_until: datetime | None = None

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


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit log row: who did what to which resource, from where, with what outcome."""

    tenant_id: str  # "" for platform-level actions without a tenant
    sequence: int
    actor: str
    action: str
    resource: str
    peer: str
    outcome: str
    at: datetime
    prev_hash: str
    entry_hash: str


@dataclass(frozen=True, slots=True)
class AuditChainReport:
    """Result of recomputing one tenant's chain (`first_broken_sequence` 0 when intact)."""

    tenant_id: str
    checked_count: int
    first_broken_sequence: int

    @property
    def intact(self) -> bool:
        return self.first_broken_sequence == 0


def audit_entry_hash(
    prev_hash: str,
    tenant_id: str,
    sequence: int,
    actor: str,
    action: str,
    resource: str,
    peer: str,
    outcome: str,
    at_text: str,
) -> str:
    """SHA-256 (hex) over the previous entry's hash and this entry's fields.

    The fields go through JSON so that no choice of field values can make two different
    entries serialise alike (a plain separator could be smuggled inside a value).
    """
    body = json.dumps(
        [prev_hash, tenant_id, sequence, actor, action, resource, peer, outcome, at_text],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ConsentEntry:
    """One consent decision of a subject for a purpose."""

    tenant_id: str
    subject_id: str
    purpose: str  # ANALYTICS | MARKETING | PERSONALISATION
    granted: bool
    source: str
    policy_version: str
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class RetentionDays:
    """Retention per tier, in days."""

    raw_days: int = 7
    minute_rollup_days: int = 30
    hour_rollup_days: int = 365
    day_rollup_days: int = 1825


@dataclass(frozen=True, slots=True)
class ErasureRecord:
    """An erasure request and, when done, its certificate lines."""

    erasure_request_id: str
    tenant_id: str
    request_id: str
    subject_id: str
    state: str  # ACCEPTED | IN_PROGRESS | DONE | FAILED
    created_at: datetime
    deadline_at: datetime
    finished_at: datetime | None = None
    certificate: tuple[str, ...] = ()
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class ErasureApplication:
    """One stream-processor host's application of an erasure request to its own event
    store (cluster shape, PostgreSQL metadata only: services/compliance/erasure_hosts.py)."""

    erasure_request_id: str
    host_id: str
    applied_at: datetime
    rows_deleted: int
    actors_unlinked: int
    # The host's rollup tiers: order ids of the subject replaced by tokens, and tier rows
    # changed; None when the host runs no aggregation runtime (no rollups there).
    rollup_order_ids: int | None = None
    rollup_rows: int = 0


class Row(Protocol):
    """A result row read by column name: `sqlite3.Row`, or a psycopg `dict_row`."""

    def __getitem__(self, key: str, /) -> Any: ...


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

    def rotate_api_key(
        self, tenant_id: str, key_id: str, new_secret_hash: str, previous_valid_until: datetime
    ) -> ApiKeyRecord | None: ...

    def burn_token_id(self, jti: str, expires_at: datetime, now: datetime) -> bool: ...

    def append_audit(
        self,
        tenant_id: str,
        actor: str,
        action: str,
        resource: str,
        peer: str,
        outcome: str,
        at: datetime,
    ) -> AuditRecord: ...

    def list_audit(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[AuditRecord], str]: ...

    def audit_tenants(self) -> list[str]: ...

    def verify_audit_chain(self, tenant_id: str) -> AuditChainReport: ...

    def add_consent(self, entry: ConsentEntry) -> None: ...

    def consent_history(self, tenant_id: str, subject_id: str) -> list[ConsentEntry]: ...

    def latest_consents(self, purpose: str) -> list[ConsentEntry]: ...

    def consent_position(self) -> tuple[int, int]: ...

    def consents_between(
        self, purpose: str, after_id: int, up_to_id: int
    ) -> list[ConsentEntry]: ...

    def delete_consents(self, tenant_id: str, subject_id: str) -> int: ...

    def set_consent_mode(self, tenant_id: str, mode: str) -> None: ...

    def consent_modes(self) -> dict[str, str]: ...

    def get_retention(self, tenant_id: str) -> RetentionDays | None: ...

    def retention_policies(self) -> dict[str, RetentionDays]: ...

    def put_retention(self, tenant_id: str, policy: RetentionDays, at: datetime) -> None: ...

    def create_erasure(self, record: ErasureRecord) -> tuple[ErasureRecord, bool]: ...

    def update_erasure(
        self,
        erasure_request_id: str,
        state: str,
        finished_at: datetime | None = None,
        certificate: Sequence[str] = (),
        error_message: str = "",
    ) -> None: ...

    def get_erasure(self, tenant_id: str, erasure_request_id: str) -> ErasureRecord | None: ...

    def quarantined_ids_mentioning(self, tenant_id: str, needle: str) -> list[str]: ...

    def close(self) -> None: ...


def open_metadata_store(url: str, data_dir: Path) -> MetadataStore:
    """The store `metadata_store_url` names: empty is the SQLite file in `data_dir` (one
    process, the embedded shape); `postgresql://…` is a database every pod shares."""
    if not url:
        return SQLiteMetadataStore(data_dir / "metadata.sqlite3")
    if url.startswith(("postgresql://", "postgres://")):
        # Imported here: psycopg is only loaded by processes that use it.
        from services.storage.postgres_metadata_store import PostgresMetadataStore

        return PostgresMetadataStore(url)
    # The URL may carry a password: name the scheme only.
    raise ValueError(f"unsupported metadata store URL scheme {url.split(':', 1)[0]!r}")


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


def api_key_from_row(row: Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row["key_id"],
        tenant_id=row["tenant_id"],
        secret_hash=row["secret_hash"],
        scopes=frozenset(row["scopes"].split()),
        created_at=_from_text(row["created_at"]),
        revoked_at=_from_text(row["revoked_at"]) if row["revoked_at"] else None,
        display_name=row["display_name"],
        previous_secret_hash=row["previous_secret_hash"] or "",
        previous_valid_until=(
            _from_text(row["previous_valid_until"]) if row["previous_valid_until"] else None
        ),
    )


def quarantine_entry_from_row(row: Row) -> QuarantineEntry:
    return QuarantineEntry(
        quarantined_event_id=row["quarantined_event_id"],
        tenant_id=row["tenant_id"],
        received_at=_from_text(row["received_at"]),
        reason=row["reason"],
        field_path=row["field_path"],
        message=row["message"],
        event_json=row["event_json"],
    )


class _Cursor(Protocol):
    """What the shared code reads from an executed statement (sqlite3 or psycopg)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...


_ConnT = TypeVar("_ConnT")


class _SqlMetadataStore(ABC, Generic[_ConnT]):
    """The SQL both stores run, written once with `?` placeholders; the dialect
    subclasses supply connections and transactions (`_transaction`, `_query`,
    `_execute`, which for PostgreSQL turns `?` into `%s`), the schema, and the methods
    whose statements or locking differ. None of these statements has a `?` inside a
    string literal."""

    # The function giving the position of a substring (0 when absent).
    _STRPOS: ClassVar[str]
    # Inserts a used token id (jti, expires_at), doing nothing when it is already there.
    _INSERT_USED_JTI: ClassVar[str]

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[_ConnT]:
        """Commits when the block ends normally, rolls back on an exception."""

    @abstractmethod
    def _query(self, statement: str, params: Sequence[object] = ()) -> Sequence[Row]:
        """All rows of one read statement."""

    @abstractmethod
    def _execute(self, conn: _ConnT, statement: str, params: Sequence[object] = ()) -> _Cursor:
        """One statement inside a `_transaction`."""

    @abstractmethod
    def _executemany(
        self, conn: _ConnT, statement: str, params: Sequence[Sequence[object]]
    ) -> None:
        """One statement per parameter tuple inside a `_transaction`."""

    @abstractmethod
    def _stream(
        self, statement: str, params: Sequence[object]
    ) -> AbstractContextManager[Iterable[Row]]:
        """The rows of one read statement, one at a time, from one snapshot."""

    @abstractmethod
    def _integrity_error(self, exc: Exception) -> str:
        """The kind of constraint when `exc` is the driver's refusal of a row by one
        ("foreign_key" or "unique"), "" for any other exception."""

    def _lock_audit_chain(self, conn: _ConnT, tenant_id: str) -> None:
        """Serialises appends to one tenant's chain (until the transaction ends)."""

    def _lock_consent(self, conn: _ConnT) -> None:
        """Serialises consent writes (until the transaction ends)."""

    def _check_audit_position(self, before: int) -> None:
        """Raises `InvalidPageTokenError` for a page position the database cannot hold."""

    def _bool_param(self, value: bool) -> object:
        return value

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
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
                self._execute(
                    conn,
                    "INSERT INTO tenants (tenant_id, name, created_at) VALUES (?, ?, ?)",
                    (tenant.tenant_id, tenant.name, _to_text(tenant.created_at)),
                )
        except Exception as exc:
            if not self._integrity_error(exc):
                raise
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
                self._execute(
                    conn,
                    "INSERT INTO api_keys (key_id, tenant_id, secret_hash, scopes, created_at,"
                    " revoked_at, display_name) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        key.key_id,
                        key.tenant_id,
                        key.secret_hash,
                        " ".join(sorted(key.scopes)),
                        _to_text(key.created_at),
                        _to_text(key.revoked_at) if key.revoked_at else None,
                        key.display_name,
                    ),
                )
        except Exception as exc:
            kind = self._integrity_error(exc)
            if kind == "foreign_key":
                raise LookupError(f"tenant {key.tenant_id!r} does not exist") from exc
            if kind == "unique":
                raise AlreadyExistsError(f"API key {key.key_id!r} exists") from exc
            raise

    def find_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = self._query("SELECT * FROM api_keys WHERE key_id = ?", (key_id,))
        return api_key_from_row(rows[0]) if rows else None

    def find_api_key_by_hash(self, secret_hash: str) -> ApiKeyRecord | None:
        rows = self._query("SELECT * FROM api_keys WHERE secret_hash = ?", (secret_hash,))
        return api_key_from_row(rows[0]) if rows else None

    def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        rows = self._query(
            "SELECT * FROM api_keys WHERE tenant_id = ? ORDER BY created_at, key_id", (tenant_id,)
        )
        return [api_key_from_row(r) for r in rows]

    def revoke_api_key(self, tenant_id: str, key_id: str, revoked_at: datetime) -> bool:
        """Marks the key revoked (keeps the first revocation time); False if not found."""
        with self._transaction() as conn:
            cursor = self._execute(
                conn,
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
            self._executemany(
                conn,
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
        return [quarantine_entry_from_row(r) for r in page], next_token

    def quarantined_ids_mentioning(self, tenant_id: str, needle: str) -> list[str]:
        """Ids of the tenant's quarantined events whose stored JSON contains `needle` (a
        JSON-quoted subject id), for erasure: rejected events hold PII too."""
        rows = self._query(
            "SELECT quarantined_event_id FROM quarantined_events WHERE tenant_id = ?"
            f" AND {self._STRPOS}(event_json, ?) > 0",
            (tenant_id, needle),
        )
        return [r["quarantined_event_id"] for r in rows]

    # --- single-use tokens -------------------------------------------------------------

    def burn_token_id(self, jti: str, expires_at: datetime, now: datetime) -> bool:
        """Records a single-use token id; False when it was presented before.

        Expired ids are pruned here: their tokens fail the expiry check anyway, so the
        table only ever holds ids of tokens still alive.
        """
        with self._transaction() as conn:
            self._execute(conn, "DELETE FROM used_token_ids WHERE expires_at < ?", (_to_text(now),))
            cursor = self._execute(conn, self._INSERT_USED_JTI, (jti, _to_text(expires_at)))
            return cursor.rowcount == 1

    # --- audit log ---------------------------------------------------------------------

    def append_audit(
        self,
        tenant_id: str,
        actor: str,
        action: str,
        resource: str,
        peer: str,
        outcome: str,
        at: datetime,
    ) -> AuditRecord:
        """Appends one entry to the tenant's chain. The previous hash is read inside the
        same transaction as the insert, under the chain's lock (`_lock_audit_chain`), so
        concurrent writers cannot fork the chain."""
        at_text = _to_text(at)
        with self._transaction() as conn:
            self._lock_audit_chain(conn, tenant_id)
            last = self._execute(
                conn,
                "SELECT sequence, entry_hash FROM audit_log WHERE tenant_id = ?"
                " ORDER BY sequence DESC LIMIT 1",
                (tenant_id,),
            ).fetchone()
            sequence = (last["sequence"] if last else 0) + 1
            prev_hash = last["entry_hash"] if last else AUDIT_GENESIS_HASH
            entry_hash = audit_entry_hash(
                prev_hash, tenant_id, sequence, actor, action, resource, peer, outcome, at_text
            )
            self._execute(
                conn,
                "INSERT INTO audit_log (tenant_id, sequence, actor, action, resource, peer,"
                " outcome, at, prev_hash, entry_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant_id,
                    sequence,
                    actor,
                    action,
                    resource,
                    peer,
                    outcome,
                    at_text,
                    prev_hash,
                    entry_hash,
                ),
            )
        return AuditRecord(
            tenant_id, sequence, actor, action, resource, peer, outcome,
            _from_text(at_text), prev_hash, entry_hash,
        )  # fmt: skip

    def list_audit(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[AuditRecord], str]:
        """One page of the tenant's entries, newest first; the token is "" on the last."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = 2**62
        if page_token:
            _, last = _decode_page_token(tenant_id, page_token)
            if not last.isdigit():
                raise InvalidPageTokenError("malformed page token")
            before = int(last)
            self._check_audit_position(before)
        rows = self._query(
            "SELECT * FROM audit_log WHERE tenant_id = ? AND sequence < ?"
            " ORDER BY sequence DESC LIMIT ?",
            (tenant_id, before, size + 1),
        )
        page = [audit_from_row(r) for r in rows[:size]]
        token = (
            _encode_page_token(tenant_id, "", str(page[-1].sequence)) if len(rows) > size else ""
        )
        return page, token

    def audit_tenants(self) -> list[str]:
        rows = self._query("SELECT DISTINCT tenant_id FROM audit_log ORDER BY 1")
        return [r["tenant_id"] for r in rows]

    def verify_audit_chain(self, tenant_id: str) -> AuditChainReport:
        """Recomputes the tenant's chain from its first entry; reports the first entry
        whose stored hash, predecessor link or sequence does not match."""
        with self._stream(
            "SELECT * FROM audit_log WHERE tenant_id = ? ORDER BY sequence", (tenant_id,)
        ) as rows:
            prev_hash = AUDIT_GENESIS_HASH
            checked = 0
            for row in rows:
                checked += 1
                expected = audit_entry_hash(
                    prev_hash,
                    row["tenant_id"],
                    row["sequence"],
                    row["actor"],
                    row["action"],
                    row["resource"],
                    row["peer"],
                    row["outcome"],
                    row["at"],
                )
                if (
                    row["sequence"] != checked
                    or row["prev_hash"] != prev_hash
                    or row["entry_hash"] != expected
                ):
                    return AuditChainReport(tenant_id, checked, checked)
                prev_hash = row["entry_hash"]
        return AuditChainReport(tenant_id, checked, 0)

    # --- consent -----------------------------------------------------------------------

    def _bump_consent_resets(self, conn: _ConnT) -> None:
        self._execute(
            conn,
            "INSERT INTO metadata_counters (name, value) VALUES (?, 1)"
            " ON CONFLICT (name) DO UPDATE SET value = metadata_counters.value + 1",
            (CONSENT_RESETS_COUNTER,),
        )

    def add_consent(self, entry: ConsentEntry) -> None:
        with self._transaction() as conn:
            self._lock_consent(conn)
            self._execute(
                conn,
                "INSERT INTO consents (tenant_id, subject_id, purpose, granted, source,"
                " policy_version, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.tenant_id,
                    entry.subject_id,
                    entry.purpose,
                    self._bool_param(entry.granted),
                    entry.source,
                    entry.policy_version,
                    _to_text(entry.recorded_at),
                ),
            )

    def consent_history(self, tenant_id: str, subject_id: str) -> list[ConsentEntry]:
        """Every decision of the subject, newest first."""
        rows = self._query(
            "SELECT * FROM consents WHERE tenant_id = ? AND subject_id = ?"
            " ORDER BY consent_id DESC",
            (tenant_id, subject_id),
        )
        return [consent_from_row(r) for r in rows]

    def latest_consents(self, purpose: str) -> list[ConsentEntry]:
        """The latest decision for `purpose` of every subject of every tenant (to warm
        the ingestion consent cache at start)."""
        rows = self._query(
            "SELECT c.* FROM consents c JOIN (SELECT max(consent_id) AS id FROM consents"
            " WHERE purpose = ? GROUP BY tenant_id, subject_id) m ON c.consent_id = m.id",
            (purpose,),
        )
        return [consent_from_row(r) for r in rows]

    def consents_between(self, purpose: str, after_id: int, up_to_id: int) -> list[ConsentEntry]:
        """Decisions for `purpose` with after_id < consent_id <= up_to_id, oldest first."""
        rows = self._query(
            "SELECT * FROM consents WHERE consent_id > ? AND consent_id <= ? AND purpose = ?"
            " ORDER BY consent_id",
            (after_id, up_to_id, purpose),
        )
        return [consent_from_row(r) for r in rows]

    def delete_consents(self, tenant_id: str, subject_id: str) -> int:
        with self._transaction() as conn:
            self._lock_consent(conn)
            cursor = self._execute(
                conn,
                "DELETE FROM consents WHERE tenant_id = ? AND subject_id = ?",
                (tenant_id, subject_id),
            )
            deleted = cursor.rowcount
            self._bump_consent_resets(conn)
            return deleted

    def set_consent_mode(self, tenant_id: str, mode: str) -> None:
        if mode not in ("assumed", "required"):
            raise ValueError(f"consent mode must be 'assumed' or 'required', got {mode!r}")
        with self._transaction() as conn:
            self._lock_consent(conn)
            self._execute(
                conn,
                "INSERT INTO tenant_compliance_settings (tenant_id, consent_mode) VALUES (?, ?)"
                " ON CONFLICT (tenant_id) DO UPDATE SET consent_mode = excluded.consent_mode",
                (tenant_id, mode),
            )
            self._bump_consent_resets(conn)

    def consent_modes(self) -> dict[str, str]:
        rows = self._query("SELECT tenant_id, consent_mode FROM tenant_compliance_settings")
        return {r["tenant_id"]: r["consent_mode"] for r in rows}

    # --- retention ---------------------------------------------------------------------

    def get_retention(self, tenant_id: str) -> RetentionDays | None:
        rows = self._query("SELECT * FROM retention_policies WHERE tenant_id = ?", (tenant_id,))
        if not rows:
            return None
        r = rows[0]
        return RetentionDays(
            r["raw_days"], r["minute_rollup_days"], r["hour_rollup_days"], r["day_rollup_days"]
        )

    def retention_policies(self) -> dict[str, RetentionDays]:
        """Every tenant's own retention policy (tenants without one are absent), for
        the rollup maintainer's pruning."""
        rows = self._query("SELECT * FROM retention_policies ORDER BY tenant_id")
        return {
            r["tenant_id"]: RetentionDays(
                r["raw_days"], r["minute_rollup_days"], r["hour_rollup_days"], r["day_rollup_days"]
            )
            for r in rows
        }

    def put_retention(self, tenant_id: str, policy: RetentionDays, at: datetime) -> None:
        with self._transaction() as conn:
            self._execute(
                conn,
                "INSERT INTO retention_policies (tenant_id, raw_days, minute_rollup_days,"
                " hour_rollup_days, day_rollup_days, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant_id) DO UPDATE SET raw_days = excluded.raw_days,"
                " minute_rollup_days = excluded.minute_rollup_days,"
                " hour_rollup_days = excluded.hour_rollup_days,"
                " day_rollup_days = excluded.day_rollup_days, updated_at = excluded.updated_at",
                (
                    tenant_id,
                    policy.raw_days,
                    policy.minute_rollup_days,
                    policy.hour_rollup_days,
                    policy.day_rollup_days,
                    _to_text(at),
                ),
            )

    # --- erasure -----------------------------------------------------------------------

    def update_erasure(
        self,
        erasure_request_id: str,
        state: str,
        finished_at: datetime | None = None,
        certificate: Sequence[str] = (),
        error_message: str = "",
    ) -> None:
        with self._transaction() as conn:
            self._execute(
                conn,
                "UPDATE erasure_requests SET state = ?, finished_at = ?, certificate_json = ?,"
                " error_message = ? WHERE erasure_request_id = ?",
                (
                    state,
                    _to_text(finished_at) if finished_at else None,
                    json.dumps(list(certificate)),
                    error_message,
                    erasure_request_id,
                ),
            )

    def get_erasure(self, tenant_id: str, erasure_request_id: str) -> ErasureRecord | None:
        rows = self._query(
            "SELECT * FROM erasure_requests WHERE tenant_id = ? AND erasure_request_id = ?",
            (tenant_id, erasure_request_id),
        )
        return erasure_from_row(rows[0]) if rows else None


class SQLiteMetadataStore(_SqlMetadataStore[sqlite3.Connection]):
    """`MetadataStore` on one SQLite file (WAL, synchronous=FULL); thread-safe. Its one
    connection's IMMEDIATE transactions serialise every write, so the audit chain and
    consent need no locks of their own."""

    _STRPOS = "instr"
    _INSERT_USED_JTI = "INSERT OR IGNORE INTO used_token_ids (jti, expires_at) VALUES (?, ?)"

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
            if version not in _READABLE_VERSIONS:
                raise RuntimeError(
                    f"{self.path} has metadata schema v{version}; this build reads "
                    f"v{SCHEMA_VERSION}"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._upgrade()
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _upgrade(self) -> None:
        """Adds the v2 columns to tables a v1 file created (CREATE IF NOT EXISTS left
        them as they were)."""
        for table, column, definition in _ADDED_COLUMNS:
            present = {r["name"] for r in self._conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

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

    def _execute(
        self, conn: sqlite3.Connection, statement: str, params: Sequence[object] = ()
    ) -> sqlite3.Cursor:
        return conn.execute(statement, params)

    def _executemany(
        self, conn: sqlite3.Connection, statement: str, params: Sequence[Sequence[object]]
    ) -> None:
        conn.executemany(statement, params)

    @contextmanager
    def _stream(self, statement: str, params: Sequence[object]) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            yield self._conn.execute(statement, params)

    def _integrity_error(self, exc: Exception) -> str:
        if not isinstance(exc, sqlite3.IntegrityError):
            return ""
        return "foreign_key" if "FOREIGN KEY" in str(exc) else "unique"

    def _bool_param(self, value: bool) -> object:
        return int(value)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- statements of this dialect ----------------------------------------------------

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
            found.update((r["quarantined_event_id"], quarantine_entry_from_row(r)) for r in rows)
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

    def rotate_api_key(
        self, tenant_id: str, key_id: str, new_secret_hash: str, previous_valid_until: datetime
    ) -> ApiKeyRecord | None:
        """Replaces the secret hash, keeping the current one valid until
        `previous_valid_until`; None when the tenant has no such active key."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET previous_secret_hash = secret_hash,"
                " previous_valid_until = ?, secret_hash = ?"
                " WHERE tenant_id = ? AND key_id = ? AND revoked_at IS NULL",
                (_to_text(previous_valid_until), new_secret_hash, tenant_id, key_id),
            )
            if cursor.rowcount == 0:
                return None
            row = conn.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return api_key_from_row(row)

    def consent_position(self) -> tuple[int, int]:
        """(resets counter, newest consent id) for processes following the store: read
        the counter first, so a reset racing this read is seen by the next one."""
        with self._lock:
            resets = self._conn.execute(
                "SELECT value FROM metadata_counters WHERE name = ?", (CONSENT_RESETS_COUNTER,)
            ).fetchone()
            top = self._conn.execute("SELECT max(consent_id) FROM consents").fetchone()[0]
        return (resets[0] if resets else 0), (top or 0)

    def create_erasure(self, record: ErasureRecord) -> tuple[ErasureRecord, bool]:
        """Stores a new request, or returns the tenant's existing one with the same
        `request_id` (idempotent retry). The bool is True when it was created."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT * FROM erasure_requests WHERE tenant_id = ? AND request_id = ?",
                (record.tenant_id, record.request_id),
            ).fetchone()
            if row is not None:
                return erasure_from_row(row), False
            conn.execute(
                "INSERT INTO erasure_requests (erasure_request_id, tenant_id, request_id,"
                " subject_id, state, created_at, deadline_at, finished_at, certificate_json,"
                " error_message) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, '[]', '')",
                (
                    record.erasure_request_id,
                    record.tenant_id,
                    record.request_id,
                    record.subject_id,
                    record.state,
                    _to_text(record.created_at),
                    _to_text(record.deadline_at),
                ),
            )
        return record, True


def audit_from_row(row: Row) -> AuditRecord:
    return AuditRecord(
        tenant_id=row["tenant_id"],
        sequence=row["sequence"],
        actor=row["actor"],
        action=row["action"],
        resource=row["resource"],
        peer=row["peer"],
        outcome=row["outcome"],
        at=_from_text(row["at"]),
        prev_hash=row["prev_hash"],
        entry_hash=row["entry_hash"],
    )


def consent_from_row(row: Row) -> ConsentEntry:
    return ConsentEntry(
        tenant_id=row["tenant_id"],
        subject_id=row["subject_id"],
        purpose=row["purpose"],
        granted=bool(row["granted"]),
        source=row["source"],
        policy_version=row["policy_version"],
        recorded_at=_from_text(row["recorded_at"]),
    )


def erasure_from_row(row: Row) -> ErasureRecord:
    return ErasureRecord(
        erasure_request_id=row["erasure_request_id"],
        tenant_id=row["tenant_id"],
        request_id=row["request_id"],
        subject_id=row["subject_id"],
        state=row["state"],
        created_at=_from_text(row["created_at"]),
        deadline_at=_from_text(row["deadline_at"]),
        finished_at=_from_text(row["finished_at"]) if row["finished_at"] else None,
        certificate=tuple(json.loads(row["certificate_json"])),
        error_message=row["error_message"],
    )
