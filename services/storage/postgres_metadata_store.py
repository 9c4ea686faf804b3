"""The metadata store on PostgreSQL: the cluster shape, every pod on one database.

`SQLiteMetadataStore` keeps its metadata in a file of its own pod, so an API key created
through compliance was unknown to ingestion and a consent withdrawal never reached it. This
store has the same methods with the same results (dataclasses, errors, ordering, page
tokens, audit hashes), over the same tables, for any number of processes at once.

What SQLite's single writer gave for free is made explicit here:
- audit appends take a transaction-scoped advisory lock per tenant chain
  (`pg_advisory_xact_lock`), so the previous hash read and the new row's insert cannot
  interleave with another pod's; the (tenant_id, sequence) primary key refuses a fork even
  if the lock were ever bypassed;
- consent writes take one advisory lock, so consent ids are allocated *and committed* in
  order: a process that sees id N has seen every id below it, which is what lets other
  processes follow new decisions by id (`consents_between`, services/compliance/consent.py);
- idempotent erasure creation and single-use token ids rely on unique constraints and
  `ON CONFLICT`, so concurrent retries resolve to one row.

Columns are the SQLite ones (times as fixed-width UTC text), so the row mapping and the page
tokens are shared with metadata_store.py; ordered text columns use the "C" collation so rows
sort byte-wise, as in SQLite, whatever the database's locale.

The schema is created at open (under an advisory lock: several pods start at once) in the
first schema of the connection's `search_path` (created if missing, e.g. `?options=
-csearch_path%3Dbilten_metadata` keeps these tables apart from the schema registry's on one
database); `metadata_schema_version` holds the version like SQLite's `user_version`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from services.storage.metadata_store import (
    _READABLE_VERSIONS,
    AUDIT_GENESIS_HASH,
    CONSENT_RESETS_COUNTER,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    SCHEMA_VERSION,
    AlreadyExistsError,
    ApiKeyRecord,
    AuditChainReport,
    AuditRecord,
    ConsentEntry,
    ErasureApplication,
    ErasureRecord,
    InvalidPageTokenError,
    QuarantineEntry,
    RetentionDays,
    Tenant,
    _decode_page_token,
    _encode_page_token,
    _from_text,
    _to_text,
    api_key_from_row,
    audit_entry_hash,
    audit_from_row,
    consent_from_row,
    erasure_from_row,
    quarantine_entry_from_row,
)

# Advisory lock keys (two-int form): a class for this store, then what is locked. The
# registry's one-int lock lives in another key space, so the two never collide.
_LOCK_CLASS = 0x6D65_7461  # "meta"
_DDL_LOCK = 0
_CONSENT_LOCK = 1
_AUDIT_LOCK_CLASS = 0x6175_6469  # "audi"; object: hashtext(tenant_id), collisions only serialise

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS metadata_schema_version (
      singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
      version   INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS tenants (
      tenant_id  TEXT COLLATE "C" PRIMARY KEY,
      name       TEXT NOT NULL,
      created_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS api_keys (
      key_id               TEXT COLLATE "C" PRIMARY KEY,
      tenant_id            TEXT NOT NULL REFERENCES tenants (tenant_id),
      secret_hash          TEXT NOT NULL UNIQUE,
      scopes               TEXT NOT NULL,
      created_at           TEXT COLLATE "C" NOT NULL,
      revoked_at           TEXT,
      display_name         TEXT NOT NULL DEFAULT '',
      previous_secret_hash TEXT,
      previous_valid_until TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant_id)",
    """CREATE TABLE IF NOT EXISTS quarantined_events (
      quarantined_event_id TEXT COLLATE "C" PRIMARY KEY,
      tenant_id            TEXT NOT NULL,
      received_at          TEXT COLLATE "C" NOT NULL,
      reason               TEXT NOT NULL,
      field_path           TEXT NOT NULL,
      message              TEXT NOT NULL,
      event_json           TEXT NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS quarantined_events_page
      ON quarantined_events (tenant_id, received_at, quarantined_event_id)""",
    """CREATE TABLE IF NOT EXISTS audit_log (
      tenant_id  TEXT COLLATE "C" NOT NULL,
      sequence   BIGINT NOT NULL,
      actor      TEXT NOT NULL,
      action     TEXT NOT NULL,
      resource   TEXT NOT NULL,
      peer       TEXT NOT NULL,
      outcome    TEXT NOT NULL,
      at         TEXT NOT NULL,
      prev_hash  TEXT NOT NULL,
      entry_hash TEXT NOT NULL,
      PRIMARY KEY (tenant_id, sequence)
    )""",
    """CREATE TABLE IF NOT EXISTS consents (
      consent_id     BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
      tenant_id      TEXT NOT NULL,
      subject_id     TEXT NOT NULL,
      purpose        TEXT NOT NULL,
      granted        BOOLEAN NOT NULL,
      source         TEXT NOT NULL,
      policy_version TEXT NOT NULL,
      recorded_at    TEXT NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS consents_by_subject
      ON consents (tenant_id, subject_id, consent_id)""",
    """CREATE TABLE IF NOT EXISTS tenant_compliance_settings (
      tenant_id    TEXT PRIMARY KEY,
      consent_mode TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS retention_policies (
      tenant_id          TEXT COLLATE "C" PRIMARY KEY,
      raw_days           INTEGER NOT NULL,
      minute_rollup_days INTEGER NOT NULL,
      hour_rollup_days   INTEGER NOT NULL,
      day_rollup_days    INTEGER NOT NULL,
      updated_at         TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS erasure_requests (
      erasure_request_id TEXT PRIMARY KEY,
      tenant_id          TEXT NOT NULL,
      request_id         TEXT NOT NULL,
      subject_id         TEXT NOT NULL,
      state              TEXT NOT NULL,
      created_at         TEXT NOT NULL,
      deadline_at        TEXT NOT NULL,
      finished_at        TEXT,
      certificate_json   TEXT NOT NULL,
      error_message      TEXT NOT NULL,
      UNIQUE (tenant_id, request_id)
    )""",
    # Which stream-processor host applied which erasure to its own event store
    # (services/compliance/erasure_hosts.py); additive, so no schema version bump.
    """CREATE TABLE IF NOT EXISTS erasure_applications (
      erasure_request_id TEXT NOT NULL,
      host_id            TEXT NOT NULL,
      applied_at         TEXT NOT NULL,
      rows_deleted       BIGINT NOT NULL,
      actors_unlinked    BIGINT NOT NULL,
      PRIMARY KEY (erasure_request_id, host_id)
    )""",
    # What the host did to its rollups (issue #6); added columns, so no version bump. NULL
    # order ids: the host has no rollups (or applied it before this column existed).
    "ALTER TABLE erasure_applications ADD COLUMN IF NOT EXISTS rollup_order_ids BIGINT",
    "ALTER TABLE erasure_applications"
    " ADD COLUMN IF NOT EXISTS rollup_rows BIGINT NOT NULL DEFAULT 0",
    """CREATE TABLE IF NOT EXISTS used_token_ids (
      jti        TEXT PRIMARY KEY,
      expires_at TEXT COLLATE "C" NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS metadata_counters (
      name  TEXT PRIMARY KEY,
      value BIGINT NOT NULL
    )""",
)

Connection = psycopg.Connection[DictRow]


class PostgresMetadataStore:
    """`MetadataStore` on PostgreSQL through a psycopg connection pool; thread-safe."""

    def __init__(self, dsn: str, *, pool_size: int = 8, open_timeout: float = 30.0) -> None:
        # The DSN (it may carry the password) is handed to the pool and not kept here.
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            open=False,
            # Autocommit: a single-statement read is one round trip (no BEGIN/COMMIT);
            # writes and multi-statement reads open a transaction explicitly.
            kwargs={"autocommit": True, "row_factory": dict_row},
            name="bilten-metadata",
        )
        try:
            # Fails the start (PoolTimeout) when the database stays unreachable.
            self._pool.open(wait=True, timeout=open_timeout)
            with self._transaction() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _DDL_LOCK))
                self._ensure_schema(conn)
                for statement in _SCHEMA:
                    conn.execute(statement)
                row = conn.execute("SELECT version FROM metadata_schema_version").fetchone()
                if row is not None and row["version"] not in _READABLE_VERSIONS:
                    raise RuntimeError(
                        f"the metadata database has schema v{row['version']}; this build "
                        f"reads v{SCHEMA_VERSION}"
                    )
                conn.execute(
                    "INSERT INTO metadata_schema_version (singleton, version) VALUES (1, %s)"
                    " ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
                    (SCHEMA_VERSION,),
                )
        except BaseException:
            self._pool.close()
            raise

    @staticmethod
    def _ensure_schema(conn: Connection) -> None:
        """Creates the first schema of `search_path` when none of them exists yet (a
        dedicated schema named in the URL's options)."""
        row = conn.execute("SELECT current_schema() AS s").fetchone()
        if row is not None and row["s"] is not None:
            return
        path = conn.execute("SELECT current_setting('search_path') AS p").fetchone()
        names = [n.strip().strip('"') for n in (path["p"] if path else "").split(",")]
        wanted = next((n for n in names if n and n != "$user"), "")
        if not wanted:
            raise RuntimeError("the metadata database connection has no schema to create in")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(wanted)))

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        # Commits when the block ends normally, rolls back on an exception.
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def _query(self, statement: str, params: Sequence[object] = ()) -> list[DictRow]:
        """One statement in autocommit: its own snapshot, one round trip."""
        with self._pool.connection() as conn:
            return conn.execute(statement, params).fetchall()

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PostgresMetadataStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return "PostgresMetadataStore()"  # never the DSN: it may carry the password

    # --- tenants ---------------------------------------------------------------------

    def create_tenant(self, tenant: Tenant) -> None:
        try:
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO tenants (tenant_id, name, created_at) VALUES (%s, %s, %s)",
                    (tenant.tenant_id, tenant.name, _to_text(tenant.created_at)),
                )
        except psycopg.errors.UniqueViolation as exc:
            raise AlreadyExistsError(f"tenant {tenant.tenant_id!r} exists") from exc

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        rows = self._query("SELECT * FROM tenants WHERE tenant_id = %s", (tenant_id,))
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
                    " revoked_at, display_name) VALUES (%s, %s, %s, %s, %s, %s, %s)",
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
        except psycopg.errors.ForeignKeyViolation as exc:
            raise LookupError(f"tenant {key.tenant_id!r} does not exist") from exc
        except psycopg.errors.UniqueViolation as exc:
            raise AlreadyExistsError(f"API key {key.key_id!r} exists") from exc

    def find_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = self._query("SELECT * FROM api_keys WHERE key_id = %s", (key_id,))
        return api_key_from_row(rows[0]) if rows else None

    def find_api_key_by_hash(self, secret_hash: str) -> ApiKeyRecord | None:
        rows = self._query("SELECT * FROM api_keys WHERE secret_hash = %s", (secret_hash,))
        return api_key_from_row(rows[0]) if rows else None

    def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        rows = self._query(
            "SELECT * FROM api_keys WHERE tenant_id = %s ORDER BY created_at, key_id",
            (tenant_id,),
        )
        return [api_key_from_row(r) for r in rows]

    def revoke_api_key(self, tenant_id: str, key_id: str, revoked_at: datetime) -> bool:
        """Marks the key revoked (keeps the first revocation time); False if not found."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, %s)"
                " WHERE tenant_id = %s AND key_id = %s",
                (_to_text(revoked_at), tenant_id, key_id),
            )
            return cursor.rowcount > 0

    def rotate_api_key(
        self, tenant_id: str, key_id: str, new_secret_hash: str, previous_valid_until: datetime
    ) -> ApiKeyRecord | None:
        """Replaces the secret hash, keeping the current one valid until
        `previous_valid_until`; None when the tenant has no such active key."""
        rows = self._query(
            "UPDATE api_keys SET previous_secret_hash = secret_hash,"
            " previous_valid_until = %s, secret_hash = %s"
            " WHERE tenant_id = %s AND key_id = %s AND revoked_at IS NULL RETURNING *",
            (_to_text(previous_valid_until), new_secret_hash, tenant_id, key_id),
        )
        return api_key_from_row(rows[0]) if rows else None

    # --- quarantine ------------------------------------------------------------------

    def add_quarantined(self, entries: Sequence[QuarantineEntry]) -> None:
        """Stores all entries in one transaction (all or none)."""
        if not entries:
            return
        with self._transaction() as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO quarantined_events (quarantined_event_id, tenant_id, received_at,"
                " reason, field_path, message, event_json) VALUES (%s, %s, %s, %s, %s, %s, %s)",
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
        """One page of the tenant's entries, newest first, and the next page's token
        (the rules of `SQLiteMetadataStore.list_quarantined`)."""
        if page_size < 0:
            raise ValueError("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if page_token:
            received_at, last_id = _decode_page_token(tenant_id, page_token)
            rows = self._query(
                "SELECT * FROM quarantined_events WHERE tenant_id = %s"
                " AND (received_at, quarantined_event_id) < (%s, %s)"
                " ORDER BY received_at DESC, quarantined_event_id DESC LIMIT %s",
                (tenant_id, received_at, last_id, size + 1),
            )
        else:
            rows = self._query(
                "SELECT * FROM quarantined_events WHERE tenant_id = %s"
                " ORDER BY received_at DESC, quarantined_event_id DESC LIMIT %s",
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

    def get_quarantined(self, tenant_id: str, ids: Sequence[str]) -> dict[str, QuarantineEntry]:
        """The tenant's entries among `ids`, by id; other tenants' ids are simply absent."""
        if not ids:
            return {}
        # One array parameter: PostgreSQL has no bound-parameter cap to chunk around.
        rows = self._query(
            "SELECT * FROM quarantined_events WHERE tenant_id = %s"
            " AND quarantined_event_id = ANY(%s)",
            (tenant_id, list(ids)),
        )
        return {r["quarantined_event_id"]: quarantine_entry_from_row(r) for r in rows}

    def delete_quarantined(self, tenant_id: str, ids: Sequence[str]) -> int:
        """Deletes the tenant's entries among `ids` in one transaction; returns how many."""
        if not ids:
            return 0
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM quarantined_events WHERE tenant_id = %s"
                " AND quarantined_event_id = ANY(%s)",
                (tenant_id, list(ids)),
            )
            return cursor.rowcount

    def quarantined_ids_mentioning(self, tenant_id: str, needle: str) -> list[str]:
        """Ids of the tenant's quarantined events whose stored JSON contains `needle`."""
        rows = self._query(
            "SELECT quarantined_event_id FROM quarantined_events WHERE tenant_id = %s"
            " AND strpos(event_json, %s) > 0",
            (tenant_id, needle),
        )
        return [r["quarantined_event_id"] for r in rows]

    # --- single-use tokens -------------------------------------------------------------

    def burn_token_id(self, jti: str, expires_at: datetime, now: datetime) -> bool:
        """Records a single-use token id; False when it was presented before, by any pod:
        the primary key decides, and a concurrent insert of the same id waits for the
        first one's commit and then does nothing."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM used_token_ids WHERE expires_at < %s", (_to_text(now),))
            cursor = conn.execute(
                "INSERT INTO used_token_ids (jti, expires_at) VALUES (%s, %s)"
                " ON CONFLICT (jti) DO NOTHING",
                (jti, _to_text(expires_at)),
            )
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
        """Appends one entry to the tenant's chain. The chain's advisory lock is held from
        reading the previous hash to the commit, so pods appending at once queue up
        instead of forking the chain."""
        at_text = _to_text(at)
        with self._transaction() as conn:
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_AUDIT_LOCK_CLASS, tenant_id)
            )
            last = conn.execute(
                "SELECT sequence, entry_hash FROM audit_log WHERE tenant_id = %s"
                " ORDER BY sequence DESC LIMIT 1",
                (tenant_id,),
            ).fetchone()
            sequence = (last["sequence"] if last else 0) + 1
            prev_hash = last["entry_hash"] if last else AUDIT_GENESIS_HASH
            entry_hash = audit_entry_hash(
                prev_hash, tenant_id, sequence, actor, action, resource, peer, outcome, at_text
            )
            conn.execute(
                "INSERT INTO audit_log (tenant_id, sequence, actor, action, resource, peer,"
                " outcome, at, prev_hash, entry_hash)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
            if before > 2**62:  # beyond BIGINT; no such sequence was ever written
                raise InvalidPageTokenError("malformed page token")
        rows = self._query(
            "SELECT * FROM audit_log WHERE tenant_id = %s AND sequence < %s"
            " ORDER BY sequence DESC LIMIT %s",
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
        # A server-side cursor streams the chain instead of holding it all in memory.
        with self._transaction() as conn, conn.cursor(name="verify_audit_chain") as cur:
            cur.execute(
                "SELECT * FROM audit_log WHERE tenant_id = %s ORDER BY sequence", (tenant_id,)
            )
            prev_hash = AUDIT_GENESIS_HASH
            checked = 0
            for row in cur:
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

    @staticmethod
    def _lock_consent(conn: Connection) -> None:
        # Taken before the consent id is drawn: ids then commit in order (module docstring).
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _CONSENT_LOCK))

    @staticmethod
    def _bump_consent_resets(conn: Connection) -> None:
        conn.execute(
            "INSERT INTO metadata_counters (name, value) VALUES (%s, 1)"
            " ON CONFLICT (name) DO UPDATE SET value = metadata_counters.value + 1",
            (CONSENT_RESETS_COUNTER,),
        )

    def add_consent(self, entry: ConsentEntry) -> None:
        with self._transaction() as conn:
            self._lock_consent(conn)
            conn.execute(
                "INSERT INTO consents (tenant_id, subject_id, purpose, granted, source,"
                " policy_version, recorded_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    entry.tenant_id,
                    entry.subject_id,
                    entry.purpose,
                    entry.granted,
                    entry.source,
                    entry.policy_version,
                    _to_text(entry.recorded_at),
                ),
            )

    def consent_history(self, tenant_id: str, subject_id: str) -> list[ConsentEntry]:
        """Every decision of the subject, newest first."""
        rows = self._query(
            "SELECT * FROM consents WHERE tenant_id = %s AND subject_id = %s"
            " ORDER BY consent_id DESC",
            (tenant_id, subject_id),
        )
        return [consent_from_row(r) for r in rows]

    def latest_consents(self, purpose: str) -> list[ConsentEntry]:
        """The latest decision for `purpose` of every subject of every tenant."""
        rows = self._query(
            "SELECT c.* FROM consents c JOIN (SELECT max(consent_id) AS id FROM consents"
            " WHERE purpose = %s GROUP BY tenant_id, subject_id) m ON c.consent_id = m.id",
            (purpose,),
        )
        return [consent_from_row(r) for r in rows]

    def consent_position(self) -> tuple[int, int]:
        """(resets counter, newest consent id), from one snapshot in one round trip: every
        ingestion batch asks (services/compliance/consent.py)."""
        rows = self._query(
            "SELECT (SELECT value FROM metadata_counters WHERE name = %s) AS resets,"
            " (SELECT max(consent_id) FROM consents) AS top",
            (CONSENT_RESETS_COUNTER,),
        )
        return rows[0]["resets"] or 0, rows[0]["top"] or 0

    def consents_between(self, purpose: str, after_id: int, up_to_id: int) -> list[ConsentEntry]:
        """Decisions for `purpose` with after_id < consent_id <= up_to_id, oldest first."""
        rows = self._query(
            "SELECT * FROM consents WHERE consent_id > %s AND consent_id <= %s"
            " AND purpose = %s ORDER BY consent_id",
            (after_id, up_to_id, purpose),
        )
        return [consent_from_row(r) for r in rows]

    def delete_consents(self, tenant_id: str, subject_id: str) -> int:
        with self._transaction() as conn:
            self._lock_consent(conn)
            cursor = conn.execute(
                "DELETE FROM consents WHERE tenant_id = %s AND subject_id = %s",
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
            conn.execute(
                "INSERT INTO tenant_compliance_settings (tenant_id, consent_mode)"
                " VALUES (%s, %s)"
                " ON CONFLICT (tenant_id) DO UPDATE SET consent_mode = excluded.consent_mode",
                (tenant_id, mode),
            )
            self._bump_consent_resets(conn)

    def consent_modes(self) -> dict[str, str]:
        rows = self._query("SELECT tenant_id, consent_mode FROM tenant_compliance_settings")
        return {r["tenant_id"]: r["consent_mode"] for r in rows}

    # --- retention ---------------------------------------------------------------------

    def get_retention(self, tenant_id: str) -> RetentionDays | None:
        rows = self._query("SELECT * FROM retention_policies WHERE tenant_id = %s", (tenant_id,))
        if not rows:
            return None
        r = rows[0]
        return RetentionDays(
            r["raw_days"], r["minute_rollup_days"], r["hour_rollup_days"], r["day_rollup_days"]
        )

    def retention_policies(self) -> dict[str, RetentionDays]:
        """Every tenant's own retention policy (tenants without one are absent)."""
        rows = self._query("SELECT * FROM retention_policies ORDER BY tenant_id")
        return {
            r["tenant_id"]: RetentionDays(
                r["raw_days"], r["minute_rollup_days"], r["hour_rollup_days"], r["day_rollup_days"]
            )
            for r in rows
        }

    def put_retention(self, tenant_id: str, policy: RetentionDays, at: datetime) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO retention_policies (tenant_id, raw_days, minute_rollup_days,"
                " hour_rollup_days, day_rollup_days, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
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

    def create_erasure(self, record: ErasureRecord) -> tuple[ErasureRecord, bool]:
        """Stores a new request, or returns the tenant's existing one with the same
        `request_id` (idempotent retry). The bool is True when it was created. Two pods
        taking the same retry at once: the unique (tenant_id, request_id) lets one insert,
        the other's `ON CONFLICT DO NOTHING` waits for that commit and then reads it."""
        with self._transaction() as conn:
            inserted = conn.execute(
                "INSERT INTO erasure_requests (erasure_request_id, tenant_id, request_id,"
                " subject_id, state, created_at, deadline_at, finished_at, certificate_json,"
                " error_message) VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, '[]', '')"
                " ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING erasure_request_id",
                (
                    record.erasure_request_id,
                    record.tenant_id,
                    record.request_id,
                    record.subject_id,
                    record.state,
                    _to_text(record.created_at),
                    _to_text(record.deadline_at),
                ),
            ).fetchone()
            if inserted is not None:
                return record, True
            row = conn.execute(
                "SELECT * FROM erasure_requests WHERE tenant_id = %s AND request_id = %s",
                (record.tenant_id, record.request_id),
            ).fetchone()
        assert row is not None  # the conflict was on this row, committed before we read
        return erasure_from_row(row), False

    def update_erasure(
        self,
        erasure_request_id: str,
        state: str,
        finished_at: datetime | None = None,
        certificate: Sequence[str] = (),
        error_message: str = "",
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE erasure_requests SET state = %s, finished_at = %s,"
                " certificate_json = %s, error_message = %s WHERE erasure_request_id = %s",
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
            "SELECT * FROM erasure_requests WHERE tenant_id = %s AND erasure_request_id = %s",
            (tenant_id, erasure_request_id),
        )
        return erasure_from_row(rows[0]) if rows else None

    # --- erasure on the stream-processor hosts (services/compliance/erasure_hosts.py) ---

    def erasures_done_since(self, since: datetime) -> list[ErasureRecord]:
        """DONE requests finished at or after `since`, oldest first."""
        rows = self._query(
            "SELECT * FROM erasure_requests WHERE state = 'DONE' AND finished_at >= %s"
            " ORDER BY finished_at, erasure_request_id",
            (_to_text(since),),
        )
        return [erasure_from_row(row) for row in rows]

    def erasures_not_applied_by(self, host_id: str, limit: int = 500) -> list[ErasureRecord]:
        """DONE requests `host_id` has not recorded as applied, oldest first."""
        rows = self._query(
            "SELECT * FROM erasure_requests e WHERE e.state = 'DONE' AND NOT EXISTS ("
            " SELECT 1 FROM erasure_applications a"
            " WHERE a.erasure_request_id = e.erasure_request_id AND a.host_id = %s)"
            " ORDER BY e.finished_at, e.erasure_request_id LIMIT %s",
            (host_id, limit),
        )
        return [erasure_from_row(row) for row in rows]

    def record_erasure_applied(self, application: ErasureApplication) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO erasure_applications (erasure_request_id, host_id, applied_at,"
                " rows_deleted, actors_unlinked, rollup_order_ids, rollup_rows)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (erasure_request_id, host_id) DO UPDATE SET"
                " applied_at = excluded.applied_at, rows_deleted = excluded.rows_deleted,"
                " actors_unlinked = excluded.actors_unlinked,"
                " rollup_order_ids = excluded.rollup_order_ids,"
                " rollup_rows = excluded.rollup_rows",
                (
                    application.erasure_request_id,
                    application.host_id,
                    _to_text(application.applied_at),
                    application.rows_deleted,
                    application.actors_unlinked,
                    application.rollup_order_ids,
                    application.rollup_rows,
                ),
            )

    def erasure_applications(self, erasure_request_id: str) -> list[ErasureApplication]:
        rows = self._query(
            "SELECT * FROM erasure_applications WHERE erasure_request_id = %s"
            " ORDER BY applied_at, host_id",
            (erasure_request_id,),
        )
        return [
            ErasureApplication(
                erasure_request_id=row["erasure_request_id"],
                host_id=row["host_id"],
                applied_at=_from_text(row["applied_at"]),
                rows_deleted=int(row["rows_deleted"]),
                actors_unlinked=int(row["actors_unlinked"]),
                rollup_order_ids=(
                    None if row["rollup_order_ids"] is None else int(row["rollup_order_ids"])
                ),
                rollup_rows=int(row["rollup_rows"]),
            )
            for row in rows
        ]
