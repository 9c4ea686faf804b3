"""Query benchmark of the embedded store: metrics over a large DuckDB file, and raw
`append` throughput.

    python -m services.bench.query_bench [--events 10000000] [--users 1000000] [--days 30]

`run` generates synthetic events column by column (numpy -> Arrow, no per-row Python),
loads them through `DuckDBEventStore.append_table` (so actor keys are assigned as in
production), then times the metrics dashboards call: daily active users over the whole
period for one tenant, event counts by day, revenue by day (median of `repeats` runs
after one warm-up). By default one tenant holds every event: the worst case, a scan of
the whole table. `run_ingest_store` times `append` of 1,000-event `TrackedEvent`
batches, the path a group commit takes (Arrow conversion, one transaction, fsync).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.events.model import Enrichment, EventSource, TrackedEvent, TrackedEventType
from services.query import metrics
from services.query.metrics import Granularity, Scope, TimeRange
from services.storage.event_store import EVENT_ARROW_SCHEMA, DuckDBEventStore

START = datetime(2024, 3, 1, tzinfo=UTC)
TENANT = "bench-tenant"
CHUNK = 1_000_000
_TYPES = np.array([t.value for t in TrackedEventType], dtype=object)
_TYPE_SHARE = [0.2, 0.6, 0.1, 0.05, 0.05]  # in TrackedEventType order
_NAMES = {
    "track": "ticket_viewed",
    "page_view": "page_view",
    "click": "buy_clicked",
    "conversion": "ticket_purchased",
    "custom": "custom_thing",
}
_NAME_OF_TYPE = np.array([_NAMES[t] for t in _TYPES], dtype=object)
_COUNTRIES = np.array(
    ["DE", "FR", "US", "GB", "NL", "ES", "IT", "PL", "SE", "TR", "BR", "JP", "IN", "CA", ""],
    dtype=object,
)


def _strings(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def synthetic_chunk(
    rng: np.random.Generator,
    first_id: int,
    occurred_us: np.ndarray,
    users: int,
    tenants: int,
) -> pa.Table:
    """`len(occurred_us)` events as an Arrow table of `EVENT_ARROW_SCHEMA`."""
    n = len(occurred_us)
    empty = pa.repeat("", n)
    type_index = rng.choice(len(_TYPES), size=n, p=_TYPE_SHARE)
    types = pa.array(_TYPES[type_index], pa.string())
    names = pa.array(_NAME_OF_TYPE[type_index], pa.string())
    person = rng.integers(0, users, size=n)
    known = rng.random(n) < 0.8  # 80% logged in, the rest anonymous only
    user_id = pc.if_else(pa.array(known), _strings("user-", person), "")
    anonymous_id = pc.if_else(pa.array(known), "", _strings("anon-", person))
    conversion = type_index == 3
    cents = np.where(conversion, rng.integers(500, 20_000, size=n), 0)
    currency = pc.if_else(
        pa.array(conversion), pa.array(np.where(rng.random(n) < 0.7, "EUR", "USD")), ""
    )
    order = pc.if_else(pa.array(conversion), _strings("o-", first_id + np.arange(n)), "")
    tenant = (
        pa.repeat(TENANT, n)
        if tenants == 1
        else pc.if_else(
            pa.array(rng.integers(0, tenants, size=n) == 0),
            TENANT,
            _strings("tenant-", rng.integers(1, tenants, size=n)),
        )
    )
    occurred = pa.array(occurred_us, pa.timestamp("us", tz="UTC"))
    columns: dict[str, pa.Array] = {
        "tenant_id": tenant,
        "event_id": _strings("ev-", first_id + np.arange(n)),
        "event_type": types,
        "event_name": names,
        "occurred_at": occurred,
        "received_at": occurred,
        "source": pa.repeat("web", n),
        "session_id": _strings("s-", person * 7 + occurred_us // 3_600_000_000 % 7),
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "page_url": pa.repeat("https://bilten.example/e/1", n),
        "page_title": empty,
        "referrer": empty,
        "ticketed_event_id": _strings("concert-", rng.integers(0, 200, size=n)),
        "campaign_id": empty,
        "order_id": order,
        # Whole cents as float64 are exact enough to round to 2 decimals on the cast.
        "revenue": pa.array(cents / 100).cast(pa.decimal128(18, 2)).cast(pa.decimal128(18, 6)),
        "currency": currency,
        "quantity": pa.array(np.where(conversion, rng.integers(1, 5, size=n), 0), pa.int32()),
        "properties_json": pa.repeat("{}", n),
        "schema_id": pa.array(np.zeros(n, dtype=np.int32)),
        "ip_hash": empty,
        "country_code": pa.array(_COUNTRIES[rng.integers(0, len(_COUNTRIES), size=n)], pa.string()),
        "browser_family": pa.repeat("Chrome", n),
        "browser_version": pa.repeat("126", n),
        "os_family": pa.repeat("Linux", n),
        "device_type": pa.repeat("desktop", n),
    }
    return pa.Table.from_pydict(columns, schema=EVENT_ARROW_SCHEMA)


def load_synthetic(
    store: DuckDBEventStore, events: int, users: int, days: int, tenants: int, seed: int = 1
) -> None:
    """Appends `events` events over `days` days in time order (as they would arrive)."""
    rng = np.random.default_rng(seed)
    span_us = days * 86_400_000_000
    start_us = int(START.timestamp()) * 1_000_000
    occurred = np.sort(rng.integers(0, span_us, size=events)) + start_us
    for first in range(0, events, CHUNK):
        chunk = occurred[first : first + CHUNK]
        store.append_table(synthetic_chunk(rng, first, chunk, users, tenants))


def _timed(call: Callable[[], object], repeats: int) -> dict[str, Any]:
    """Median wall and CPU milliseconds of `repeats` calls after one warm-up.

    CPU time (all threads of this process) is reported too: on a shared machine the
    wall clock also measures the neighbours, the CPU time much less so.
    """
    call()  # warm-up: first touch of the file's blocks
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        call()
        wall.append((time.perf_counter() - wall_start) * 1000)
        cpu.append((time.process_time() - cpu_start) * 1000)
    return {
        "wall_ms_median": round(statistics.median(wall), 1),
        "wall_ms_min": round(min(wall), 1),
        "cpu_ms_median": round(statistics.median(cpu), 1),
        "wall_ms_runs": [round(w, 1) for w in wall],
    }


def time_queries(store: DuckDBEventStore, days: int, repeats: int = 7) -> dict[str, Any]:
    """The three dashboard metrics over the whole loaded period, for the bench tenant."""
    scope = Scope.tenant(TENANT)
    period = TimeRange(START, START + timedelta(days=days))
    day = Granularity.DAY
    return {
        # The DAU series plus DAU/WAU/MAU as of the end: what the dashboard asks for.
        "active_users_by_day": _timed(
            lambda: metrics.active_users(store, scope, period, day), repeats
        ),
        "event_counts_by_day": _timed(
            lambda: metrics.event_counts(store, scope, period, day), repeats
        ),
        "revenue_by_day": _timed(lambda: metrics.revenue(store, scope, period, day), repeats),
    }


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


def run(
    events: int = 10_000_000,
    users: int = 1_000_000,
    days: int = 30,
    path: Path | None = None,
    *,
    tenants: int = 1,
    repeats: int = 7,
) -> dict[str, Any]:
    """Loads synthetic events into a fresh store and times three dashboard metrics."""
    if path is not None and path.exists():
        raise FileExistsError(f"{path} exists; time it with --reuse instead of loading again")
    workdir = Path(tempfile.mkdtemp(prefix="bilten-query-bench-")) if path is None else None
    db_path = path if path is not None else Path(str(workdir)) / "events.duckdb"
    try:
        with DuckDBEventStore(db_path) as store:
            started = time.perf_counter()
            load_synthetic(store, events, users, days, tenants)
            load_seconds = time.perf_counter() - started
            timings = time_queries(store, days, repeats)
            tenant_events = store.count(TENANT)
        return {
            "events": events,
            "tenant_events": tenant_events,
            "users": users,
            "days": days,
            "tenants": tenants,
            "load_seconds": round(load_seconds, 1),
            "load_events_per_second": round(events / load_seconds),
            "file_mib": round(db_path.stat().st_size / 2**20, 1),
            **timings,
            "machine": machine(),
        }
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _tracked_events(count: int, users: int, seed: int) -> list[TrackedEvent]:
    rng = np.random.default_rng(seed)
    people = rng.integers(0, users, size=count).tolist()
    kinds = rng.choice(len(_TYPES), size=count, p=_TYPE_SHARE).tolist()
    now = datetime.now(UTC)
    out = []
    for i, (person, kind) in enumerate(zip(people, kinds, strict=True)):
        event_type = TrackedEventType(_TYPES[kind])
        paid = event_type is TrackedEventType.CONVERSION
        out.append(
            TrackedEvent(
                tenant_id=TENANT,
                event_id=f"ingest-{seed}-{i}",
                event_type=event_type,
                event_name=_NAMES[event_type.value],
                occurred_at=now,
                received_at=now,
                source=EventSource.WEB,
                session_id=f"s-{person}",
                user_id=f"user-{person}",
                page_url="https://bilten.example/e/1",
                ticketed_event_id=f"concert-{person % 200}",
                order_id=f"o-{seed}-{i}" if paid else "",
                revenue=Decimal("49.90") if paid else Decimal(0),
                currency="EUR" if paid else "",
                quantity=2 if paid else 0,
                enrichment=Enrichment("9f2c", "DE", "Chrome", "126", "Linux", "desktop"),
            )
        )
    return out


def run_ingest_store(
    batches: int = 200, batch_size: int = 1000, users: int = 100_000, path: Path | None = None
) -> dict[str, Any]:
    """`append` throughput with `TrackedEvent` batches (objects built before timing)."""
    workdir = Path(tempfile.mkdtemp(prefix="bilten-ingest-bench-")) if path is None else None
    db_path = path if path is not None else Path(str(workdir)) / "events.duckdb"
    prepared = [_tracked_events(batch_size, users, seed) for seed in range(batches)]
    latencies = []
    try:
        with DuckDBEventStore(db_path) as store:
            started = time.perf_counter()
            for batch in prepared:
                t = time.perf_counter()
                store.append(batch)
                latencies.append((time.perf_counter() - t) * 1000)
            elapsed = time.perf_counter() - started
        latencies.sort()
        return {
            "batches": batches,
            "batch_size": batch_size,
            "events_per_second": round(batches * batch_size / elapsed),
            "batch_ms_p50": round(latencies[len(latencies) // 2], 1),
            "batch_ms_p99": round(
                latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)], 1
            ),
            "machine": machine(),
        }
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--tenants", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--path", type=Path, default=None, help="keep the DuckDB file here")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="only time the queries on this loaded file"
    )
    parser.add_argument("--ingest-batches", type=int, default=200)
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    if args.reuse is not None:
        with DuckDBEventStore(args.reuse) as store:
            report["query"] = {**time_queries(store, args.days, args.repeats), "machine": machine()}
    else:
        report["query"] = run(
            args.events,
            args.users,
            args.days,
            args.path,
            tenants=args.tenants,
            repeats=args.repeats,
        )
    if not args.skip_ingest:
        report["ingest_store"] = run_ingest_store(args.ingest_batches)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
