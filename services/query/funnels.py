"""Conversion funnels: how many people go through ordered (or unordered) steps within a
conversion window. Plain functions, no gRPC; docs/analytics.md is the user-facing
definition, this docstring the implementer's.

Definitions (one person = one actor, as in `services.query.metrics`: the user id, else
the anonymous id; events with neither are ignored):

- Time order: events are ordered by `occurred_at`. Two events at the same microsecond
  are simultaneous: neither is after the other, so one can never be the next step of
  the other.
- Entry: an event of step 1 with `occurred_at` in [start, end) of the range. Later
  steps may happen after the range end, up to the conversion window.
- Window: a sequence counts when its last step is at most `window` after its first.
- ORDERED: step k+1 happens after step k (other events may happen in between).
- STRICT: as ORDERED, and the person has no other event strictly between two
  consecutive steps (events simultaneous with a step do not break it).
- ANY: the steps may happen in any order. An attempt starts at any step event inside
  the range; the person reaches "step j" when j distinct steps happen within
  [attempt start, attempt start + window].
- Exclusions: a sequence is spoiled when one of the person's exclusion events happens
  strictly after its first step and strictly before its last. (STRICT sequences cannot
  contain one.) Exclusion names must differ from the step names.
- A person reaches step j when some unspoiled sequence reaches it; their time to step j
  is the shortest such sequence (first to last event). Reaching step j implies reaching
  every step before it.
- Breakdown: a person's value is the property on their first entry event (ties at the
  same microsecond: the smallest value; a missing property or JSON null gives ""). The
  overall funnel comes first, then at most `MAX_BREAKDOWN_VALUES` values with the most
  entrants (ties by value).
- Rates: conversion from start = reached / entered; from previous = reached / reached
  the step before (step 1: 1.0); drop-off = 1 - from previous; all 0.0 when the
  denominator is 0. Medians are over the people who reached the step (the mean of the
  two middle values for an even count); 0.0 when nobody did.

How: DuckDB scans the relevant rows (step and exclusion events; every event of the
entrants for STRICT), unsorted. Each row becomes a *position*, an integer that packs the
person above the microseconds (`services.query.timelines`), so ordering rows by
(person, time) is `np.sort` of plain integers, per step. The sequence logic is then one
binary search per step into the previous step's sorted positions, plus per-person
minima: vectorised, no per-person Python loop. (Sorting the rows in DuckDB, or DuckDB
window functions, which need one sort of all rows per step, measured 2-4x slower:
docs/benchmarks-analytics.md.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from services.query.metrics import EPOCH, Scope, TimeRange
from services.query.scoped_sql import (
    Params,
    actor_columns,
    properties_match,
    property_text,
    tenant_filter,
)
from services.query.timelines import INF, PersonTimeline, sorted_unique
from services.storage.event_store import TABLE, EventStore

DEFAULT_WINDOW = timedelta(days=7)
MAX_WINDOW = timedelta(days=90)
MIN_STEPS, MAX_STEPS = 2, 10
MAX_BREAKDOWN_VALUES = 50

_I64 = npt.NDArray[np.int64]


class FunnelOrder(enum.StrEnum):
    ORDERED = "ordered"
    STRICT = "strict"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class FunnelStep:
    event_name: str
    # Every pair must match (see `scoped_sql.property_text` for how values compare).
    property_equals: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class FunnelSpec:
    steps: tuple[FunnelStep, ...]
    window: timedelta = DEFAULT_WINDOW
    order: FunnelOrder = FunnelOrder.ORDERED
    exclusion_event_names: tuple[str, ...] = ()
    breakdown_property: str | None = None

    def __post_init__(self) -> None:
        if not MIN_STEPS <= len(self.steps) <= MAX_STEPS:
            raise ValueError(f"a funnel has {MIN_STEPS}-{MAX_STEPS} steps")
        if not timedelta(0) < self.window <= MAX_WINDOW:
            raise ValueError(f"the conversion window must be in (0, {MAX_WINDOW}]")
        clash = set(self.exclusion_event_names) & {s.event_name for s in self.steps}
        if clash:
            raise ValueError(f"exclusion events may not be steps: {sorted(clash)}")


@dataclass(frozen=True, slots=True)
class FunnelStepResult:
    step_index: int  # zero-based
    event_name: str
    users: int
    conversion_rate_from_start: float
    conversion_rate_from_previous: float
    drop_off_rate: float
    median_seconds_from_start: float


@dataclass(frozen=True, slots=True)
class FunnelBreakdown:
    breakdown_value: str | None  # None: the overall funnel
    steps: tuple[FunnelStepResult, ...]


@dataclass(frozen=True, slots=True)
class FunnelResult:
    breakdowns: tuple[FunnelBreakdown, ...]  # the overall funnel first


@dataclass(frozen=True, slots=True)
class PersonProgress:
    """Per entrant: microseconds from entry to each step, `INF` where not reached."""

    durations: _I64  # shape (people, steps); column 0 is 0
    breakdown_values: pa.Array | None  # one string per person, or None


# --- SQL -----------------------------------------------------------------------------


def _step_condition(params: Params, step: FunnelStep) -> str:
    name = f"event_name = {params.bind(step.event_name, 'step')}"
    if not step.property_equals:
        return name
    # Inside CASE so the JSON is parsed only for rows of this event name.
    return f"(CASE WHEN {name} THEN {properties_match(params, step.property_equals)} END)"


def _rows_sql(scope: Scope, time_range: TimeRange, spec: FunnelSpec) -> tuple[str, Params]:
    """The rows the sequence logic needs, in no particular order, with a bit mask per
    row: bit k-1 = step k, bit n = exclusion. For ORDERED and STRICT, bit 0 also requires
    the row to be inside the range (only such rows are entries). With a breakdown, entry
    rows carry the property's text ("" when missing), other rows NULL."""
    params = Params()
    n = len(spec.steps)
    start = params.bind(time_range.start, "start")
    scan_end = params.bind(time_range.end + spec.window, "scan_end")

    def end() -> str:  # bound where used: DuckDB refuses unused parameters
        return params.bind(time_range.end, "end")

    bits = []
    for k, step in enumerate(spec.steps):
        condition = _step_condition(params, step)
        if k == 0 and spec.order is not FunnelOrder.ANY:
            condition = f"{condition} AND occurred_at < {end()}"
        bits.append(f"CASE WHEN {condition} THEN {1 << k} ELSE 0 END")
    if spec.exclusion_event_names:
        names = ", ".join(params.bind(name, "exclusion") for name in spec.exclusion_event_names)
        bits.append(f"CASE WHEN event_name IN ({names}) THEN {1 << n} ELSE 0 END")
    person = ", ".join(actor_columns(scope))
    where = " AND ".join(
        [
            tenant_filter(scope, params),
            "actor_key IS NOT NULL",
            f"occurred_at >= {start}",
            f"occurred_at < {scan_end}",
        ]
    )
    if spec.order is FunnelOrder.STRICT:
        # Every event of an entrant matters (it may sit between two steps); people
        # without an entry are left out before anything is sorted.
        entry = _step_condition(params, spec.steps[0])
        source = (
            f"{TABLE} SEMI JOIN (SELECT DISTINCT {person} FROM {TABLE} WHERE {where}"
            f" AND {entry} AND occurred_at < {end()}) AS entrants USING ({person})"
        )
        relevant = "TRUE"
        keep = "TRUE"
    else:
        wanted = sorted({s.event_name for s in spec.steps} | set(spec.exclusion_event_names))
        relevant = f"event_name IN ({', '.join(params.bind(x, 'name') for x in wanted)})"
        source = TABLE
        keep = "mask <> 0"
    outer = [person, "epoch_us(occurred_at) AS t", "mask"]
    inner = [person, "occurred_at", f"{' + '.join(bits)} AS mask"]
    if spec.breakdown_property:
        inner.append("properties_json")
        if spec.order is FunnelOrder.ANY:
            entry_row = f"(mask & {(1 << n) - 1}) <> 0 AND occurred_at < {end()}"
        else:
            entry_row = "(mask & 1) = 1"
        value = property_text(params, spec.breakdown_property)
        outer.append(f"CASE WHEN {entry_row} THEN coalesce({value}, '') END AS breakdown")
    sql = (
        f"SELECT {', '.join(outer)} FROM (SELECT {', '.join(inner)} FROM {source}"
        f" WHERE {where} AND {relevant}) WHERE {keep}"
    )
    return sql, params


# --- the sequence logic ----------------------------------------------------------------


class _StepTimeline(PersonTimeline):
    """A `PersonTimeline` of the funnel rows, with each row's step / exclusion bits."""

    def __init__(self, rows: pa.Table, scope: Scope, scan_start_us: int) -> None:
        super().__init__(rows, scope, scan_start_us)
        self.mask = rows.column("mask").to_numpy()

    def rows_with(self, bit: int) -> _I64:
        return np.flatnonzero(self.mask & (1 << bit))

    def positions(self, bit: int) -> Any:
        """Sorted positions of the rows with this bit (repeated for simultaneous rows)."""
        return np.sort(self.position[self.rows_with(bit)])


def _per_person_min(people: _I64, values: _I64) -> tuple[_I64, _I64]:
    """(person, min value) for values whose people are in ascending order."""
    if len(people) == 0:
        return people, values
    firsts = np.flatnonzero(np.diff(people, prepend=people[0] - 1) != 0)
    return people[firsts], np.minimum.reduceat(values, firsts)


def _sequence_minima(
    timeline: _StepTimeline, spec: FunnelSpec
) -> tuple[_I64, list[tuple[_I64, _I64]]]:
    """ORDERED and STRICT: the entrants (person ids, ascending) and, per step, (person,
    shortest unspoiled sequence reaching the step in microseconds) for those reaching it.

    Step k's latest possible start at a row is the latest start of step k-1 at an
    earlier moment (the previous moment only, for STRICT). Starts only grow along a
    person's moments, so the latest start comes from the latest such row, and it is the
    best one: it gives the shortest sequence, and every other sequence ending at the row
    spans it, so it is spoiled by an exclusion or the window whenever the latest one
    is. Each step touches only its own rows.
    """
    n_steps = len(spec.steps)
    window = spec.window // timedelta(microseconds=1)
    exclusions = timeline.positions(n_steps) if spec.exclusion_event_names else []
    holders = timeline.positions(0)  # step k-1 rows with a start, sorted
    starts = timeline.time(holders)  # their latest starts
    entrants = sorted_unique(timeline.person(holders))
    reached = [(entrants, np.zeros(len(entrants), dtype=np.int64))]
    for k in range(1, n_steps):
        candidates = timeline.positions(k)
        if spec.order is FunnelOrder.STRICT:
            at = _holder_at_previous_moment(timeline, holders, candidates)
        else:
            at = timeline.latest_before(holders, candidates)
        has_start = at >= 0
        candidates = candidates[has_start]
        start = starts[at[has_start]]
        duration = timeline.time(candidates) - start
        valid = duration <= window
        if len(exclusions):
            spoiler = timeline.latest_before(exclusions, candidates)
            spoiled_at = timeline.time(exclusions[np.maximum(spoiler, 0)])
            valid &= (spoiler < 0) | (spoiled_at <= start)
        reached.append(_per_person_min(timeline.person(candidates[valid]), duration[valid]))
        holders, starts = candidates, start
    return entrants, reached


def _holder_at_previous_moment(timeline: _StepTimeline, holders: Any, candidates: Any) -> _I64:
    """STRICT: per candidate, the index in `holders` of a holder at the person's moment
    right before the candidate's (no other event between them), -1 if none. Holders at
    one moment share their start, so any of them will do."""
    every = timeline.all_positions()
    at = np.searchsorted(every, candidates, side="left") - 1
    previous = every[np.maximum(at, 0)]
    ok = (at >= 0) & (timeline.person(previous) == timeline.person(candidates))
    found = np.searchsorted(holders, previous, side="right") - 1
    ok &= found >= 0
    ok &= holders[np.maximum(found, 0)] == previous if len(holders) else False
    return np.where(ok, found, -1)


def _any_order_minima(
    timeline: _StepTimeline, spec: FunnelSpec, end_us: int
) -> tuple[_I64, list[tuple[_I64, _I64]]]:
    """ANY: the entrants and, per level j, (person, shortest time from an attempt's start
    to j + 1 distinct steps done within the window).

    An attempt starts at a step event inside the range. From there, each step's earliest
    occurrence at or after the start's moment is a binary search, and the j-th smallest
    of those is when j steps are done. Any window holding j steps can slide forward to
    start at its first event, so the best attempt is among these. An exclusion strictly
    after the start spoils the levels reached after it.
    """
    n_steps = len(spec.steps)
    window = spec.window // timedelta(microseconds=1)
    steps = [timeline.positions(k) for k in range(n_steps)]
    candidates = sorted_unique(np.sort(np.concatenate(steps)))
    candidates = candidates[timeline.time(candidates) < end_us]
    origin = timeline.time(candidates)
    done = np.empty((len(candidates), n_steps), dtype=np.int64)
    for k, holders in enumerate(steps):
        occurred = timeline.first_from(holders, candidates, after=False)
        done[:, k] = np.where(occurred - origin <= window, occurred, INF)
    done.sort(axis=1)
    if spec.exclusion_event_names:
        spoiler = timeline.first_from(timeline.positions(n_steps), candidates, after=True)
    else:
        spoiler = np.full(len(candidates), INF, dtype=np.int64)
    clean = (done != INF) & (done <= spoiler[:, None])
    durations = np.where(clean, done - origin[:, None], INF)
    people = timeline.person(candidates)
    entrants = sorted_unique(people)
    reached = []
    for k in range(n_steps):
        got = durations[:, k] != INF
        reached.append(_per_person_min(people[got], durations[got, k]))
    return entrants, reached


def _breakdown_values(rows: pa.Table, timeline: _StepTimeline, entrants: _I64) -> pa.Array:
    """Per entrant, the breakdown value of their first entry (simultaneous entries: the
    smallest value). Entry rows are the ones the SQL gave a value."""
    values = rows.column("breakdown").combine_chunks()
    entry = np.flatnonzero(values.is_valid().to_numpy(zero_copy_only=False))
    position = timeline.position[entry]
    table = pa.table(
        {
            "person": pa.array(timeline.person(position)),
            "position": pa.array(position),
            "value": values.take(pa.array(entry)),
        }
    )
    firsts = table.group_by("person").aggregate([("position", "min")])
    first_rows = table.join(firsts, "person").filter(
        pc.equal(pc.field("position"), pc.field("position_min"))
    )
    chosen = first_rows.group_by("person").aggregate([("value", "min")])
    by_person = chosen.sort_by("person")
    order = np.searchsorted(by_person["person"].to_numpy(), entrants)
    return by_person["value_min"].combine_chunks().take(pa.array(order))


def person_progress(
    store: EventStore, scope: Scope, time_range: TimeRange, spec: FunnelSpec
) -> PersonProgress:
    """Per entrant: the shortest time to each step (see the module docstring)."""
    sql, params = _rows_sql(scope, time_range, spec)
    rows = store.read(sql, params.values)
    n_steps = len(spec.steps)
    if rows.num_rows == 0:
        empty = None if not spec.breakdown_property else pa.array([], pa.string())
        return PersonProgress(np.empty((0, n_steps), dtype=np.int64), empty)
    micro = timedelta(microseconds=1)
    timeline = _StepTimeline(rows, scope, (time_range.start - EPOCH) // micro)
    if spec.order is FunnelOrder.ANY:
        end_us = (time_range.end - EPOCH) // micro
        entrants, reached = _any_order_minima(timeline, spec, end_us)
    else:
        entrants, reached = _sequence_minima(timeline, spec)
    durations = np.full((len(entrants), n_steps), INF, dtype=np.int64)
    for k, (people, minima) in enumerate(reached):
        durations[np.searchsorted(entrants, people), k] = minima
    breakdown = None
    if spec.breakdown_property:
        breakdown = _breakdown_values(rows, timeline, entrants)
    return PersonProgress(durations, breakdown)


# --- results -------------------------------------------------------------------------


def _summarise(durations: _I64, spec: FunnelSpec) -> tuple[FunnelStepResult, ...]:
    results = []
    entered = int(durations.shape[0])
    previous = entered
    for k, step in enumerate(spec.steps):
        column = durations[:, k]
        reached_durations = column[column != INF]
        users = len(reached_durations)
        from_previous = (users / previous if previous else 0.0) if k else (1.0 if users else 0.0)
        results.append(
            FunnelStepResult(
                step_index=k,
                event_name=step.event_name,
                users=users,
                conversion_rate_from_start=users / entered if entered else 0.0,
                conversion_rate_from_previous=from_previous,
                drop_off_rate=1.0 - from_previous if (previous if k else users) else 0.0,
                median_seconds_from_start=(
                    float(np.median(reached_durations)) / 1_000_000 if users else 0.0
                ),
            )
        )
        previous = users
    return tuple(results)


def compute_funnel(
    store: EventStore, scope: Scope, time_range: TimeRange, spec: FunnelSpec
) -> FunnelResult:
    """The overall funnel, then one per breakdown value (see the module docstring)."""
    progress = person_progress(store, scope, time_range, spec)
    breakdowns = [FunnelBreakdown(None, _summarise(progress.durations, spec))]
    if progress.breakdown_values is not None and len(progress.breakdown_values):
        encoded = pc.dictionary_encode(progress.breakdown_values)
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        names = encoded.dictionary.to_pylist()
        sizes = np.bincount(codes, minlength=len(names))
        chosen = sorted(range(len(names)), key=lambda c: (-int(sizes[c]), names[c]))
        for code in chosen[:MAX_BREAKDOWN_VALUES]:
            subset = progress.durations[codes == code]
            breakdowns.append(FunnelBreakdown(names[code], _summarise(subset, spec)))
    return FunnelResult(tuple(breakdowns))
