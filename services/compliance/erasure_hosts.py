"""Erasure on every stream-processor host (the cluster shape, issue #6).

With `event_log=kafka` every process that runs the stream processor (`processor`, `query`,
`aggregation`: services/mesh.py PROCESSOR_HOSTS) holds its own DuckDB copy of the events,
and the compliance pod that accepts an erasure cannot open those files. So each host
applies the erasures itself, from the metadata store they share (PostgreSQL):

- `ErasureApplier` polls `erasure_requests` every `interval` for DONE requests this host
  has not applied (`erasure_applications`, keyed by host id), deletes the subject's rows
  from its store (`DuckDBEventStore.erase_subject`), drops the tenant's cached results and
  records the application (time, rows, actor ids), which `GetErasureRequest` lists. Bound:
  a host applies a request within `interval` (+ the time its in-flight batches take to
  commit) after it is DONE, while it runs; a host that was down applies it at start, before
  its processor consumes anything.
- The host id is `<name>/<store id>`: the name is the processor's static membership id or
  the host name (the pod name), the store id a random id kept next to the event store
  (`<data_dir>/erasure_host_id`). A host whose data dir is lost (and refilled from the
  topic) gets a new id, so it applies every erasure again.
- `ErasedSubjects` stops the processor from re-inserting what an erasure removed: an event
  of an erased subject *received before the erasure finished* (acknowledged before it)
  may still be in the topic, unconsumed by this host (lag) or replayed (a new host, a
  reset). The processor drops such rows before its store commit, whatever the shredding
  setting: with crypto-shredding they are sealed and their key is gone (the opener
  anonymises them, and this filter finds no id), without it their ids are in clear and this
  filter is what keeps them out. Events received after the erasure finished are a new
  lifecycle and kept. The set holds the requests finished within the topic's retention
  (older events cannot come back) and grows as the applier sees new ones.
- Rollups: a host that also runs the aggregation runtime (`rollups` returns its
  maintainer) replaces the subject's order ids in its rollup tiers by opaque tokens, as
  the embedded erasure does (`erase_with_rollups`), and records how many in its
  application, which the certificate lists per host.
- Ordering inside one host: the applier adds the subject to `ErasedSubjects` first, then
  waits for the batches prepared before that (their own leases, like the key store's) to
  commit, then deletes. A batch prepared after the addition is filtered; one prepared
  before is committed before the delete and so deleted by it. With crypto-shredding it
  also calls the key store's `fence()`, so no batch opens with a key cached before the
  destruction (the destruction itself happened in the compliance pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from services.compliance.erasure import (
    RollupOrders,
    SubjectOrders,
    erase_with_rollups,
    no_rollups,
)
from services.compliance.subject_keys import BaseSubjectKeyStore, _Leases
from services.storage.metadata_store import ErasureApplication, ErasureRecord

log = structlog.get_logger(__name__)

HOST_ID_FILE: Final = "erasure_host_id"


class ErasureFeed(Protocol):
    """What the applier needs of the shared metadata store (PostgresMetadataStore)."""

    def erasures_done_since(self, since: datetime) -> list[ErasureRecord]: ...
    def erasures_not_applied_by(self, host_id: str, limit: int = 500) -> list[ErasureRecord]: ...
    def record_erasure_applied(self, application: ErasureApplication) -> None: ...


class SubjectRows(Protocol):
    def erase_subject(self, tenant_id: str, subject_id: str) -> tuple[int, int]: ...


def host_id(name: str, data_dir: Path | str) -> str:
    """`<name or host name>/<store id>`; the store id is created once per data dir."""
    path = Path(data_dir) / HOST_ID_FILE
    try:
        store_id = path.read_text().strip()
    except FileNotFoundError:
        store_id = ""
    if not store_id:
        store_id = uuid.uuid4().hex[:12]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(store_id)
        os.replace(tmp, path)
    return f"{name or socket.gethostname()}/{store_id}"


class ErasedSubjects:
    """Subjects erased, by tenant, with the time their erasure finished; the processor
    drops their rows received up to that time (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._erased: dict[str, dict[str, datetime]] = {}
        self._leases = _Leases()
        self.dropped_events = 0

    def __len__(self) -> int:
        with self._lock:
            return sum(len(subjects) for subjects in self._erased.values())

    def add(self, tenant_id: str, subject_id: str, finished_at: datetime) -> None:
        with self._lock:
            subjects = self._erased.setdefault(tenant_id, {})
            known = subjects.get(subject_id)
            if known is None or known < finished_at:
                subjects[subject_id] = finished_at

    def prune(self, before: datetime) -> None:
        """Forgets erasures finished before `before`: their subjects' earlier events have
        left the topic (retention), so none can arrive any more."""
        with self._lock:
            for tenant_id in list(self._erased):
                subjects = self._erased[tenant_id]
                for subject_id in [s for s, at in subjects.items() if at < before]:
                    del subjects[subject_id]
                if not subjects:
                    del self._erased[tenant_id]

    def acquire(self) -> int:
        """A lease from before `drop_erased` until the batch's store commit."""
        return self._leases.acquire()

    def release(self, lease: int) -> None:
        self._leases.release(lease)

    def fence(self, timeout: float) -> bool:
        """Waits for the batches that took their lease before this call."""
        return self._leases.advance_and_wait(timeout)

    def drop_erased(self, table: pa.Table) -> pa.Table:
        """`table` (EVENT_ARROW_SCHEMA) without the rows of erased subjects received at or
        before their erasure finished."""
        with self._lock:
            if not self._erased or table.num_rows == 0:
                return table
            erased = {tenant: dict(subjects) for tenant, subjects in self._erased.items()}
        # Vectorised pre-check: most batches hold no erased id at all.
        names = pa.array(sorted({s for subjects in erased.values() for s in subjects}), pa.string())
        mentioned = pc.or_(
            pc.is_in(table.column("user_id"), value_set=names),
            pc.is_in(table.column("anonymous_id"), value_set=names),
        )
        if not pc.any(mentioned).as_py():
            return table
        keep = [True] * table.num_rows
        candidates = table.filter(mentioned)
        indices = pc.indices_nonzero(mentioned).to_pylist()
        for index, tenant, user, anonymous, received in zip(
            indices,
            candidates.column("tenant_id").to_pylist(),
            candidates.column("user_id").to_pylist(),
            candidates.column("anonymous_id").to_pylist(),
            candidates.column("received_at").to_pylist(),
            strict=True,
        ):
            subjects = erased.get(tenant, {})
            for subject in (user, anonymous):
                until = subjects.get(subject) if subject else None
                if until is not None and received <= until:
                    keep[index] = False
        dropped = keep.count(False)
        if not dropped:
            return table
        with self._lock:
            self.dropped_events += dropped
        log.info("erased_subject_events_dropped", events=dropped)
        return table.filter(pa.array(keep))


class ErasureApplier:
    """Applies the shared store's erasures to this host's event store, on a schedule."""

    def __init__(
        self,
        feed: ErasureFeed,
        rows: SubjectRows,
        host: str,
        erased: ErasedSubjects,
        interval: timedelta,
        *,
        lookback: timedelta,
        keys: BaseSubjectKeyStore | None = None,
        after_erase: Callable[[str], None] = lambda tenant_id: None,
        lease_wait_seconds: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        orders: SubjectOrders | None = None,
        rollups: Callable[[], RollupOrders | None] = no_rollups,
    ) -> None:
        """`orders` / `rollups`: as for `ErasureService` (the host's event store and, if it
        runs the aggregation runtime, its rollup maintainer, asked at each application)."""
        self._feed = feed
        self._rows = rows
        self.host_id = host
        self.erased = erased
        self.interval = interval
        self._lookback = lookback
        self._keys = keys
        self._after_erase = after_erase
        self._lease_wait = lease_wait_seconds
        self._clock = clock
        self._orders = orders
        self._rollups = rollups
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.applied = 0

    def load(self) -> None:
        """Fills `erased` with the requests finished within the topic's retention: run
        before the processor starts, so a replay cannot re-insert them."""
        self._remember(self._feed.erasures_done_since(self._clock() - self._lookback))

    def _remember(self, records: Iterable[ErasureRecord]) -> None:
        for record in records:
            self.erased.add(
                record.tenant_id, record.subject_id, record.finished_at or self._clock()
            )

    def apply_pending(self) -> int:
        """Applies every DONE request this host has not; returns how many."""
        self.erased.prune(self._clock() - self._lookback)
        pending = self._feed.erasures_not_applied_by(self.host_id)
        if not pending:
            return 0
        # First the filter (batches prepared from now on drop the subjects' rows), then
        # the fences (batches prepared before are committed), then the deletes: no batch
        # can put a row back after its delete.
        self._remember(pending)
        if self._keys is not None:
            self._keys.fence()
        if not self.erased.fence(self._lease_wait):
            raise TimeoutError(
                f"batches prepared before the erasure were not committed within "
                f"{self._lease_wait} s; retried at the next poll"
            )
        for record in pending:
            rows, actors, rolled = erase_with_rollups(
                self._rows, self._orders, self._rollups(), record.tenant_id, record.subject_id
            )
            self._after_erase(record.tenant_id)
            self._feed.record_erasure_applied(
                ErasureApplication(
                    record.erasure_request_id,
                    self.host_id,
                    self._clock(),
                    rows,
                    actors,
                    rollup_order_ids=None if rolled is None else rolled.order_ids,
                    rollup_rows=0 if rolled is None else rolled.rows,
                )
            )
            log.info(
                "erasure_applied_on_host",
                erasure_request_id=record.erasure_request_id,
                host_id=self.host_id,
                rows=rows,
            )
        self.applied += len(pending)
        return len(pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self.apply_pending)
            except Exception:  # a failed poll (database down) must not end the schedule
                log.exception("erasure_apply_failed", host_id=self.host_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval.total_seconds())

    async def aclose(self) -> None:
        """Ends the schedule after the poll in progress (not cancelled: its deletes run in
        a thread and must finish before the stores close, which the mesh does next)."""
        if self._task is None:
            return
        self._stop.set()
        await self._task
        self._task = None
