"""Alerts: what the detectors and the user-defined thresholds raise, where they go.

- `Alert`: metric, time, observed value, expected value and range, score, severity,
  and whether a detector or a threshold rule raised it.
- `AlertSink`: anything with `async publish(alert)`. `AlertBus` is the in-process one:
  it fans alerts out to subscribers (`subscribe(tenant_id)` -> async iterator), which is
  what `AggregationService.StreamAlerts` should read from. A slow subscriber loses its
  oldest alerts, never blocks detection.
- `AlertStore`: alerts and threshold rules in the prediction SQLite file; newest-first
  keyset pages for `ListAnomalies`.
- `AnomalyMonitor`: the streaming job. Every `interval` it closes the hours since its
  last run, computes each tenant's hourly metrics (`METRICS`) from the event store,
  feeds them to one `SeasonalDetector` per tenant and metric (warmed on the past four
  weeks the first time, without alerting on that history), checks the tenant's
  threshold rules, then stores and publishes the alerts.
- `LiveAnomalyCheck`: the same detectors on live data. Fed the committed event batches
  (the mesh adds it next to the live dashboards' observers), it keeps running totals of
  the open hour and checks them against the hour's expected range every few seconds
  (`AnomalyMonitor.check_open_hour`), so a spike alerts as it happens rather than when
  the hourly job closes the hour.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from services.events.model import TrackedEvent
from services.platform.errors import FieldViolation, invalid_request
from services.prediction.anomaly import Detection, DetectorConfig, SeasonalDetector, Severity
from services.prediction.registry import invalid_page_token
from services.storage.event_store import TABLE, EventStore

log = structlog.get_logger(__name__)

HOUR = timedelta(hours=1)
WARMUP = timedelta(days=28)
METRICS = ("event_count", "conversions", "tickets_sold", "active_users")

_HOURLY_SQL = f"""
SELECT epoch_us(occurred_at) // 3600000000 AS hour,
       count(*) AS event_count,
       count(*) FILTER (WHERE event_type = 'conversion') AS conversions,
       coalesce(sum(quantity) FILTER (WHERE event_type = 'conversion'), 0) AS tickets_sold,
       count(DISTINCT actor_key) AS active_users
FROM {TABLE}
WHERE tenant_id = $tenant AND occurred_at >= $start AND occurred_at < $end
GROUP BY 1
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS anomalies (
  alert_id       TEXT PRIMARY KEY,
  tenant_id      TEXT NOT NULL,
  metric_name    TEXT NOT NULL,
  at             TEXT NOT NULL,
  observed       REAL NOT NULL,
  expected       REAL NOT NULL,
  expected_lower REAL NOT NULL,
  expected_upper REAL NOT NULL,
  score          REAL NOT NULL,
  severity       TEXT NOT NULL,
  source         TEXT NOT NULL,   -- detector | threshold
  rule_id        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS anomalies_page ON anomalies (tenant_id, at, alert_id);
CREATE TABLE IF NOT EXISTS alert_rules (
  rule_id     TEXT PRIMARY KEY,
  tenant_id   TEXT NOT NULL,
  metric_name TEXT NOT NULL,
  lower       REAL,
  upper       REAL,
  severity    TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str
    tenant_id: str
    metric_name: str
    time: datetime  # start of the interval the value describes
    observed: float
    expected: float
    expected_lower: float
    expected_upper: float
    score: float
    severity: Severity
    source: str  # "detector" or "threshold"
    rule_id: str = ""


@dataclass(frozen=True, slots=True)
class AnomalyFilter:
    """What `ListAnomalies` narrows to; the defaults select everything."""

    metric_name: str = ""
    start: datetime | None = None  # hours starting at or after
    end: datetime | None = None  # hours starting before
    min_severity: Severity | None = None

    def fingerprint(self) -> str:
        """Identifies the filter inside a page token (a token continues one filter)."""
        parts = [
            self.metric_name,
            _text(self.start) if self.start else "",
            _text(self.end) if self.end else "",
            self.min_severity.value if self.min_severity else "",
        ]
        return "" if not any(parts) else "|".join(parts)


@dataclass(frozen=True, slots=True)
class ThresholdRule:
    """User-defined bounds on a metric: alert when the value leaves [lower, upper]."""

    rule_id: str
    tenant_id: str
    metric_name: str
    lower: float | None
    upper: float | None
    severity: Severity = Severity.WARNING

    def check(self, when: datetime, value: float, expected: float) -> Alert | None:
        low = self.lower if self.lower is not None else -np.inf
        high = self.upper if self.upper is not None else np.inf
        if low <= value <= high:
            return None
        bound = low if value < low else high
        # Score: how far outside, relative to the bound (0.5 = 50 % beyond it).
        score = abs(value - bound) / max(abs(bound), 1e-9)
        return Alert(
            alert_id=uuid.uuid4().hex,
            tenant_id=self.tenant_id,
            metric_name=self.metric_name,
            time=when,
            observed=value,
            expected=expected,
            expected_lower=float(low),
            expected_upper=float(high),
            score=float(score),
            severity=self.severity,
            source="threshold",
            rule_id=self.rule_id,
        )


def _detector_alert(
    tenant_id: str,
    metric: str,
    when: datetime,
    value: float,
    detection: Detection,
    severity: Severity,
    source: str,
) -> Alert:
    """The alert for an anomalous detection (`severity`: the detection's, known set)."""
    return Alert(
        alert_id=uuid.uuid4().hex,
        tenant_id=tenant_id,
        metric_name=metric,
        time=when,
        observed=value,
        expected=detection.expected,
        expected_lower=detection.lower,
        expected_upper=detection.upper,
        score=detection.score,
        severity=severity,
        source=source,
    )


def new_rule(
    rules: AlertStore,
    tenant_id: str,
    metric_name: str,
    lower: float | None,
    upper: float | None,
    severity: Severity = Severity.WARNING,
    rule_id: str = "",
) -> ThresholdRule:
    """A checked rule for `AlertStore.put_rule` (the CLI and `CreateThresholdRule`):
    a known metric, at least one finite bound, lower not above upper, and an id no other
    tenant uses (ids are global keys). No id: a new one."""
    problems: list[FieldViolation] = []
    if metric_name not in METRICS:
        problems.append(
            FieldViolation("rule.metric_name", f"unknown metric; one of {', '.join(METRICS)}")
        )
    if lower is None and upper is None:
        problems.append(FieldViolation("rule", "a rule needs a lower or an upper bound"))
    for name, value in (("lower", lower), ("upper", upper)):
        if value is not None and not np.isfinite(value):
            problems.append(FieldViolation(f"rule.{name}", "must be a finite number"))
    if lower is not None and upper is not None and lower > upper:
        problems.append(FieldViolation("rule.lower", f"lower {lower:g} is above upper {upper:g}"))
    own = {r.rule_id for r in rules.rules(tenant_id)}
    if rule_id and rule_id not in own and rules.rule_exists(rule_id):
        problems.append(FieldViolation("rule.rule_id", f"rule id {rule_id!r} is taken"))
    if problems:
        raise invalid_request(problems)
    return ThresholdRule(
        rule_id or f"rule-{uuid.uuid4().hex[:12]}", tenant_id, metric_name, lower, upper, severity
    )


class AlertSink(Protocol):
    async def publish(self, alert: Alert) -> None: ...


class AlertBus:
    """In-process fan-out of alerts to live subscribers, per tenant."""

    def __init__(self, queue_size: int = 1000) -> None:
        self._queue_size = queue_size
        self._subscribers: dict[str, set[asyncio.Queue[Alert]]] = {}

    async def publish(self, alert: Alert) -> None:
        for queue in list(self._subscribers.get(alert.tenant_id, ())):
            if queue.full():
                queue.get_nowait()  # drop the oldest: detection never waits on a reader
            queue.put_nowait(alert)

    async def subscribe(self, tenant_id: str) -> AsyncIterator[Alert]:
        queue: asyncio.Queue[Alert] = asyncio.Queue(self._queue_size)
        self._subscribers.setdefault(tenant_id, set()).add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers[tenant_id].discard(queue)

    def subscriber_count(self, tenant_id: str) -> int:
        return len(self._subscribers.get(tenant_id, ()))


def _text(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class AlertStore:
    """Stored alerts and threshold rules (same SQLite file as the model registry)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add(self, alerts: list[Alert]) -> None:
        with self._lock:
            self._conn.executemany(
                "INSERT OR IGNORE INTO anomalies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        a.alert_id,
                        a.tenant_id,
                        a.metric_name,
                        _text(a.time),
                        a.observed,
                        a.expected,
                        a.expected_lower,
                        a.expected_upper,
                        a.score,
                        a.severity.value,
                        a.source,
                        a.rule_id,
                    )
                    for a in alerts
                ],
            )

    def page(
        self,
        tenant_id: str,
        page_size: int,
        page_token: str,
        where: AnomalyFilter | None = None,
    ) -> tuple[list[Alert], str]:
        """Newest first, keyset-paged; a token only continues the filter it was made for."""
        size = min(page_size or 100, 1000)
        where = where or AnomalyFilter()
        clauses, params = ["tenant_id = ?"], [tenant_id]
        if where.metric_name:
            clauses.append("metric_name = ?")
            params.append(where.metric_name)
        if where.start is not None:
            clauses.append("at >= ?")
            params.append(_text(where.start))
        if where.end is not None:
            clauses.append("at < ?")
            params.append(_text(where.end))
        if where.min_severity is Severity.CRITICAL:
            clauses.append("severity = ?")
            params.append(Severity.CRITICAL.value)
        fingerprint = where.fingerprint()
        if page_token:
            at, alert_id = _decode(page_token, tenant_id, fingerprint)
            clauses.append("(at, alert_id) < (?, ?)")
            params += [at, alert_id]
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM anomalies WHERE {' AND '.join(clauses)}"
                " ORDER BY at DESC, alert_id DESC LIMIT ?",
                [*params, size + 1],
            ).fetchall()
        alerts = [
            Alert(
                alert_id=r["alert_id"],
                tenant_id=r["tenant_id"],
                metric_name=r["metric_name"],
                time=_time(r["at"]),
                observed=r["observed"],
                expected=r["expected"],
                expected_lower=r["expected_lower"],
                expected_upper=r["expected_upper"],
                score=r["score"],
                severity=Severity(r["severity"]),
                source=r["source"],
                rule_id=r["rule_id"],
            )
            for r in rows[:size]
        ]
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = _encode(tenant_id, last["at"], last["alert_id"], fingerprint)
        return alerts, token

    def put_rule(self, rule: ThresholdRule) -> None:
        if rule.lower is None and rule.upper is None:
            raise ValueError("a threshold rule needs a lower or an upper bound")
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO alert_rules VALUES (?, ?, ?, ?, ?, ?)",
                [
                    rule.rule_id,
                    rule.tenant_id,
                    rule.metric_name,
                    rule.lower,
                    rule.upper,
                    rule.severity.value,
                ],
            )

    def rule_exists(self, rule_id: str) -> bool:
        """Whether any tenant has a rule with this id (ids are global keys)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM alert_rules WHERE rule_id = ?", [rule_id]
            ).fetchone()
        return row is not None

    def delete_rule(self, tenant_id: str, rule_id: str) -> bool:
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM alert_rules WHERE tenant_id = ? AND rule_id = ?", [tenant_id, rule_id]
            )
        return cursor.rowcount > 0

    def rules(self, tenant_id: str) -> list[ThresholdRule]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM alert_rules WHERE tenant_id = ? ORDER BY rule_id", [tenant_id]
            ).fetchall()
        return [
            ThresholdRule(
                r["rule_id"],
                r["tenant_id"],
                r["metric_name"],
                r["lower"],
                r["upper"],
                Severity(r["severity"]),
            )
            for r in rows
        ]


def _encode(tenant_id: str, at: str, alert_id: str, fingerprint: str) -> str:
    body = json.dumps({"v": 1, "t": tenant_id, "a": at, "i": alert_id, "f": fingerprint})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode(token: str, tenant_id: str, fingerprint: str) -> tuple[str, str]:
    try:
        body = json.loads(base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()))
        # Another tenant's token, or one made for other filters (AIP-158): refused.
        if body["v"] != 1 or body["t"] != tenant_id or body.get("f", "") != fingerprint:
            raise invalid_page_token()
        if not isinstance(body["a"], str) or not isinstance(body["i"], str):
            raise invalid_page_token()
        return body["a"], body["i"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise invalid_page_token() from exc


def hourly_metrics(
    store: EventStore, tenant_id: str, start: datetime, end: datetime
) -> dict[str, np.ndarray]:
    """Zero-filled hourly values of `METRICS` for [start, end) (whole UTC hours)."""
    first = int(start.timestamp()) // 3600
    hours = max(int(end.timestamp()) // 3600 - first, 0)
    out = {name: np.zeros(hours) for name in METRICS}
    table = store.read(_HOURLY_SQL, {"tenant": tenant_id, "start": start, "end": end})
    for row in table.to_pylist():
        offset = int(row["hour"]) - first
        if 0 <= offset < hours:
            for name in METRICS:
                out[name][offset] = float(row[name] or 0)
    return out


def floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


@dataclass
class _TenantState:
    detectors: dict[str, SeasonalDetector]
    watermark: datetime  # hours before this one have been observed
    config: DetectorConfig
    # Whether the tenant has had an event yet. Hours before its first one are not
    # history: 28 days of zeros would make a new organizer's first events "critical".
    active: bool = False


@dataclass
class AnomalyMonitor:
    """The streaming detection job over the event store (see the module docstring)."""

    store: EventStore
    alerts: AlertStore
    sink: AlertSink
    config_for: Callable[[str], DetectorConfig] = field(default=lambda _tenant: DetectorConfig())
    _state: dict[str, _TenantState] = field(default_factory=dict)
    # (tenant, metric, hour, rule_id) already alerted by a live check of the open hour:
    # the hour's close does not alert on them again.
    _live_raised: set[tuple[str, str, datetime, str]] = field(default_factory=set)
    # The hourly job and the live checks run in worker threads; detectors are not
    # thread-safe.
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def tenants(self, since: datetime) -> list[str]:
        table = self.store.read(
            f"SELECT DISTINCT tenant_id FROM {TABLE} WHERE occurred_at >= $since", {"since": since}
        )
        return sorted(str(t) for t in table.column("tenant_id").to_pylist())

    def _state_for(self, tenant_id: str, now_hour: datetime) -> _TenantState:
        config = self.config_for(tenant_id)
        state = self._state.get(tenant_id)
        if state is None or state.config != config:
            start = now_hour - WARMUP
            history = hourly_metrics(self.store, tenant_id, start, now_hour - HOUR)
            detectors = {name: SeasonalDetector(config, counts=True) for name in METRICS}
            active = np.flatnonzero(history["event_count"])
            first = int(active[0]) if active.size else len(history["event_count"])
            for name, values in history.items():
                for value in values[first:]:
                    detectors[name].observe(float(value))  # warm-up: never alerts
            state = _TenantState(detectors, now_hour - HOUR, config, bool(active.size))
            self._state[tenant_id] = state
        return state

    def step(self, tenant_id: str, now: datetime) -> list[Alert]:
        """Observes every closed hour since the last step; returns the alerts raised."""
        with self._lock:
            return self._step(tenant_id, now)

    def _step(self, tenant_id: str, now: datetime) -> list[Alert]:
        now_hour = floor_hour(now)
        state = self._state_for(tenant_id, now_hour)
        if state.watermark >= now_hour:
            return []
        values = hourly_metrics(self.store, tenant_id, state.watermark, now_hour)
        rules = self.alerts.rules(tenant_id)
        raised: list[Alert] = []
        for offset in range(len(values[METRICS[0]])):
            when = state.watermark + offset * HOUR
            state.active = state.active or bool(values["event_count"][offset])
            for name in METRICS:
                raised += self._observe(
                    tenant_id, state, name, when, float(values[name][offset]), rules
                )
        state.watermark = now_hour
        # Hours now closed cannot be checked live any more.
        self._live_raised = {
            key for key in self._live_raised if key[0] != tenant_id or key[2] >= now_hour
        }
        return raised

    def check_open_hour(
        self, tenant_id: str, hour: datetime, values: dict[str, float]
    ) -> list[Alert]:
        """The live check: running totals of the open `hour` so far, against the expected
        range the tenant's detector has for that hour (its phase of the day or week).

        Closes the hours before `hour` first (so the detector is positioned on it). A
        running total only grows during the hour, so only a breach of an upper bound is
        certain before the hour ends: a detector's upper bound, or a threshold rule's.
        Each breach alerts once per hour (`source` "live"); drops and lower bounds are
        left to the hour's close (`step`)."""
        with self._lock:
            raised = self._step(tenant_id, hour)
            state = self._state[tenant_id]
            if state.watermark != hour:
                return raised  # an hour already closed: `step` has judged it
            rules = self.alerts.rules(tenant_id)
            for metric, value in values.items():
                detector = state.detectors.get(metric)
                if detector is None:
                    continue
                detection = detector.assess(value)
                key = (tenant_id, metric, hour, "")
                if (
                    detection.anomalous
                    and detection.severity is not None
                    and value > detection.upper
                    and key not in self._live_raised
                ):
                    self._live_raised.add(key)
                    raised.append(
                        _detector_alert(
                            tenant_id, metric, hour, value, detection, detection.severity, "live"
                        )
                    )
                for rule in rules:
                    key = (tenant_id, metric, hour, rule.rule_id)
                    if (
                        rule.metric_name != metric
                        or rule.upper is None
                        or value <= rule.upper
                        or key in self._live_raised
                    ):
                        continue
                    alert = rule.check(hour, value, detection.expected)
                    if alert is not None:
                        self._live_raised.add(key)
                        raised.append(alert)
            return raised

    def _observe(
        self,
        tenant_id: str,
        state: _TenantState,
        metric: str,
        when: datetime,
        value: float,
        rules: list[ThresholdRule],
    ) -> list[Alert]:
        detector = state.detectors.setdefault(metric, SeasonalDetector(state.config, counts=True))
        # Before the tenant's first event the detector learns nothing (see `active`);
        # threshold rules still apply.
        detection = detector.observe(value) if state.active else detector.assess(value)
        out: list[Alert] = []
        live = (tenant_id, metric, when, "") in self._live_raised
        if detection.anomalous and detection.severity is not None and not live:
            out.append(
                _detector_alert(
                    tenant_id, metric, when, value, detection, detection.severity, "detector"
                )
            )
        for rule in rules:
            if rule.metric_name == metric and (
                (tenant_id, metric, when, rule.rule_id) not in self._live_raised
            ):
                alert = rule.check(when, value, detection.expected)
                if alert is not None:
                    out.append(alert)
        return out

    async def emit(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        await asyncio.to_thread(self.alerts.add, alerts)
        for alert in alerts:
            log.info(
                "anomaly_alert",
                tenant_id=alert.tenant_id,
                metric=alert.metric_name,
                severity=alert.severity.value,
                observed=alert.observed,
                expected=alert.expected,
            )
            await self.sink.publish(alert)

    async def run_once(self, now: datetime | None = None) -> list[Alert]:
        moment = now or datetime.now(UTC)
        raised: list[Alert] = []
        for tenant_id in await asyncio.to_thread(self.tenants, floor_hour(moment) - WARMUP):
            raised += await asyncio.to_thread(self.step, tenant_id, moment)
        await self.emit(raised)
        return raised

    async def run_forever(self, interval_seconds: float) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.run_once()
            except Exception:
                # One bad pass (a store hiccup) must not end live detection.
                log.exception("anomaly_monitor_failed")


@dataclass
class _OpenHour:
    hour: datetime
    totals: dict[str, float]
    actors: set[str]


class LiveAnomalyCheck:
    """Streaming detection on live metrics: an `EventObserver`
    (services/live/observers.py) fed the committed batches, like the live dashboards.

    Each batch adds to its tenant's running totals of the open UTC hour (`METRICS`, by
    the events' `occurred_at`; events of other hours are left to the hourly job).
    `check` (every `interval` seconds from `run_forever`, or called directly) hands the
    totals of tenants that received events to `AnomalyMonitor.check_open_hour`, which
    compares them with the detector's expected range for that hour, and stores and
    publishes what it raises. A spike is so reported within seconds, not at the hour's
    close. Totals start when the process does: in its first hour they undercount,
    which can only delay an alert to the hour's close.
    """

    def __init__(
        self, monitor: AnomalyMonitor, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._monitor = monitor
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, _OpenHour] = {}
        self._dirty: set[str] = set()

    # --- EventObserver: called from producer threads; only notes the batch ---------------

    def observe_events(self, events: Sequence[TrackedEvent]) -> None:
        for event in events:
            actor = f"u:{event.user_id}" if event.user_id else f"a:{event.anonymous_id}"
            conversion = event.event_type == "conversion"
            self._note(
                event.tenant_id,
                event.occurred_at,
                1.0 if conversion else 0.0,
                float(event.quantity or 0) if conversion else 0.0,
                actor,
            )

    def observe_rows(self, rows: pa.Table) -> None:
        """Vectorised: a stream-processor host hands over batches of up to 122,880 rows.
        Same outcome as `_note` per row: per tenant only the newest hour seen counts."""
        if rows.num_rows == 0:
            return
        user = pc.fill_null(rows.column("user_id"), "")
        anonymous = pc.fill_null(rows.column("anonymous_id"), "")
        conversion = pc.fill_null(pc.equal(rows.column("event_type"), "conversion"), False)
        quantity = pc.cast(pc.fill_null(rows.column("quantity"), 0), pa.float64())
        batch = pa.table(
            {
                "tenant_id": rows.column("tenant_id"),
                "hour": pc.floor_temporal(rows.column("occurred_at"), 1, "hour"),
                "conversion": pc.cast(conversion, pa.float64()),
                "tickets": pc.if_else(conversion, quantity, 0.0),
                "actor": pc.if_else(
                    pc.not_equal(user, ""),
                    pc.binary_join_element_wise("u:", user, ""),
                    pc.binary_join_element_wise("a:", anonymous, ""),
                ),
            }
        )
        newest = batch.group_by("tenant_id").aggregate([("hour", "max")])
        with self._lock:
            targets: dict[str, datetime] = {}
            for tenant_id, hour in zip(
                newest.column("tenant_id").to_pylist(),
                newest.column("hour_max").to_pylist(),
                strict=True,
            ):
                hour = hour.astimezone(UTC) if hour.tzinfo else hour.replace(tzinfo=UTC)
                current = self._open.get(tenant_id)
                if current is None or hour > current.hour:
                    current = _OpenHour(hour, dict.fromkeys(METRICS, 0.0), set())
                    self._open[tenant_id] = current
                targets[tenant_id] = current.hour
            target = pa.table(
                {
                    "tenant_id": pa.array(list(targets), pa.string()),
                    "target": pa.array(list(targets.values()), batch.schema.field("hour").type),
                }
            )
            counted = batch.join(target, "tenant_id").filter(
                pc.equal(pc.field("hour"), pc.field("target"))
            )
            sums = counted.group_by("tenant_id").aggregate(
                [
                    ("conversion", "count"),
                    ("conversion", "sum"),
                    ("tickets", "sum"),
                    ("actor", "distinct"),
                ]
            )
            for tenant_id, events, conversions, tickets, actors in zip(
                *(
                    sums.column(name).to_pylist()
                    for name in (
                        "tenant_id",
                        "conversion_count",
                        "conversion_sum",
                        "tickets_sum",
                        "actor_distinct",
                    )
                ),
                strict=True,
            ):
                current = self._open[tenant_id]
                current.totals["event_count"] += events
                current.totals["conversions"] += conversions
                current.totals["tickets_sold"] += tickets
                current.actors.update(actors)
                current.totals["active_users"] = float(len(current.actors))
                self._dirty.add(tenant_id)

    def _note(
        self, tenant_id: str, at: datetime, conversion: float, tickets: float, actor: str
    ) -> None:
        hour = floor_hour(at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC))
        with self._lock:
            current = self._open.get(tenant_id)
            if current is None or hour > current.hour:
                current = _OpenHour(hour, dict.fromkeys(METRICS, 0.0), set())
                self._open[tenant_id] = current
            elif hour < current.hour:
                return
            current.totals["event_count"] += 1
            current.totals["conversions"] += conversion
            current.totals["tickets_sold"] += tickets
            current.actors.add(actor)
            current.totals["active_users"] = float(len(current.actors))
            self._dirty.add(tenant_id)

    # --- the check, on the event loop -------------------------------------------------------

    def open_hour(self, tenant_id: str) -> tuple[datetime, dict[str, float]] | None:
        """The tenant's hour being counted and its running totals so far (a copy)."""
        with self._lock:
            current = self._open.get(tenant_id)
            return None if current is None else (current.hour, dict(current.totals))

    async def check(self, now: datetime | None = None) -> list[Alert]:
        """Checks the open hour of every tenant that received events since the last check."""
        hour = floor_hour(now or self._clock())
        with self._lock:
            due = [
                (tenant_id, dict(self._open[tenant_id].totals))
                for tenant_id in sorted(self._dirty)
                if self._open[tenant_id].hour == hour
            ]
            self._dirty.clear()
            # Hours that closed go: the hourly job reads them from the store.
            self._open = {t: o for t, o in self._open.items() if o.hour >= hour}
        raised: list[Alert] = []
        for tenant_id, totals in due:
            raised += await asyncio.to_thread(
                self._monitor.check_open_hour, tenant_id, hour, totals
            )
        await self._monitor.emit(raised)
        return raised

    async def run_forever(self, interval_seconds: float) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.check()
            except Exception:
                log.exception("live_anomaly_check_failed")
