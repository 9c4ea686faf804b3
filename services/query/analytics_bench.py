"""Benchmark of the analyses (funnels, retention, sessions, one user, one ticketed event,
custom SQL) on a large embedded store.

    bilten-analytics bench analytics --path /tmp/ab/events.duckdb           # the same via the CLI
    python -m services.query.analytics_bench --path /tmp/ab/events.duckdb   # load, then time
    python -m services.query.analytics_bench --reuse /tmp/ab/events.duckdb  # time only

The events come from `services.bench.query_bench.synthetic_chunk` (numpy -> Arrow, no
per-row Python: 60 % page views, 20 % `ticket_viewed`, 10 % `buy_clicked`, 5 %
`ticket_purchased`, 5 % custom; 80 % signed in), with the columns those metrics leave
empty filled in here the same columnar way: a `category` and `utm_source` property,
referrers, campaigns, device types and browsers. One tenant holds every event: the
worst case, where the tenant filter prunes nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.bench.query_bench import CHUNK, START, TENANT, machine, synthetic_chunk
from services.query import cohorts, funnels, sessions, sql_sandbox, ticketed_events, users
from services.query.metrics import Granularity, Scope, TimeRange
from services.storage.event_store import DuckDBEventStore

CATEGORIES = np.array(["music", "theatre", "sports", "comedy", "festival", "family"], dtype=object)
SOURCES = np.array(["google", "facebook", "newsletter", "instagram", "direct"], dtype=object)
REFERRERS = np.array(
    [
        "",
        "",
        "https://www.google.com/search?q=tickets",
        "https://t.co/abc",
        "https://www.facebook.com/events/1",
        "https://news.example.org/article/7",
        "http://blog.example.com:8080/post?id=3",
    ],
    dtype=object,
)
CAMPAIGNS = np.array(["", "", "", "spring-sale", "newsletter-12", "retargeting"], dtype=object)
DEVICES = np.array(["desktop", "mobile", "mobile", "tablet"], dtype=object)
BROWSERS = np.array(["Chrome", "Chrome", "Safari", "Firefox", "Edge"], dtype=object)


def _pick(rng: np.random.Generator, values: np.ndarray, n: int) -> pa.Array:
    return pa.array(values[rng.integers(0, len(values), size=n)], pa.string())


def analytics_chunk(
    rng: np.random.Generator, first_id: int, occurred_us: np.ndarray, users: int
) -> pa.Table:
    """`synthetic_chunk` with properties, referrers, campaigns, devices and browsers."""
    table = synthetic_chunk(rng, first_id, occurred_us, users, 1)
    n = table.num_rows
    properties = pc.binary_join_element_wise(
        '{"category": "',
        _pick(rng, CATEGORIES, n),
        '", "utm_source": "',
        _pick(rng, SOURCES, n),
        '"}',
        "",
    )
    with_properties = pa.array(rng.random(n) < 0.7)
    replaced = {
        "properties_json": pc.if_else(with_properties, properties, "{}"),
        "referrer": _pick(rng, REFERRERS, n),
        "campaign_id": _pick(rng, CAMPAIGNS, n),
        "device_type": _pick(rng, DEVICES, n),
        "browser_family": _pick(rng, BROWSERS, n),
    }
    for name, values in replaced.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def load(store: DuckDBEventStore, events: int, users: int, days: int, seed: int = 1) -> None:
    """Appends `events` events over `days` days from `START`, in time order."""
    rng = np.random.default_rng(seed)
    start_us = int(START.timestamp()) * 1_000_000
    occurred = np.sort(rng.integers(0, days * 86_400_000_000, size=events)) + start_us
    for first in range(0, events, CHUNK):
        store.append_table(analytics_chunk(rng, first, occurred[first : first + CHUNK], users))


def _timed(call: Callable[[], object], repeats: int) -> dict[str, Any]:
    """Median wall and process-CPU milliseconds of `repeats` calls after one warm-up.

    CPU time (all threads of this process) is reported too: on a shared machine the
    wall clock also measures the neighbours, the CPU time much less so.
    """
    try:
        call()
    except Exception as error:  # one failed analysis must not lose the others' figures
        return {"error": f"{type(error).__name__}: {error}"}
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
    }


def analyses(
    store: DuckDBEventStore, days: int, users_loaded: int = 1_000_000
) -> dict[str, Callable[[], object]]:
    """Each analysis as its RPC calls it, over the whole loaded period, by name.

    The sampled user numbers wrap at the loaded population (`users_loaded`), so a small
    run (`--users 200`) times users that exist rather than `NOT_FOUND` answers; with the
    default million they are the users of the published figures.
    """
    scope = Scope.tenant(TENANT)
    period = TimeRange(START, START + timedelta(days=days))
    steps = (
        funnels.FunnelStep("ticket_viewed"),
        funnels.FunnelStep("buy_clicked"),
        funnels.FunnelStep("ticket_purchased"),
    )

    def funnel(**options: Any) -> Callable[[], object]:
        spec = funnels.FunnelSpec(steps=steps, window=timedelta(days=7), **options)
        return lambda: funnels.compute_funnel(store, scope, period, spec)

    def retention(**options: Any) -> Callable[[], object]:
        spec = cohorts.CohortSpec(period_count=12, **options)
        return lambda: cohorts.compute_cohorts(store, scope, period, spec)

    def custom_sql(sql: str) -> Callable[[], object]:
        options = sql_sandbox.QueryOptions(timeout=timedelta(seconds=60))
        return lambda: sql_sandbox.execute(store, scope, sql, options)

    last_30_days = TimeRange(period.end - timedelta(days=30), period.end)
    last_day = TimeRange(period.end - timedelta(days=1), period.end)
    out: dict[str, Callable[[], object]] = {
        "funnel_3_steps_ordered": funnel(),
        "funnel_3_steps_strict": funnel(order=funnels.FunnelOrder.STRICT),
        "funnel_3_steps_any_order": funnel(order=funnels.FunnelOrder.ANY),
        "funnel_3_steps_breakdown_utm_source": funnel(breakdown_property="utm_source"),
        "funnel_3_steps_exclusion": funnel(exclusion_event_names=("custom_thing",)),
        "retention_12_weeks_first_seen": retention(),
        "retention_12_weeks_first_purchase_music": retention(
            cohort_event_name="ticket_purchased", property_equals=(("category", "music"),)
        ),
        "ticketed_event_analytics_30_days": lambda: ticketed_events.ticketed_event_analytics(
            store, scope, "concert-7", last_30_days, Granularity.DAY
        ),
        "sessions_last_day_hourly": lambda: sessions.session_analytics(
            store, scope, last_day, Granularity.HOUR
        ),
        "sessions_whole_period_daily": lambda: sessions.session_analytics(
            store, scope, period, Granularity.DAY
        ),
        "custom_sql_events_and_users_by_name": custom_sql(
            "SELECT event_name, count(*) AS n, count(DISTINCT user_id) AS users"
            " FROM events GROUP BY ALL ORDER BY n DESC"
        ),
        "custom_sql_events_by_category_json": custom_sql(
            "SELECT properties->>'category' AS category, count(*) AS n"
            " FROM events GROUP BY ALL ORDER BY n DESC"
        ),
    }
    for number in (17, 4242, 99_001, 512_345, 876_543):
        user_id = f"user-{number % users_loaded}"
        out[f"user_analytics_{user_id}"] = lambda u=user_id: users.user_analytics(  # type: ignore[misc]
            store, scope, u
        )
    return out


def sample_results(
    store: DuckDBEventStore, days: int, users_loaded: int = 1_000_000
) -> dict[str, Any]:
    """A few of the answers, to show the timed work is real work."""
    calls = analyses(store, days, users_loaded)
    funnel = calls["funnel_3_steps_ordered"]()
    retention = calls["retention_12_weeks_first_seen"]()
    assert isinstance(funnel, funnels.FunnelResult) and isinstance(retention, tuple)
    return {
        "funnel_3_steps_ordered_users": [s.users for s in funnel.breakdowns[0].steps],
        "funnel_median_seconds": [s.median_seconds_from_start for s in funnel.breakdowns[0].steps],
        "retention_first_cohort": {
            "size": retention[1].size,
            "retained": list(retention[1].retained_counts),
        },
    }


def time_analyses(
    store: DuckDBEventStore,
    days: int,
    repeats: int = 5,
    only: str = "",
    users_loaded: int = 1_000_000,
) -> dict[str, Any]:
    """Times the analyses whose name contains `only`, printing each as it finishes."""
    report: dict[str, Any] = {}
    for name, call in analyses(store, days, users_loaded).items():
        if only in name:
            report[name] = _timed(call, repeats)
            print(name, report[name], file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    """Loads and times (see the module docstring); `argv` as for `bilten-analytics bench
    analytics`, None reads the process's own arguments."""
    parser = argparse.ArgumentParser(
        prog="bilten-analytics bench analytics",
        description=__doc__.split("\n")[0] if __doc__ else None,
    )
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=91)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--path", type=Path, default=None, help="load into (and keep) this file")
    parser.add_argument("--reuse", type=Path, default=None, help="time an already loaded file")
    parser.add_argument("--load-only", action="store_true")
    parser.add_argument("--only", default="", help="time the analyses whose name has this")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"events": args.events, "users": args.users, "days": args.days}
    workdir = None
    if args.reuse is not None:
        path = args.reuse
    else:
        if args.path is None:
            workdir = Path(tempfile.mkdtemp(prefix="bilten-analytics-bench-"))
        path = args.path or Path(str(workdir)) / "events.duckdb"
        if path.exists():
            raise SystemExit(f"{path} exists; time it with --reuse")
    try:
        with DuckDBEventStore(path) as store:
            if args.reuse is None:
                started = time.perf_counter()
                load(store, args.events, args.users, args.days)
                report["load_seconds"] = round(time.perf_counter() - started, 1)
            if not args.load_only:
                report["analyses"] = time_analyses(
                    store, args.days, args.repeats, args.only, args.users
                )
                report["sample_results"] = sample_results(store, args.days, args.users)
        report["machine"] = machine()
        report["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        print(json.dumps(report, indent=2))
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
