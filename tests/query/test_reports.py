"""Scheduled reports: the store, the schedule arithmetic and the scheduler."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.platform.errors import AnalyticsError
from services.query import reports
from services.query.reports import ReportSchedule, ReportScheduler, ReportStore, next_boundary
from services.storage.event_store import DuckDBEventStore
from tests.query.analytics_events import clustered_events


@pytest.mark.unit
def test_boundaries_are_utc_hours_days_and_mondays() -> None:
    t = datetime(2024, 5, 5, 23, 59, 59, tzinfo=UTC)  # a Sunday
    assert next_boundary(t, ReportSchedule.HOURLY) == datetime(2024, 5, 6, 0, tzinfo=UTC)
    assert next_boundary(t, ReportSchedule.DAILY) == datetime(2024, 5, 6, tzinfo=UTC)
    assert next_boundary(t, ReportSchedule.WEEKLY) == datetime(2024, 5, 6, tzinfo=UTC)
    monday = datetime(2024, 5, 6, tzinfo=UTC)
    assert next_boundary(monday, ReportSchedule.HOURLY) == monday + timedelta(hours=1)
    assert next_boundary(monday, ReportSchedule.DAILY) == monday + timedelta(days=1)
    assert next_boundary(monday, ReportSchedule.WEEKLY) == monday + timedelta(days=7)
    local = datetime.fromisoformat("2024-05-06T01:30:00+02:00")  # Sunday 23:30 UTC
    assert next_boundary(local, ReportSchedule.WEEKLY) == monday


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    with DuckDBEventStore(tmp_path_factory.mktemp("reports") / "events.duckdb") as opened:
        opened.append(clustered_events(41, 20))
        yield opened


T0 = datetime(2024, 5, 6, 10, 15, tzinfo=UTC)
COUNT_SQL = "SELECT count(*) AS n FROM events"


@pytest.mark.integration
def test_scheduler_runs_new_reports_then_on_schedule(
    store: DuckDBEventStore, tmp_path: Path
) -> None:
    clock = Clock(T0)
    saved = ReportStore(tmp_path / "m.sqlite3")
    scheduler = ReportScheduler(saved, store, clock=clock)
    hourly = saved.create("acme", "hourly", COUNT_SQL, ReportSchedule.HOURLY, clock())
    daily = saved.create("globex", "daily", COUNT_SQL, ReportSchedule.DAILY, clock())
    assert scheduler.run_due() == 2  # both run right away
    assert scheduler.run_due() == 0
    first = saved.get("acme", hourly.report_id)
    assert first is not None and first.latest_run is not None
    assert first.latest_run.rows == ((store.count("acme"),),)
    assert first.next_run_time == datetime(2024, 5, 6, 11, tzinfo=UTC)
    clock.now = datetime(2024, 5, 6, 11, 0, 1, tzinfo=UTC)
    assert scheduler.run_due() == 1  # only the hourly one
    # Down for three days: one catch-up run each, not one per missed boundary.
    clock.now = T0 + timedelta(days=3)
    assert scheduler.run_due() == 2
    assert scheduler.run_due() == 0
    later = saved.get("globex", daily.report_id)
    assert later is not None and later.next_run_time == datetime(2024, 5, 10, tzinfo=UTC)
    assert later.latest_run is not None and later.latest_run.finish_time == clock.now
    saved.close()


@pytest.mark.integration
def test_two_schedulers_never_run_the_same_boundary_twice(
    store: DuckDBEventStore, tmp_path: Path
) -> None:
    clock = Clock(T0)
    path = tmp_path / "m.sqlite3"
    one, two = ReportStore(path), ReportStore(path)
    for i in range(5):
        one.create("acme", f"r{i}", COUNT_SQL, ReportSchedule.HOURLY, clock())
    ran = ReportScheduler(one, store, clock=clock).run_due()
    ran += ReportScheduler(two, store, clock=clock).run_due()
    assert ran == 5
    one.close()
    two.close()


@pytest.mark.integration
def test_failures_are_recorded_and_runs_are_pruned(store: DuckDBEventStore, tmp_path: Path) -> None:
    clock = Clock(T0)
    saved = ReportStore(tmp_path / "m.sqlite3")
    scheduler = ReportScheduler(saved, store, clock=clock)
    broken = saved.create(
        "acme", "broken", "SELECT no_such_column FROM events", ReportSchedule.HOURLY, clock()
    )
    for hour in range(reports.KEEP_RUNS + 3):
        clock.now = T0 + timedelta(hours=hour)
        scheduler.run_due()
    got = saved.get("acme", broken.report_id)
    assert got is not None and got.latest_run is not None
    assert "no_such_column" in got.latest_run.error_message
    assert got.latest_run.rows == () and got.latest_run.finish_time == clock.now
    (runs,) = saved._conn.execute(
        "SELECT count(*) FROM query_report_runs WHERE report_id = ?", [broken.report_id]
    ).fetchone()
    assert runs == reports.KEEP_RUNS
    assert saved.delete("acme", broken.report_id)
    (runs,) = saved._conn.execute("SELECT count(*) FROM query_report_runs").fetchone()
    assert runs == 0
    saved.close()


@pytest.mark.integration
def test_listing_pages_and_tenancy(tmp_path: Path) -> None:
    saved = ReportStore(tmp_path / "m.sqlite3")
    made = [
        saved.create("acme", f"r{i}", COUNT_SQL, ReportSchedule.DAILY, T0 + timedelta(seconds=i))
        for i in range(7)
    ]
    saved.create("globex", "theirs", COUNT_SQL, ReportSchedule.DAILY, T0)
    seen, token = [], ""
    while True:
        page, token = saved.list_page("acme", 3, token)
        seen.extend(r.report_id for r in page)
        if not token:
            break
    assert seen == [r.report_id for r in made]
    _, token = saved.list_page("acme", 3, "")
    with pytest.raises(AnalyticsError) as caught:
        saved.list_page("globex", 3, token)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert saved.get("globex", made[0].report_id) is None
    assert not saved.delete("globex", made[0].report_id)
    saved.close()


@pytest.mark.integration
def test_a_platform_report_reads_every_tenant(store: DuckDBEventStore, tmp_path: Path) -> None:
    clock = Clock(T0)
    saved = ReportStore(tmp_path / "m.sqlite3")
    made = saved.create(
        "",
        "all",
        "SELECT tenant_id, count(*) FROM events GROUP BY 1 ORDER BY 1",
        ReportSchedule.WEEKLY,
        clock(),
    )
    ReportScheduler(saved, store, clock=clock).run_due()
    got = saved.get("", made.report_id)
    assert got is not None and got.latest_run is not None
    assert got.latest_run.rows == (("acme", store.count("acme")), ("globex", store.count("globex")))
    assert saved.get("acme", made.report_id) is None
    saved.close()
