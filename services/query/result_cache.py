"""A TTL cache of metric results, invalidated per tenant when the tenant's new data lands.

Dashboards poll the same few questions ("revenue by day this month") many times a
minute; the answer only changes when the tenant's events change. So an entry lives
until its TTL ends *or* its tenant gets new data, whichever comes first.

Invalidation is by generation, not by scanning entries: each tenant has a counter that
`invalidate` bumps, and every entry remembers the counter it was computed under (taken
*before* computing, so a result computed while new data landed is stale at birth and
is never served). Entries of the all-tenants scope (platform admins) remember a global
counter that any tenant's invalidation bumps. Invalidation is O(tenants in the batch).

Values must be immutable (the metric functions return frozen dataclasses and tuples):
a hit hands out the stored object itself.

In process (one per aggregation process); the cluster shape keeps one per pod, each
invalidated by the data its own process sees land (the stream processor runs there).
Thread-safe: reads compute in worker threads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from services.events.model import TrackedEvent

T = TypeVar("T")

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class _Entry:
    value: object
    expires_at: float
    tenant_id: str | None
    generation: int


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    entries: int

    @property
    def hit_rate(self) -> float:
        """Hits / lookups since start; 0.0 before the first lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class Lookup(Generic[T]):
    """The outcome of `ResultCache.lookup`: a hit's value, or what `store` needs."""

    __slots__ = ("generation", "hit", "value")

    def __init__(self, hit: bool, value: T, generation: int) -> None:
        self.hit = hit
        self.value = value
        self.generation = generation


class ResultCache:
    """TTL + LRU bounded cache keyed by (key, tenant scope); see the module docstring."""

    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_seconds < 0 or max_entries < 0:
            raise ValueError("ttl_seconds and max_entries must not be negative")
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str | None, Hashable], _Entry] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._global_generation = 0
        self._hits = 0
        self._misses = 0

    @property
    def enabled(self) -> bool:
        return self._ttl > 0 and self._max > 0

    def _generation(self, tenant_id: str | None) -> int:
        if tenant_id is None:
            return self._global_generation
        return self._generations.get(tenant_id, 0)

    def lookup(self, tenant_id: str | None, key: Hashable) -> Lookup[Any]:
        """A hit, or a miss carrying the generation to `store` the computed value under.

        `tenant_id=None` is the all-tenants scope.
        """
        with self._lock:
            generation = self._generation(tenant_id)
            entry = self._entries.get((tenant_id, key))
            if (
                entry is not None
                and entry.generation == generation
                and entry.expires_at > self._clock()
            ):
                self._entries.move_to_end((tenant_id, key))
                self._hits += 1
                return Lookup(True, entry.value, generation)
            if entry is not None:
                del self._entries[(tenant_id, key)]
            self._misses += 1
            return Lookup(False, _MISSING, generation)

    def store(self, tenant_id: str | None, key: Hashable, generation: int, value: object) -> None:
        """Keeps `value` unless its tenant was invalidated since `generation` was read."""
        if not self.enabled:
            return
        with self._lock:
            if generation != self._generation(tenant_id):
                return  # computed over data that has changed since: never serve it
            self._entries[(tenant_id, key)] = _Entry(
                value, self._clock() + self._ttl, tenant_id, generation
            )
            self._entries.move_to_end((tenant_id, key))
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def get_or_compute(self, tenant_id: str | None, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value, or `compute()` stored and returned (synchronous callers)."""
        found: Lookup[T] = self.lookup(tenant_id, key)
        if found.hit:
            return found.value
        value = compute()
        self.store(tenant_id, key, found.generation, value)
        return value

    def invalidate(self, tenant_ids: Iterable[str]) -> None:
        """New data of these tenants landed: their entries (and all-tenant ones) go stale."""
        with self._lock:
            touched = False
            for tenant_id in tenant_ids:
                self._generations[tenant_id] = self._generations.get(tenant_id, 0) + 1
                touched = True
            if touched:
                self._global_generation += 1

    # The live event observer protocol (services/live/observers.py): data landed.

    def observe_events(self, events: Sequence[TrackedEvent]) -> None:
        self.invalidate({event.tenant_id for event in events})

    def observe_rows(self, rows: pa.Table) -> None:
        if rows.num_rows:
            self.invalidate(pc.unique(rows.column("tenant_id")).to_pylist())

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._entries))
