"""Scheduled reports: a custom SQL query (`sql_sandbox`) run on a schedule, its results
kept. Plain code, no gRPC; docs/analytics.md is the user-facing definition.

Storage: two tables of this module's own in the SQLite metadata file (the metadata store
owns the file's other tables; this connection only touches `query_reports` and
`query_report_runs`), WAL with `synchronous = FULL` like the metadata store, so a created
report or a finished run survives a crash once the call returns. Times are fixed-width
UTC ISO-8601 text, which sorts like the instants.

Ownership: a report belongs to the tenant of the credential that created it ("" for a
platform admin without a tenant: such a report reads across tenants) and is invisible to
every other tenant. It runs with exactly that scope.

Schedule: hourly (every hour on the hour), daily (00:00 UTC), weekly (Monday 00:00 UTC).
A new report runs once right away, then at each boundary. Boundaries missed while the
server was down are not replayed one by one: the report runs once, then continues on
schedule. Several schedulers may share the file (replicas): a run is claimed by moving
`next_run_at` with a compare-and-set, so each due run happens once.

A run stores the first `MAX_REPORT_ROWS` rows (the first page of the query, with the
`sql_sandbox` deadline of `REPORT_TIMEOUT`), or the error when the query failed
(refused, timed out, invalid). The last `KEEP_RUNS` runs are kept; `latest_run` is the
newest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.platform.errors import AnalyticsError, StatusCode
from services.query import sql_sandbox
from services.query.metrics import Scope
from services.query.sql_sandbox import QueryOptions, ResultColumn
from services.storage.event_store import EventStore

MAX_REPORT_ROWS = 10_000
REPORT_TIMEOUT = timedelta(seconds=60)
KEEP_RUNS = 10
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS query_reports (
  report_id    TEXT PRIMARY KEY,
  tenant_key   TEXT NOT NULL,  -- tenant id, '' = every tenant (platform admins)
  display_name TEXT NOT NULL,
  sql          TEXT NOT NULL,
  schedule     TEXT NOT NULL,  -- ReportSchedule value
  created_at   TEXT NOT NULL,
  next_run_at  TEXT NOT NULL
);
-- Keyset pages of one tenant's reports, oldest first.
CREATE INDEX IF NOT EXISTS query_reports_page ON query_reports (tenant_key, created_at, report_id);
CREATE INDEX IF NOT EXISTS query_reports_due ON query_reports (next_run_at);
CREATE TABLE IF NOT EXISTS query_report_runs (
  report_id     TEXT NOT NULL REFERENCES query_reports (report_id) ON DELETE CASCADE,
  finished_at   TEXT NOT NULL,
  columns_json  TEXT NOT NULL,  -- [[name, type], ...]
  rows_json     TEXT NOT NULL,  -- [[value, ...], ...]
  error_message TEXT NOT NULL,
  PRIMARY KEY (report_id, finished_at)
);
"""


class ReportSchedule(enum.StrEnum):
    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"


@dataclass(frozen=True, slots=True)
class ReportRun:
    finish_time: datetime
    columns: tuple[ResultColumn, ...]
    rows: tuple[tuple[Any, ...], ...]
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    report_id: str
    tenant_key: str
    display_name: str
    sql: str
    schedule: ReportSchedule
    create_time: datetime
    next_run_time: datetime
    latest_run: ReportRun | None = None


def next_boundary(moment: datetime, schedule: ReportSchedule) -> datetime:
    """The first scheduled instant strictly after `moment` (UTC)."""
    moment = moment.astimezone(UTC)
    hour = moment.replace(minute=0, second=0, microsecond=0)
    if schedule is ReportSchedule.HOURLY:
        return hour + timedelta(hours=1)
    day = hour.replace(hour=0) + timedelta(days=1)
    if schedule is ReportSchedule.DAILY:
        return day
    return day + timedelta(days=(7 - day.weekday()) % 7)


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def _time(text: str) -> datetime:
    return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC)


def bad_page_token(message: str) -> AnalyticsError:
    return AnalyticsError(StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", message)


class ReportStore:
    """Reports and their runs in SQLite; thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        with self._transaction() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def create(
        self,
        tenant_key: str,
        display_name: str,
        sql: str,
        schedule: ReportSchedule,
        now: datetime,
    ) -> Report:
        report = Report(
            report_id=uuid.uuid4().hex,
            tenant_key=tenant_key,
            display_name=display_name,
            sql=sql,
            schedule=schedule,
            create_time=now,
            next_run_time=now,  # the first run happens right away
        )
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO query_reports VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    report.report_id,
                    tenant_key,
                    display_name,
                    sql,
                    schedule.value,
                    _text(now),
                    _text(now),
                ],
            )
        return report

    def _report(self, row: sqlite3.Row) -> Report:
        return Report(
            report_id=row["report_id"],
            tenant_key=row["tenant_key"],
            display_name=row["display_name"],
            sql=row["sql"],
            schedule=ReportSchedule(row["schedule"]),
            create_time=_time(row["created_at"]),
            next_run_time=_time(row["next_run_at"]),
        )

    def _latest_runs(self, ids: Sequence[str]) -> dict[str, ReportRun]:
        if not ids:
            return {}
        marks = ", ".join("?" for _ in ids)
        rows = self._conn.execute(
            f"SELECT r.* FROM query_report_runs r JOIN (SELECT report_id, max(finished_at)"
            f" AS finished_at FROM query_report_runs WHERE report_id IN ({marks})"
            f" GROUP BY report_id) latest USING (report_id, finished_at)",
            list(ids),
        ).fetchall()
        return {
            row["report_id"]: ReportRun(
                finish_time=_time(row["finished_at"]),
                columns=tuple(ResultColumn(n, t) for n, t in json.loads(row["columns_json"])),
                rows=tuple(tuple(r) for r in json.loads(row["rows_json"])),
                error_message=row["error_message"],
            )
            for row in rows
        }

    def get(self, tenant_key: str, report_id: str) -> Report | None:
        """The report with its latest run; None outside the tenant."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM query_reports WHERE report_id = ? AND tenant_key = ?",
                [report_id, tenant_key],
            ).fetchone()
            if row is None:
                return None
            runs = self._latest_runs([report_id])
        return replace(self._report(row), latest_run=runs.get(report_id))

    def list_page(
        self, tenant_key: str, page_size: int, page_token: str
    ) -> tuple[list[Report], str]:
        """One page of the tenant's reports, oldest first, each with its latest run."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = ("", "")
        if page_token:
            after = _decode_token(tenant_key, page_token)
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM query_reports WHERE tenant_key = ?"
                " AND (created_at, report_id) > (?, ?) ORDER BY created_at, report_id LIMIT ?",
                [tenant_key, after[0], after[1], size + 1],
            ).fetchall()
            page = rows[:size]
            runs = self._latest_runs([r["report_id"] for r in page])
        reports = [replace(self._report(r), latest_run=runs.get(r["report_id"])) for r in page]
        token = ""
        if len(rows) > size:
            last = page[-1]
            token = _encode_token(tenant_key, last["created_at"], last["report_id"])
        return reports, token

    def delete(self, tenant_key: str, report_id: str) -> bool:
        """Deletes the report and its runs; False when the tenant has no such report."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM query_reports WHERE report_id = ? AND tenant_key = ?",
                [report_id, tenant_key],
            )
            return cursor.rowcount > 0

    def due(self, now: datetime, limit: int = 100) -> list[Report]:
        """Reports of every tenant whose next run is at or before `now`, oldest due first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM query_reports WHERE next_run_at <= ? ORDER BY next_run_at LIMIT ?",
                [_text(now), limit],
            ).fetchall()
        return [self._report(r) for r in rows]

    def claim(self, report: Report, now: datetime) -> datetime | None:
        """Moves the report's next run past `now` if nobody else did; the new time, or
        None when another scheduler claimed it first (or it was deleted)."""
        following = next_boundary(now, report.schedule)
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE query_reports SET next_run_at = ? WHERE report_id = ? AND next_run_at = ?",
                [_text(following), report.report_id, _text(report.next_run_time)],
            )
            return following if cursor.rowcount == 1 else None

    def unclaim(self, report: Report, claimed_until: datetime) -> None:
        """Gives a claimed run back (the run could not happen, e.g. during shutdown)."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE query_reports SET next_run_at = ? WHERE report_id = ? AND next_run_at = ?",
                [_text(report.next_run_time), report.report_id, _text(claimed_until)],
            )

    def record_run(self, report_id: str, run: ReportRun) -> None:
        with self._transaction() as conn:
            if not conn.execute(
                "SELECT 1 FROM query_reports WHERE report_id = ?", [report_id]
            ).fetchone():
                return  # deleted while it ran
            conn.execute(
                "INSERT OR REPLACE INTO query_report_runs VALUES (?, ?, ?, ?, ?)",
                [
                    report_id,
                    _text(run.finish_time),
                    json.dumps([[c.name, c.sql_type] for c in run.columns]),
                    json.dumps([list(r) for r in run.rows]),
                    run.error_message,
                ],
            )
            conn.execute(
                "DELETE FROM query_report_runs WHERE report_id = ? AND finished_at NOT IN"
                " (SELECT finished_at FROM query_report_runs WHERE report_id = ?"
                " ORDER BY finished_at DESC LIMIT ?)",
                [report_id, report_id, KEEP_RUNS],
            )


def _encode_token(tenant_key: str, created_at: str, report_id: str) -> str:
    # Opaque but not secret: the tenant binds it to one listing, the keyset position
    # keeps pages stable while reports come and go.
    body = json.dumps({"v": 1, "t": tenant_key, "c": created_at, "i": report_id})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode_token(tenant_key: str, token: str) -> tuple[str, str]:
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        created_at, report_id = body["c"], body["i"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise bad_page_token("malformed page token") from exc
    if body.get("v") != 1 or body.get("t") != tenant_key:
        raise bad_page_token("the page token belongs to another listing")
    if not isinstance(created_at, str) or not isinstance(report_id, str):
        raise bad_page_token("malformed page token")
    return created_at, report_id


def scope_of(tenant_key: str) -> Scope:
    return Scope.tenant(tenant_key) if tenant_key else Scope.all_tenants()


def run_report(store: EventStore, report: Report, clock: Callable[[], datetime]) -> ReportRun:
    """Runs the report's query once; a query error becomes the run's error message."""
    try:
        result = sql_sandbox.execute(
            store,
            scope_of(report.tenant_key),
            report.sql,
            QueryOptions(page_size=MAX_REPORT_ROWS, timeout=REPORT_TIMEOUT),
        )
    except AnalyticsError as error:
        return ReportRun(clock(), (), (), error.message or error.reason)
    return ReportRun(clock(), result.columns, result.rows)


class ReportScheduler:
    """Runs due reports: `run_due` once (tests, cron), or `start` for an asyncio task
    that checks every `tick_seconds` and right after `wake` (a report was created)."""

    def __init__(
        self,
        reports: ReportStore,
        store: EventStore,
        *,
        tick_seconds: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.reports = reports
        self.store = store
        self.tick_seconds = tick_seconds
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Set by `stop`: the loop ends after the pass in progress, and that pass after
        # the report in progress (read from the worker thread; a bool is safe to share).
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def run_due(self) -> int:
        """Runs every report due now, once each; returns how many ran."""
        ran = 0
        now = self.clock()
        for report in self.reports.due(now):
            if self._stopping:
                break  # the rest stay due: the next server to run takes them
            claimed_until = self.reports.claim(report, now)
            if claimed_until is None:
                continue  # another scheduler runs it
            try:
                run = run_report(self.store, report, self.clock)
            except Exception:
                # Not the query's fault (the store is closing, the disk is gone): give
                # the run back rather than record a misleading error, and stop this
                # pass; the next one retries.
                with contextlib.suppress(Exception):
                    self.reports.unclaim(report, claimed_until)
                raise
            self.reports.record_run(report.report_id, run)
            ran += 1
        return ran

    def wake(self) -> None:
        self._wake.set()

    async def run_forever(self) -> None:
        while not self._stopping:
            try:
                await asyncio.to_thread(self.run_due)
            except (RuntimeError, sqlite3.ProgrammingError) as error:
                if "closed" in str(error):
                    # The mesh closed the stores under us: shutting down.
                    log.info("report scheduler stops: %s", error)
                    return
                log.exception("report scheduler pass failed")
            except Exception:
                log.exception("report scheduler pass failed")
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_seconds)
            self._wake.clear()

    def start(self) -> None:
        """Starts `run_forever` on the running loop (idempotent)."""
        if not self.running:
            self._stopping = False
            self._wake = asyncio.Event()  # bound to the loop it is awaited on
            self._task = asyncio.get_running_loop().create_task(
                self.run_forever(), name="report-scheduler"
            )

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Ends the task; idempotent. A pass in progress finishes its current report
        first (up to `grace_seconds`): cancelling the task alone would not stop the
        worker thread, which would then write runs into a store being closed. Past the
        grace the task is cancelled and a late run is lost, never half-written (each
        run is one SQLite transaction)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), grace_seconds)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
