"""Per-subject data keys for crypto-shredding (docs/compliance.md, "Crypto-shredding").

Each (tenant, subject) gets a random 256-bit AES-GCM key the first time one of its events
is sealed (`services/compliance/pii_cipher.py`). Destroying the key (erasure) makes every
copy of the subject's sealed PII undecipherable at once: the Kafka topic, Pinot segments,
exports of either, backups of either.

Storage, one interface (`BaseSubjectKeyStore`) with two backends; every process that
seals, opens or destroys must use the same one (`open_subject_key_store`):
- `SubjectKeyStore`: its own SQLite file (`<data_dir>/subject_keys.sqlite3`), for the
  processes of one data dir (`up`, or processes on one machine);
- `PostgresSubjectKeyStore` (postgres_subject_keys.py): tables in the PostgreSQL metadata
  database, for the cluster shape (`metadata_store_url` set).

The SQLite file is not the metadata store, so that it can be kept out of long-lived
backups: a backup of the keys *and* of the key-encryption secret taken before an erasure
could bring an erased key back. Back it up only with a retention shorter than the erasure
deadline (30 days), or not at all (losing it loses the PII of the Kafka/Pinot copies, not
the events). On PostgreSQL the same holds for the database's backups and WAL archives.

- Keys are stored wrapped: AES-256-GCM under a key-encryption key (KEK) derived with
  HKDF-SHA256 from the platform secret `subject_key_encryption_key` (settings, else
  `<data_dir>/secrets.json`), bound to (tenant, subject hash, key id) as associated data.
- Subject ids are never stored: rows are keyed by HMAC-SHA256(derived key, tenant, subject).
- `key_id` is HMAC-SHA256(data key, "bilten subject token v1"), 16 bytes as hex. It names
  the key in the sealed envelope (so the processor finds the key without the subject id)
  and doubles as the subject's pseudonymous token for distinct counts: a function of the
  key alone, so once the key is gone nothing maps it back to the subject.
- `destroy` deletes the row (`secure_delete` zeroes the freed page; the WAL is checkpointed
  and truncated) and records the time in `destroyed_subject_keys` (subject hash and time
  only). `get_or_create(..., received_at)` refuses a key for an event received at or
  before that time: such an event was acknowledged before the erasure, so it belongs to
  the erased lifecycle and is sealed without PII instead. An event received after the
  erasure starts a new lifecycle with a fresh key (which remembers the erasure it
  follows as `not_before`, so a late event of the old lifecycle is refused it too).
- An in-process LRU cache (entries re-read after `revalidate_seconds`, default 1 s, so a
  destruction made by another process or pod is seen within that time; in this process at
  once). `fence()` drops the whole cache at once (erasure's step on a processor host).
- Leases: a processor that decrypted a batch holds a lease until the batch is committed;
  `destroy` (and `fence`) waits (bounded) for leases taken before it in this process, so
  an erasure that deletes the store's rows after destroying the key cannot be overtaken by
  a batch decrypted just before the destruction. Leases are per process: a processor host
  in another pod runs `fence()` itself before deleting its rows
  (services/compliance/erasure_hosts.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_STORE_FILE: Final = "subject_keys.sqlite3"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
_WRAP_VERSION: Final = b"\x01"
_TOKEN_INFO: Final = b"bilten subject token v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subject_keys (
  tenant_id    TEXT NOT NULL,
  subject_hash TEXT NOT NULL,
  key_id       TEXT NOT NULL,
  wrapped_key  BLOB NOT NULL,
  created_at   TEXT NOT NULL,
  not_before   TEXT,
  PRIMARY KEY (tenant_id, subject_hash)
);
CREATE UNIQUE INDEX IF NOT EXISTS subject_keys_by_id ON subject_keys (tenant_id, key_id);
CREATE TABLE IF NOT EXISTS destroyed_subject_keys (
  tenant_id    TEXT NOT NULL,
  subject_hash TEXT NOT NULL,
  destroyed_at TEXT NOT NULL,
  PRIMARY KEY (tenant_id, subject_hash)
);
CREATE TABLE IF NOT EXISTS key_store_meta (
  name  TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
"""


class KeyStoreError(RuntimeError):
    """A wrapped key does not unwrap: wrong key-encryption secret or a tampered row."""


@dataclass(frozen=True, slots=True)
class SubjectKey:
    tenant_id: str
    key_id: str  # also the subject's pseudonymous token
    key: bytes = field(repr=False)
    # The erasure this key's lifecycle follows: events received at or before it must
    # not be sealed with this key either.
    not_before: datetime | None = None


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def key_id_of(key: bytes) -> str:
    return hmac.new(key, _TOKEN_INFO, hashlib.sha256).digest()[:16].hex()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class _Leases:
    """Counts leases per destruction generation; `wait_before` waits for the older ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._active: dict[int, int] = {}

    def acquire(self) -> int:
        with self._cond:
            generation = self._generation
            self._active[generation] = self._active.get(generation, 0) + 1
            return generation

    def release(self, generation: int) -> None:
        with self._cond:
            left = self._active.get(generation, 0) - 1
            if left > 0:
                self._active[generation] = left
            else:
                self._active.pop(generation, None)
            self._cond.notify_all()

    def advance_and_wait(self, timeout: float) -> bool:
        with self._cond:
            self._generation += 1
            fence = self._generation
            return self._cond.wait_for(
                lambda: not any(g < fence for g in self._active), timeout=timeout
            )


_Row = tuple[str, str, bytes, str | None]  # subject_hash, key_id, wrapped_key, not_before


class BaseSubjectKeyStore(ABC):
    """The key store's behaviour (wrapping, subject hashing, cache, leases, the rules of
    `get_or_create` and `destroy`) over a storage backend: `SubjectKeyStore` (SQLite, one
    machine) or `PostgresSubjectKeyStore` (postgres_subject_keys.py, shared by the pods).
    Thread-safe; synchronous (async callers use `asyncio.to_thread`)."""

    def __init__(
        self,
        secret: str,
        *,
        cache_size: int = 100_000,
        revalidate_seconds: float = 1.0,
        lease_wait_seconds: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not secret:
            raise ValueError("subject_key_encryption_key must not be empty")
        raw = secret.encode()
        self._kek = AESGCM(_derive(raw, b"bilten subject key wrap v1"))
        self._hash_key = _derive(raw, b"bilten subject hash v1")
        self._lock = threading.Lock()  # guards the cache (and the SQLite connection)
        self._cache_size = cache_size
        # How long a cached key is trusted: the bound within which a destruction made by
        # another process (or pod) stops this one from opening with the key.
        self.revalidate_seconds = revalidate_seconds
        self._lease_wait = lease_wait_seconds
        self._clock = clock
        # (tenant, "s:"+subject_hash | "k:"+key_id) -> (key, monotonic time read)
        self._cache: OrderedDict[tuple[str, str], tuple[SubjectKey, float]] = OrderedDict()
        # Bumped by every invalidation: a read that began before one does not cache what
        # it read (it may be a key destroyed meanwhile).
        self._epoch = 0
        self._leases = _Leases()

    # --- storage backend -----------------------------------------------------------------

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _select_by_subject(self, tenant_id: str, subject_hash: str) -> _Row | None: ...

    @abstractmethod
    def _select_by_key_id(self, tenant_id: str, key_id: str) -> _Row | None: ...

    @abstractmethod
    def _select_many(self, tenant_id: str, column: str, values: list[str]) -> list[_Row]:
        """Rows whose `column` (subject_hash or key_id) is in `values`: one round trip."""

    @abstractmethod
    def _select_destroyed_at(self, tenant_id: str, subject_hash: str) -> str | None: ...

    @abstractmethod
    def _select_created_at(self) -> str: ...

    @abstractmethod
    def _insert_key(
        self,
        tenant_id: str,
        subject_hash: str,
        key_id: str,
        wrapped: bytes,
        received_at: datetime | None,
    ) -> _Row | None:
        """In one transaction serialised with `_delete_key` of the same subject: None when
        the subject's key was destroyed at or after `received_at`; else inserts the key
        unless another writer did first (its key wins; `not_before` = the destruction
        time, if any) and returns the stored row."""

    @abstractmethod
    def _delete_key(self, tenant_id: str, subject_hash: str, destroyed_at: str) -> str | None:
        """Deletes the key and records the destruction time in one transaction; the
        deleted key's id, None when the subject had no key."""

    # --- helpers -----------------------------------------------------------------------

    def subject_hash(self, tenant_id: str, subject_id: str) -> str:
        message = tenant_id.encode() + b"\x00" + subject_id.encode()
        return hmac.new(self._hash_key, message, hashlib.sha256).hexdigest()

    @staticmethod
    def _aad(tenant_id: str, subject_hash: str, key_id: str) -> bytes:
        return f"{tenant_id}\x00{subject_hash}\x00{key_id}".encode()

    def _wrap(self, tenant_id: str, subject_hash: str, key_id: str, key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._kek.encrypt(nonce, key, self._aad(tenant_id, subject_hash, key_id))
        return _WRAP_VERSION + nonce + sealed

    def _unwrap(self, tenant_id: str, subject_hash: str, key_id: str, wrapped: bytes) -> bytes:
        if wrapped[:1] != _WRAP_VERSION:
            raise KeyStoreError("unknown wrapped key format")
        nonce, sealed = wrapped[1 : 1 + NONCE_BYTES], wrapped[1 + NONCE_BYTES :]
        try:
            return self._kek.decrypt(nonce, sealed, self._aad(tenant_id, subject_hash, key_id))
        except InvalidTag as exc:
            raise KeyStoreError(
                "a subject key does not unwrap: wrong subject_key_encryption_key or a "
                "tampered key store"
            ) from exc

    def _cached(self, cache_key: tuple[str, str]) -> SubjectKey | None:
        with self._lock:
            found = self._cache.get(cache_key)
            if found is None:
                return None
            if time.monotonic() - found[1] > self.revalidate_seconds:
                del self._cache[cache_key]
                return None
            self._cache.move_to_end(cache_key)
            return found[0]

    def _read_epoch(self) -> int:
        with self._lock:
            return self._epoch

    def _remember(self, subject_hash: str, key: SubjectKey, epoch: int) -> None:
        now = time.monotonic()
        with self._lock:
            if epoch != self._epoch:
                return
            for cache_key in (
                (key.tenant_id, "s:" + subject_hash),
                (key.tenant_id, "k:" + key.key_id),
            ):
                self._cache[cache_key] = (key, now)
                self._cache.move_to_end(cache_key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _row_key(self, tenant_id: str, row: _Row) -> SubjectKey:
        subject_hash, key_id, wrapped, not_before = row
        key = self._unwrap(tenant_id, subject_hash, key_id, bytes(wrapped))
        return SubjectKey(tenant_id, key_id, key, _parse(not_before) if not_before else None)

    # --- reads -------------------------------------------------------------------------

    def get(self, tenant_id: str, subject_id: str) -> SubjectKey | None:
        """The subject's key; None when it has none (never had one, or destroyed)."""
        subject_hash = self.subject_hash(tenant_id, subject_id)
        cached = self._cached((tenant_id, "s:" + subject_hash))
        if cached is not None:
            return cached
        epoch = self._read_epoch()
        row = self._select_by_subject(tenant_id, subject_hash)
        if row is None:
            return None
        key = self._row_key(tenant_id, row)
        self._remember(subject_hash, key, epoch)
        return key

    def by_key_id(self, tenant_id: str, key_id: str) -> SubjectKey | None:
        """The key named `key_id` in a sealed envelope; None once destroyed (or unknown)."""
        cached = self._cached((tenant_id, "k:" + key_id))
        if cached is not None:
            return cached
        epoch = self._read_epoch()
        row = self._select_by_key_id(tenant_id, key_id)
        if row is None:
            return None
        key = self._row_key(tenant_id, row)
        self._remember(row[0], key, epoch)
        return key

    def prefetch_subjects(self, wanted: Iterable[tuple[str, str]]) -> None:
        """Caches the keys of a batch's (tenant, subject id) pairs with one query per tenant,
        so sealing a batch costs one round trip, not one per subject (PostgreSQL)."""
        self._prefetch("subject_hash", ((t, self.subject_hash(t, s)) for t, s in wanted if s), "s:")

    def prefetch_key_ids(self, wanted: Iterable[tuple[str, str]]) -> None:
        """Caches the keys a batch's envelopes name, (tenant, key id), one query per tenant."""
        self._prefetch("key_id", ((t, k) for t, k in wanted if k), "k:")

    def _prefetch(self, column: str, wanted: Iterable[tuple[str, str]], prefix: str) -> None:
        missing: dict[str, set[str]] = {}
        for tenant_id, value in wanted:
            if self._cached((tenant_id, prefix + value)) is None:
                missing.setdefault(tenant_id, set()).add(value)
        if not missing:
            return
        epoch = self._read_epoch()
        for tenant_id, values in missing.items():
            for row in self._select_many(tenant_id, column, sorted(values)):
                self._remember(row[0], self._row_key(tenant_id, row), epoch)

    def sealing_since(self) -> datetime:
        """When this key store was created: events produced before were not sealed."""
        return _parse(self._select_created_at())

    def destroyed_at(self, tenant_id: str, subject_id: str) -> datetime | None:
        found = self._select_destroyed_at(tenant_id, self.subject_hash(tenant_id, subject_id))
        return _parse(found) if found else None

    # --- writes ------------------------------------------------------------------------

    def get_or_create(
        self, tenant_id: str, subject_id: str, received_at: datetime | None = None
    ) -> SubjectKey | None:
        """The subject's key, created on first use. None when the subject's key was
        destroyed at or after `received_at` (the event predates the erasure: it must not
        get a key the erasure did not destroy)."""
        found = self.get(tenant_id, subject_id)
        if found is not None:
            if received_at is not None and found.not_before and received_at <= found.not_before:
                return None  # a late event of the erased lifecycle
            return found
        subject_hash = self.subject_hash(tenant_id, subject_id)
        key = AESGCM.generate_key(bit_length=256)
        key_id = key_id_of(key)
        wrapped = self._wrap(tenant_id, subject_hash, key_id, key)
        epoch = self._read_epoch()
        row = self._insert_key(tenant_id, subject_hash, key_id, wrapped, received_at)
        if row is None:
            return None
        stored = self._row_key(tenant_id, row)
        if received_at is not None and stored.not_before and received_at <= stored.not_before:
            return None  # another writer's key, of a lifecycle this event predates
        self._remember(subject_hash, stored, epoch)
        return stored

    def destroy(self, tenant_id: str, subject_id: str) -> bool:
        """Destroys the subject's key (True when it had one) and records the time; waits
        (up to `lease_wait_seconds`) for batches decrypted *in this process* before it to
        be committed (other processes: `fence`)."""
        subject_hash = self.subject_hash(tenant_id, subject_id)
        key_id = self._delete_key(tenant_id, subject_hash, _iso(self._clock()))
        self.fence()
        return key_id is not None

    def fence(self) -> None:
        """Forgets every cached key, then waits (up to `lease_wait_seconds`) for the
        batches this process decrypted before the call to be committed.

        For a destruction made by another process: once this returns, no batch opened with
        a key destroyed before the call is still uncommitted here, and every later batch
        re-reads the keys (so it cannot open with a destroyed one). Erasure runs it before
        deleting the subject's rows from this process's event store."""
        with self._lock:
            self._epoch += 1
            self._cache.clear()
        if not self._leases.advance_and_wait(self._lease_wait):
            raise TimeoutError(
                "batches decrypted before the key destruction were not committed within "
                f"{self._lease_wait} s; retry the erasure"
            )

    # --- leases ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        generation = self._leases.acquire()
        try:
            yield
        finally:
            self._leases.release(generation)

    def acquire_lease(self) -> int:
        """For holders that outlive a `with` block (the processor's pipelined commits)."""
        return self._leases.acquire()

    def release_lease(self, lease: int) -> None:
        self._leases.release(lease)


class SubjectKeyStore(BaseSubjectKeyStore):
    """The key store in a SQLite file: processes on one machine (one data dir)."""

    def __init__(
        self,
        path: Path | str,
        secret: str,
        *,
        cache_size: int = 100_000,
        revalidate_seconds: float = 1.0,
        lease_wait_seconds: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(
            secret,
            cache_size=cache_size,
            revalidate_seconds=revalidate_seconds,
            lease_wait_seconds=lease_wait_seconds,
            clock=clock,
        )
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA secure_delete = ON")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        self._conn.executescript(_SCHEMA)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self._conn.execute(
            "INSERT OR IGNORE INTO key_store_meta (name, value) VALUES ('created_at', ?)",
            (_iso(clock()),),
        )

    @classmethod
    def in_data_dir(cls, data_dir: Path | str, secret: str) -> SubjectKeyStore:
        return cls(Path(data_dir) / KEY_STORE_FILE, secret)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _one(self, statement: str, params: tuple[str, ...]) -> tuple[object, ...] | None:
        with self._lock:
            row: tuple[object, ...] | None = self._conn.execute(statement, params).fetchone()
            return row

    def _select_by_subject(self, tenant_id: str, subject_hash: str) -> _Row | None:
        return self._one(  # type: ignore[return-value]
            "SELECT subject_hash, key_id, wrapped_key, not_before FROM subject_keys"
            " WHERE tenant_id = ? AND subject_hash = ?",
            (tenant_id, subject_hash),
        )

    def _select_by_key_id(self, tenant_id: str, key_id: str) -> _Row | None:
        return self._one(  # type: ignore[return-value]
            "SELECT subject_hash, key_id, wrapped_key, not_before FROM subject_keys"
            " WHERE tenant_id = ? AND key_id = ?",
            (tenant_id, key_id),
        )

    def _select_many(self, tenant_id: str, column: str, values: list[str]) -> list[_Row]:
        assert column in ("subject_hash", "key_id")
        rows: list[_Row] = []
        with self._lock:
            for start in range(0, len(values), 500):  # under SQLite's variable limit
                chunk = values[start : start + 500]
                rows.extend(
                    self._conn.execute(
                        "SELECT subject_hash, key_id, wrapped_key, not_before FROM subject_keys"
                        f" WHERE tenant_id = ? AND {column} IN ({','.join('?' * len(chunk))})",
                        (tenant_id, *chunk),
                    ).fetchall()
                )
        return rows

    def _select_destroyed_at(self, tenant_id: str, subject_hash: str) -> str | None:
        row = self._one(
            "SELECT destroyed_at FROM destroyed_subject_keys"
            " WHERE tenant_id = ? AND subject_hash = ?",
            (tenant_id, subject_hash),
        )
        return str(row[0]) if row else None

    def _select_created_at(self) -> str:
        row = self._one("SELECT value FROM key_store_meta WHERE name = 'created_at'", ())
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
        with self._lock:
            # BEGIN IMMEDIATE: the writer lock, so a destroy cannot interleave.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                tomb = self._conn.execute(
                    "SELECT destroyed_at FROM destroyed_subject_keys"
                    " WHERE tenant_id = ? AND subject_hash = ?",
                    (tenant_id, subject_hash),
                ).fetchone()
                if tomb is not None and received_at is not None and received_at <= _parse(tomb[0]):
                    self._conn.execute("COMMIT")
                    return None
                # Another process may have created it meanwhile: its key wins.
                self._conn.execute(
                    "INSERT OR IGNORE INTO subject_keys"
                    " (tenant_id, subject_hash, key_id, wrapped_key, created_at, not_before)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        tenant_id,
                        subject_hash,
                        key_id,
                        wrapped,
                        _iso(self._clock()),
                        tomb[0] if tomb is not None else None,
                    ),
                )
                row: _Row = self._conn.execute(
                    "SELECT subject_hash, key_id, wrapped_key, not_before FROM subject_keys"
                    " WHERE tenant_id = ? AND subject_hash = ?",
                    (tenant_id, subject_hash),
                ).fetchone()
                self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            return row

    def _delete_key(self, tenant_id: str, subject_hash: str, destroyed_at: str) -> str | None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT key_id FROM subject_keys WHERE tenant_id = ? AND subject_hash = ?",
                    (tenant_id, subject_hash),
                ).fetchone()
                self._conn.execute(
                    "DELETE FROM subject_keys WHERE tenant_id = ? AND subject_hash = ?",
                    (tenant_id, subject_hash),
                )
                self._conn.execute(
                    "INSERT INTO destroyed_subject_keys (tenant_id, subject_hash, destroyed_at)"
                    " VALUES (?, ?, ?) ON CONFLICT (tenant_id, subject_hash)"
                    " DO UPDATE SET destroyed_at = excluded.destroyed_at",
                    (tenant_id, subject_hash, destroyed_at),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            # Move the freed (zeroed) pages out of the WAL into the main file; best
            # effort: a reader in another process can keep the WAL from truncating.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return str(row[0]) if row is not None else None


def open_subject_key_store(
    metadata_store_url: str, data_dir: Path | str, secret: str
) -> BaseSubjectKeyStore:
    """The key store every process of a deployment must share: a table in the PostgreSQL
    metadata database when `metadata_store_url` is set (the cluster shape), else the data
    dir's SQLite file."""
    if metadata_store_url:
        from services.compliance.postgres_subject_keys import PostgresSubjectKeyStore

        return PostgresSubjectKeyStore(metadata_store_url, secret)
    return SubjectKeyStore.in_data_dir(data_dir, secret)
