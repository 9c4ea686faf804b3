"""GroupCommitter over a real DuckDB store: grouping, failure, back-pressure, close."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pytest

from services.events.model import TrackedEvent
from services.storage.event_store import DuckDBEventStore
from services.storage.group_commit import (
    EventLog,
    EventLogClosedError,
    EventLogFullError,
    GroupCommitter,
)
from tests.storage.generated_events import random_events

pytestmark = pytest.mark.integration


class GatedStore:
    """The real store behind a gate, so a test decides when commits may proceed and
    requests pile up into one group meanwhile."""

    def __init__(self, store: DuckDBEventStore) -> None:
        self.store = store
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.group_sizes: list[int] = []

    def append(self, events: Sequence[TrackedEvent]) -> None:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.group_sizes.append(len(events))
        self.store.append(events)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DuckDBEventStore]:
    with DuckDBEventStore(tmp_path / "events.duckdb") as s:
        yield s


async def _wait_entered(gated: GatedStore) -> None:
    await asyncio.to_thread(gated.entered.wait, 10)


async def test_concurrent_appends_are_grouped_and_all_durable(store: DuckDBEventStore) -> None:
    log = GroupCommitter(store)
    committer: EventLog = log  # the cluster shape swaps Kafka in behind this Protocol
    events = random_events(1, 2000, tenants=("acme",))
    requests = [events[i : i + 5] for i in range(0, len(events), 5)]
    await asyncio.gather(*(committer.append(r) for r in requests))
    assert store.count("acme") == 2000
    assert log.events_committed == 2000
    assert log.batches_committed < len(requests)  # grouping happened
    assert log.pending_events == 0
    assert log.last_commit_seconds > 0
    ids = {row["event_id"] for row in store.read("SELECT event_id FROM tracked_events").to_pylist()}
    assert ids == {e.event_id for e in events}
    await committer.close()


async def test_a_failed_commit_fails_every_waiter_of_its_group(store: DuckDBEventStore) -> None:
    gated = GatedStore(store)
    log = GroupCommitter(gated)  # type: ignore[arg-type]
    first = asyncio.ensure_future(log.append(random_events(2, 10, tenants=("acme",))))
    await _wait_entered(gated)  # the first group is inside the store, blocked
    good = random_events(3, 200, tenants=("acme",))
    poisoned = [*random_events(4, 3, tenants=("acme",))]
    poisoned[1] = dataclasses.replace(poisoned[1], properties_json="{broken")
    waiters = [asyncio.ensure_future(log.append(good[i : i + 20])) for i in range(0, 200, 20)]
    waiters.append(asyncio.ensure_future(log.append(poisoned)))
    await asyncio.sleep(0.05)
    gated.gate.set()
    await first
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert gated.group_sizes == [10, 203]
    assert all(isinstance(r, duckdb.ConversionException) for r in results)
    assert store.count("acme") == 10  # nothing of the failed group was stored
    assert (log.batches_committed, log.batches_failed, log.pending_events) == (1, 1, 0)
    # The log keeps working after a failure.
    await log.append(good[:5])
    assert store.count("acme") == 15
    await log.close()


class BrokenStore:
    """A store whose disk is gone: every append raises."""

    def append(self, events: Sequence[TrackedEvent]) -> None:
        raise OSError(28, "No space left on device")


async def test_no_waiter_is_acknowledged_when_the_store_fails() -> None:
    log = GroupCommitter(BrokenStore())  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(log.append(random_events(i, 3)) for i in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, OSError) for r in results)
    assert log.events_committed == 0 and log.pending_events == 0
    await log.close()


async def test_back_pressure_refuses_at_once_when_full(store: DuckDBEventStore) -> None:
    gated = GatedStore(store)
    log = GroupCommitter(gated, max_pending_events=100)  # type: ignore[arg-type]
    in_flight = asyncio.ensure_future(log.append(random_events(5, 60, tenants=("acme",))))
    await _wait_entered(gated)
    queued = asyncio.ensure_future(log.append(random_events(6, 40, tenants=("acme",))))
    await asyncio.sleep(0)
    assert log.pending_events == 100
    with pytest.raises(EventLogFullError) as refused:
        await log.append(random_events(7, 1, tenants=("acme",)))
    assert refused.value.retry_after_seconds > 0
    assert refused.value.max_pending_events == 100
    with pytest.raises(ValueError, match="exceeds"):
        await log.append(random_events(8, 101))  # could never fit: not a retry case
    gated.gate.set()
    await asyncio.gather(in_flight, queued)
    await log.append(random_events(9, 100, tenants=("acme",)))  # room again
    assert store.count("acme") == 200
    await log.close()


async def test_close_flushes_then_refuses(store: DuckDBEventStore) -> None:
    gated = GatedStore(store)
    log = GroupCommitter(gated)  # type: ignore[arg-type]
    waiters = [
        asyncio.ensure_future(log.append(random_events(10 + i, 7, tenants=("acme",))))
        for i in range(5)
    ]
    await _wait_entered(gated)
    closing = asyncio.ensure_future(log.close())
    await asyncio.sleep(0.01)
    with pytest.raises(EventLogClosedError):
        await log.append(random_events(99, 1))
    gated.gate.set()
    await closing
    await asyncio.gather(*waiters)
    assert store.count("acme") == 35


async def test_a_cancelled_waiter_does_not_disturb_the_others(store: DuckDBEventStore) -> None:
    gated = GatedStore(store)
    log = GroupCommitter(gated)  # type: ignore[arg-type]
    first = asyncio.ensure_future(log.append(random_events(20, 5, tenants=("acme",))))
    await _wait_entered(gated)
    impatient = asyncio.ensure_future(log.append(random_events(21, 5, tenants=("acme",))))
    patient = asyncio.ensure_future(log.append(random_events(22, 5, tenants=("acme",))))
    await asyncio.sleep(0)
    impatient.cancel()
    gated.gate.set()
    await asyncio.gather(first, patient)
    # At-least-once: the cancelled request was already queued, so it was committed.
    assert store.count("acme") == 15
    await log.close()


class SlowStore:
    """Commits take `seconds` (like a DuckDB commit with fsync); records group sizes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.group_sizes: list[int] = []

    def append(self, events: Sequence[TrackedEvent]) -> None:
        import time

        time.sleep(self.seconds)
        self.group_sizes.append(len(events))


async def _staggered(log: GroupCommitter, gap: float) -> None:
    first = asyncio.ensure_future(log.append(random_events(31, 1)))
    await asyncio.sleep(gap)
    second = asyncio.ensure_future(log.append(random_events(32, 1)))
    await asyncio.gather(first, second)


@pytest.mark.parametrize("linger", [0.0, 0.3])
async def test_under_concurrency_small_writes_linger_into_one_group(linger: float) -> None:
    store = SlowStore(0.4)
    log = GroupCommitter(store, max_linger_seconds=linger)  # type: ignore[arg-type]
    # Two concurrent writers: the log has seen concurrency.
    await asyncio.gather(log.append(random_events(30, 1)), log.append(random_events(33, 1)))
    assert store.group_sizes == [2]
    # The next wave arrives spread out: with a linger it still forms one group.
    await _staggered(log, gap=0.05)
    assert store.group_sizes[1:] == ([2] if linger else [1, 1])
    await log.close()


async def test_an_idle_log_and_large_groups_never_linger() -> None:
    import time

    store = SlowStore(0.05)
    log = GroupCommitter(store, max_linger_seconds=5.0, linger_until_events=10)  # type: ignore[arg-type]
    await log.append(random_events(40, 1))
    started = time.perf_counter()
    await log.append(random_events(41, 1))  # the last group was a lone request
    assert time.perf_counter() - started < 4.0  # a linger would take 5 s
    await asyncio.gather(log.append(random_events(42, 1)), log.append(random_events(43, 1)))
    started = time.perf_counter()
    await log.append(random_events(44, 10))  # enough waiting to commit at once
    assert time.perf_counter() - started < 4.0  # a linger would take 5 s
    assert store.group_sizes == [1, 1, 2, 10]
    await log.close()


def test_a_negative_linger_is_refused() -> None:
    with pytest.raises(ValueError, match="linger"):
        GroupCommitter(SlowStore(0), max_linger_seconds=-1)  # type: ignore[arg-type]


async def test_cancelled_while_lingering_fails_the_queued_waiters() -> None:
    store = SlowStore(0.2)
    log = GroupCommitter(store, max_linger_seconds=5.0)  # type: ignore[arg-type]
    await asyncio.gather(log.append(random_events(50, 1)), log.append(random_events(51, 1)))
    waiter = asyncio.ensure_future(log.append(random_events(52, 1)))
    await asyncio.sleep(0.02)  # the writer is lingering now
    assert log._writer is not None
    log._writer.cancel()
    with pytest.raises(EventLogClosedError):
        await waiter
    assert log.pending_events == 0
    assert store.group_sizes == [2]
