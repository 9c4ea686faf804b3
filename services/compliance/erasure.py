"""Erasure of a subject (user id or anonymous id) within one tenant, with a certificate.

The subject's rows are deleted from the event store, its actor id is unlinked, its
quarantined events and consent history are deleted, and the request keeps a certificate
saying what was erased where and when. Requests are idempotent on the client's
`request_id`; a retry of a request that failed or was cut short runs the erasure again
(every step is safe to repeat).

Copies outside the embedded stores (the Kafka topic, the Pinot table fed from it):

- with crypto-shredding (`keys` given: `BILTEN_EVENT_LOG=kafka` and
  `BILTEN_CRYPTO_SHREDDING=true`), the subject's key is destroyed FIRST
  (services/compliance/subject_keys.py). Every event sealed with it since the key store
  was created carries its ids, IP hash, user agent and personal properties only as
  ciphertext under that key (services/compliance/pii_cipher.py), so those copies are
  undecipherable from that moment; a processor re-reading the topic stores them
  anonymised. Records produced before the key store existed were never sealed: the
  certificate names them NOT ERASED (until topic / table retention drops them);
- without it, the certificate says NOT ERASED for each such copy rather than claiming it
  (docs/compliance.md).

Rollups (services/query/rollups.py): when this process runs the aggregation runtime
(`rollups` returns its maintainer), the subject's order ids (`subject_order_ids`: kept by
the event store past raw retention, like the rollups) are replaced in every tier by opaque
tokens (`erase_with_rollups`), so every served aggregate stays as it was while no tier
names the subject's orders. The tiers hold no user or anonymous id; their actor keys are
unlinked from the id by the event store's erasure.

Cluster shape (`event_log=kafka` with the metadata on PostgreSQL, `hosts` given): this
process deletes from *its own* event store only; each stream-processor host holds another
copy and applies the DONE request from the shared metadata store itself
(services/compliance/erasure_hosts.py), within `hosts_bound` while it runs. The certificate
says exactly that, and `get` (and `create`) add one line per host that has applied it
(time, rows deleted), read from `erasure_applications` at each call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from services.compliance.consent import ConsentRegistry
from services.query.rollups import erasure_tokens
from services.storage.metadata_store import ErasureApplication, ErasureRecord

log = structlog.get_logger(__name__)

# GDPR art. 12(3): one month to act on a request.
ERASURE_DEADLINE = timedelta(days=30)


class ErasureStore(Protocol):
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
    def delete_quarantined(self, tenant_id: str, ids: Sequence[str]) -> int: ...


class SubjectRows(Protocol):
    def erase_subject(self, tenant_id: str, subject_id: str) -> tuple[int, int]: ...


class SubjectOrders(Protocol):
    """The subject's order ids (DuckDBEventStore), read before its rows are erased."""

    def subject_order_ids(self, tenant_id: str, subject_id: str) -> list[str]: ...


class RollupOrders(Protocol):
    """The rollup erase hook (RollupMaintainer)."""

    def erase_orders(self, tenant_id: str, tokens: Mapping[str, str]) -> int: ...


def no_rollups() -> RollupOrders | None:
    return None


@dataclass(frozen=True, slots=True)
class RollupErasure:
    """What `erase_with_rollups` did to the rollup tiers."""

    order_ids: int  # the subject's order ids replaced by tokens
    rows: int  # tier rows changed (every tier, both passes)


def erase_with_rollups(
    rows: SubjectRows,
    orders: SubjectOrders | None,
    rollups: RollupOrders | None,
    tenant_id: str,
    subject_id: str,
) -> tuple[int, int, RollupErasure | None]:
    """`rows.erase_subject` plus, when this process holds rollups, the replacement of the
    subject's order ids in them; (rows deleted, actor ids unlinked, rollup result or None).

    Order: the ids are read while the event store still links them to the subject, the
    tiers are rewritten, then the rows and links are deleted. A failure before the
    delete leaves the ids findable, so a retry of the request finds and replaces them
    (already replaced ones are simply not found in the tiers). The tiers are rewritten
    once more after the delete with the same tokens: a flush running between the two may
    have recomputed a minute from raw rows still there (`RollupMaintainer.erase_orders`).
    """
    if rollups is None or orders is None:
        deleted, unlinked = rows.erase_subject(tenant_id, subject_id)
        return deleted, unlinked, None
    tokens = erasure_tokens(orders.subject_order_ids(tenant_id, subject_id))
    changed = rollups.erase_orders(tenant_id, tokens)
    deleted, unlinked = rows.erase_subject(tenant_id, subject_id)
    changed += rollups.erase_orders(tenant_id, tokens)
    return deleted, unlinked, RollupErasure(len(tokens), changed)


def rollup_line(
    when: str,
    result: RollupErasure | None,
    where: str = "rollups",
    none: str = "none kept (no aggregation runtime), so nothing changed",
) -> str:
    """The certificate line for the rollup tiers of one process; `none` says why nothing
    was done when `result` is None."""
    if result is None:
        return f"{when} {where}: {none}"
    return (
        f"{when} {where} (rollups.duckdb, minute/hour/day tiers): {result.order_ids} order"
        f" ids of the subject replaced by opaque erased: tokens ({result.rows} rows); one"
        " random token per order, the same in every tier and bucket, so counts, revenue,"
        " tickets and distinct orders are unchanged; actor_keys keep the subject's former"
        " key, linked to no id; no user or anonymous id is kept there"
    )


class SubjectKeys(Protocol):
    """What erasure needs of `SubjectKeyStore`."""

    def destroy(self, tenant_id: str, subject_id: str) -> bool: ...
    def destroyed_at(self, tenant_id: str, subject_id: str) -> datetime | None: ...
    def sealing_since(self) -> datetime: ...


class HostApplications(Protocol):
    """Which stream-processor hosts applied a request (PostgresMetadataStore)."""

    def erasure_applications(self, erasure_request_id: str) -> list[ErasureApplication]: ...


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class ErasureService:
    def __init__(
        self,
        store: ErasureStore,
        rows: SubjectRows,
        consent: ConsentRegistry,
        copies_elsewhere: Sequence[str] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        after_erase: Callable[[str], None] = lambda tenant_id: None,
        keys: SubjectKeys | None = None,
        hosts: HostApplications | None = None,
        hosts_bound: timedelta = timedelta(seconds=5),
        orders: SubjectOrders | None = None,
        rollups: Callable[[], RollupOrders | None] = no_rollups,
    ) -> None:
        """`orders` and `rollups`: where the subject's order ids are read and this
        process's rollup erase hook; `rollups` is asked at each erasure, as the
        aggregation runtime makes its maintainer when it starts (None: no rollups here)."""
        self._store = store
        self._rows = rows
        self._consent = consent
        # Stores holding copies this build cannot erase (e.g. a Kafka topic), named in
        # every certificate so it never over-claims.
        self._copies_elsewhere = tuple(copies_elsewhere)
        self._clock = clock
        # Drops cached query results of the tenant: a cached answer computed before the
        # erasure would otherwise still show the subject's rows.
        self._after_erase = after_erase
        # Crypto-shredding: the subject keys sealing the copies in `copies_elsewhere`.
        self._keys = keys
        # Cluster shape: the stream-processor hosts apply the request to their own stores.
        self._hosts = hosts
        self._hosts_bound = hosts_bound
        self._orders = orders
        self._rollups = rollups

    def create(self, tenant_id: str, request_id: str, subject_id: str) -> ErasureRecord:
        """Accepts the request and runs it; a retry with the same `request_id` returns
        the stored request (re-running it unless it is DONE)."""
        now = self._clock()
        record, created = self._store.create_erasure(
            ErasureRecord(
                erasure_request_id=f"er_{uuid.uuid4().hex}",
                tenant_id=tenant_id,
                request_id=request_id,
                subject_id=subject_id,
                state="ACCEPTED",
                created_at=now,
                deadline_at=now + ERASURE_DEADLINE,
            )
        )
        if not created and record.subject_id != subject_id:
            # The same request_id names another subject: a client bug, never a reason
            # to erase the first subject again or the second one silently.
            raise ValueError("request_id was already used for another subject_id")
        if not created and record.state == "DONE":
            return self._with_hosts(record)
        self._run(record)
        stored = self._store.get_erasure(tenant_id, record.erasure_request_id)
        assert stored is not None
        return self._with_hosts(stored)

    def get(self, tenant_id: str, erasure_request_id: str) -> ErasureRecord | None:
        record = self._store.get_erasure(tenant_id, erasure_request_id)
        return None if record is None else self._with_hosts(record)

    def _with_hosts(self, record: ErasureRecord) -> ErasureRecord:
        """The stored certificate plus one line per processor host that applied it (read
        now: hosts keep applying after the request is DONE)."""
        if self._hosts is None or record.state != "DONE":
            return record
        lines = []
        for a in self._hosts.erasure_applications(record.erasure_request_id):
            when = _stamp(a.applied_at)
            lines.append(
                f"{when} event store of stream-processor host {a.host_id}:"
                f" {a.rows_deleted} rows deleted, {a.actors_unlinked} actor ids unlinked,"
                " the tenant's cached results dropped"
            )
            rolled = (
                None
                if a.rollup_order_ids is None
                else RollupErasure(a.rollup_order_ids, a.rollup_rows)
            )
            # NULL is also what a host of a build before the rollup hook recorded: the
            # line must not claim it had no rollups.
            lines.append(
                rollup_line(
                    when,
                    rolled,
                    f"rollups of stream-processor host {a.host_id}",
                    "nothing changed (no aggregation runtime on that host, or applied by a"
                    " build without the rollup erase hook)",
                )
            )
        return replace(record, certificate=record.certificate + tuple(lines))

    def _run(self, record: ErasureRecord) -> None:
        tenant_id, subject_id = record.tenant_id, record.subject_id
        self._store.update_erasure(record.erasure_request_id, "IN_PROGRESS")
        try:
            had_key, earlier = False, None
            if self._keys is not None:
                # A retry finds the key already destroyed by its first run.
                earlier = self._keys.destroyed_at(tenant_id, subject_id)
                # First: from here on no copy sealed with the key can be opened, and no
                # processor batch opened before is still uncommitted (leases).
                had_key = self._keys.destroy(tenant_id, subject_id)
            rows, actors, rolled = erase_with_rollups(
                self._rows, self._orders, self._rollups(), tenant_id, subject_id
            )
            quarantined = self._store.quarantined_ids_mentioning(tenant_id, json.dumps(subject_id))
            removed_quarantine = self._store.delete_quarantined(tenant_id, quarantined)
            consents = self._consent.forget(tenant_id, subject_id)
            self._after_erase(tenant_id)
        except Exception as exc:
            log.exception("erasure_failed", erasure_request_id=record.erasure_request_id)
            self._store.update_erasure(
                record.erasure_request_id,
                "FAILED",
                self._clock(),
                error_message=f"{type(exc).__name__}: {exc}; retry with the same request_id",
            )
            return
        finished = self._clock()
        when = _stamp(finished)
        # In the cluster shape this process's store is not the processors': say whose.
        own = "this process's event store" if self._hosts is not None else "event store"
        lines = [
            f"{when} {own} (tracked_events): {rows} rows deleted"
            " (user_id or anonymous_id = subject)",
            f"{when} {own} (tenant_actors): {actors} actor ids unlinked",
            *self._host_lines(when),
            f"{when} metadata store (quarantined_events): {removed_quarantine} entries deleted",
            f"{when} metadata store (consents): {consents} decisions deleted",
            rollup_line(
                when, rolled, "this process's rollups" if self._hosts is not None else "rollups"
            ),
            f"{when} query result cache: the tenant's entries dropped",
            f"{when} exports: none kept by the platform",
            f"{when} audit log: keeps only a pseudonymous hash of the subject id",
            *self._elsewhere_lines(when, had_key, earlier),
        ]  # fmt: skip
        self._store.update_erasure(record.erasure_request_id, "DONE", finished, lines)

    def _host_lines(self, when: str) -> list[str]:
        if self._hosts is None:
            return []
        bound = int(self._hosts_bound.total_seconds())
        return [
            f"{when} stream-processor hosts' event stores: not erased by this process; each"
            " host deletes the subject's rows, unlinks its actor id, drops the tenant's"
            f" cached results, replaces the subject's order ids in its rollups if it runs the"
            " aggregation runtime, and stops storing its events received before now, from this"
            f" request in the shared metadata store, within about {bound} s while it runs"
            " (at its next start otherwise); each host that has done so is listed below"
        ]

    def _elsewhere_lines(self, when: str, had_key: bool, earlier: datetime | None) -> list[str]:
        if self._keys is None:
            return [
                f"{when} NOT ERASED: {where} (crypto-shredding is off)"
                for where in self._copies_elsewhere
            ]
        since = self._keys.sealing_since().strftime("%Y-%m-%dT%H:%M:%SZ")
        if had_key:
            state = "destroyed"
        elif earlier is not None:
            state = f"already destroyed at {earlier.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        else:
            state = "did not exist (no event of the subject was sealed)"
        lines = [
            f"{when} subject key store: the subject's data key {state}; the destruction"
            " time is recorded, so events received before it never get a key"
        ]
        for where in self._copies_elsewhere:
            if had_key or earlier is not None:
                lines.append(
                    f"{when} {where}: the subject's events sealed since {since} are"
                    " undecipherable (ids, IP hash, user agent, personal properties were"
                    " sealed with the destroyed key); other columns and a pseudonymous"
                    " token, linked to no id, remain"
                )
            lines.append(
                f"{when} NOT ERASED: {where}, records produced before {since} (before"
                " crypto-shredding), if any, until retention drops them"
            )
        return lines
