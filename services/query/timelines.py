"""People's events as sortable integers: the shared engine of funnels and sessions.

A *position* is an integer ordered by (person, time) and equal exactly for
simultaneous events of one person (a *moment*). Analyses that follow each person
through time then only sort positions and binary-search them: no row order is needed,
and no per-person Python loop.

Usually a position packs the person (tenant code, actor key) above the microseconds
since the scan start into an unsigned 64-bit integer, so ordering rows by (person, time)
is `np.sort` of plain integers: on 3.5 M rows ~50 ms, against ~500 ms of CPU for DuckDB
to sort the rows by two columns, or ~300 ms for `np.argsort` (measured on the benchmark
machine, docs/benchmarks-analytics.md). When the bits do not fit (millions of actors and
a scan of years), the rows are sorted once with `np.lexsort` and a position is the index
of the first row of its moment: slower, same answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from services.query.metrics import Scope

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
INF = np.iinfo(np.int64).max  # "not reached / none" in int64 time and duration arrays
# Bits a packed position may use (tests lower it to exercise the sorted fallback).
PACKED_BITS = 64


class PersonTimeline:
    """Rows with columns `actor_key`, `t` (epoch microseconds) and, for every-tenant
    scopes, `tenant_id`, as one position per row (`position`, in row order)."""

    def __init__(self, rows: pa.Table, scope: Scope, scan_start_us: int) -> None:
        self.t: I64 = rows.column("t").to_numpy().astype(np.int64, copy=False)
        actor = rows.column("actor_key").to_numpy().astype(np.int64)
        tenant = np.zeros(len(actor), dtype=np.int64)
        if scope.tenant_id is None:
            encoded = pc.dictionary_encode(rows.column("tenant_id").combine_chunks())
            tenant = encoded.indices.to_numpy().astype(np.int64)
        offset = self.t - scan_start_us
        time_bits = max(1, int(offset.max()).bit_length()) if len(offset) else 1
        actor_bits = int(actor.max()).bit_length() if len(actor) else 0
        tenant_bits = int(tenant.max()).bit_length() if len(tenant) else 0
        self.packed = time_bits + actor_bits + tenant_bits <= PACKED_BITS
        self.position: I64 | U64
        if self.packed:
            self._time_bits = time_bits
            self._t0 = scan_start_us
            person = ((tenant << actor_bits) | actor).astype(np.uint64)
            self.position = (person << np.uint64(time_bits)) | offset.astype(np.uint64)
        else:
            order = np.lexsort((self.t, actor, tenant))
            t, actor, tenant = self.t[order], actor[order], tenant[order]
            new_person = np.ones(len(t), dtype=bool)
            new_person[1:] = (actor[1:] != actor[:-1]) | (tenant[1:] != tenant[:-1])
            new_moment = new_person.copy()
            new_moment[1:] |= t[1:] != t[:-1]
            index = np.arange(len(t), dtype=np.int64)
            self._sorted_t: I64 = t
            self._sorted_person: I64 = np.cumsum(new_person) - 1
            self.position = np.empty(len(t), dtype=np.int64)
            self.position[order] = np.maximum.accumulate(np.where(new_moment, index, 0))
        self._all: Any = None

    # Positions are unsigned when packed: person ids and times come back as int64, since
    # numpy turns uint64 - int64 into float64.

    def person(self, positions: Any) -> I64:
        """Person ids, ascending with the positions (not actor keys)."""
        if self.packed:
            people: I64 = (positions >> np.uint64(self._time_bits)).astype(np.int64)
            return people
        people_of: I64 = self._sorted_person[positions]
        return people_of

    def time(self, positions: Any) -> I64:
        """Epoch microseconds."""
        if self.packed:
            mask = np.uint64((1 << self._time_bits) - 1)
            offset: I64 = (positions & mask).astype(np.int64)
            return offset + self._t0
        times: I64 = self._sorted_t[positions]
        return times

    def all_positions(self) -> Any:
        """Every row's position, sorted (computed once)."""
        if self._all is None:
            self._all = np.sort(self.position)
        return self._all

    def latest_before(self, holders: Any, positions: Any) -> I64:
        """Per position: the index in the sorted `holders` of the latest one of the same
        person at an earlier moment, -1 if none."""
        at = np.searchsorted(holders, positions, side="left") - 1
        found = holders[np.maximum(at, 0)] if len(holders) else positions
        same = self.person(found) == self.person(positions)
        return np.where((at >= 0) & same, at, -1)

    def first_from(self, holders: Any, positions: Any, *, after: bool) -> I64:
        """Per position: the time of the first of the sorted `holders` of the same person
        at the same moment or later (strictly later with `after`), `INF` if none."""
        at = np.searchsorted(holders, positions, side="right" if after else "left")
        found = holders[np.minimum(at, len(holders) - 1)] if len(holders) else positions
        ok = (at < len(holders)) & (self.person(found) == self.person(positions))
        return np.where(ok, self.time(found), INF)


def sorted_unique(values: Any) -> Any:
    """`np.unique` of an ascending array, by neighbours: numpy's hash-based unique costs
    ~0.5 us an element, this a few ns."""
    if len(values) == 0:
        return values
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]
