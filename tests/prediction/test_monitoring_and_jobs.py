"""Alerts end to end (monitor -> store -> alerts stream), streaming detection on live
batches, the detector's weekly season, scheduled retraining with its promotion policy,
and the jobs CLI. One small seeded tenant ("live", 40 days) in a real DuckDB store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from services.live.alerts import AlertsHub, LiveAlert
from services.prediction import anomaly, jobs
from services.prediction.alerts import Alert, ThresholdRule
from services.prediction.anomaly import Severity
from services.prediction.registry import PLATFORM, ModelKind, ModelState
from services.prediction.service import PredictionService, PredictionSettings, scheduled_scopes
from services.prediction.synthetic import SyntheticTenant, generate
from services.storage.event_store import TABLE, DuckDBEventStore

pytestmark = pytest.mark.integration

SETTINGS = PredictionSettings(
    retrain_interval_hours=0,
    schedule_start_delay_seconds=0,
    anomaly_interval_seconds=0,
    snapshot_ttl_seconds=900,
    live_check_seconds=0,
)
SPEC = SyntheticTenant(tenant_id="live", users=3_000, days=40, seed=3)
LAST_HOUR = SPEC.end - timedelta(hours=1)
SPIKE_FACTOR = 6  # the last hour carries its own events and 6 copies more


class Recording:
    """An alert sink that keeps what it is given and hands it on to the alerts hub."""

    def __init__(self, hub: AlertsHub) -> None:
        self.hub = hub
        self.published: list[Alert] = []

    async def publish(self, alert: Alert) -> None:
        self.published.append(alert)
        await self.hub.publish(alert)


def hour_rows(store: DuckDBEventStore, hour: datetime) -> pa.Table:
    return store.read(
        f"SELECT * FROM {TABLE} WHERE tenant_id = $t AND occurred_at >= $s AND occurred_at < $e",
        {"t": SPEC.tenant_id, "s": hour, "e": hour + timedelta(hours=1)},
    )


def copies(rows: pa.Table, times: int) -> pa.Table:
    """`times` copies of `rows` with fresh event ids (the same users, hour and events)."""
    parts = []
    for _ in range(times):
        ids = pa.array(
            [uuid.uuid4().hex for _ in range(rows.num_rows)], rows.schema.field("event_id").type
        )
        parts.append(rows.set_column(rows.schema.get_field_index("event_id"), "event_id", ids))
    return pa.concat_tables(parts)


def write_tenant(path: Path) -> DuckDBEventStore:
    store = DuckDBEventStore(path)
    table, _ = generate(SPEC)
    store.append_table(table)
    return store


@pytest.fixture(scope="module")
def spiked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DuckDBEventStore, float]]:
    """The tenant's store with an obvious spike in its last hour; the normal count."""
    store = write_tenant(tmp_path_factory.mktemp("live-tenant") / "events.duckdb")
    normal = hour_rows(store, LAST_HOUR)
    store.append_table(copies(normal, SPIKE_FACTOR))
    yield store, float(normal.num_rows)
    store.close()


def test_a_spike_alerts_end_to_end_and_a_threshold_rule_fires_with_it(
    spiked: tuple[DuckDBEventStore, float], tmp_path: Path
) -> None:
    store, normal = spiked
    hub = AlertsHub()
    sink = Recording(hub)
    svc = PredictionService(store, tmp_path, sink=sink, settings=SETTINGS)

    async def scenario() -> tuple[list[Alert], list[LiveAlert], list[LiveAlert]]:
        mine = hub.subscribe(SPEC.tenant_id)
        other = hub.subscribe("another-tenant")
        raised = await svc.monitor.run_once(SPEC.end)
        streamed = [await asyncio.wait_for(mine.__anext__(), 2) for _ in raised]
        other.close()
        return raised, streamed, [item async for item in other]

    # A user rule: more than twice the normal hourly count is a critical breach.
    rule = ThresholdRule(
        "too-busy", SPEC.tenant_id, "event_count", None, 2 * normal, Severity.CRITICAL
    )
    svc.alerts.put_rule(rule)
    try:
        raised, streamed, others = asyncio.run(scenario())
        assert others == []  # another tenant's stream sees none of it
        observed = normal * (SPIKE_FACTOR + 1)
        detector = [a for a in raised if a.source == "detector" and a.metric_name == "event_count"]
        assert len(detector) == 1, raised
        spike = detector[0]
        assert spike.time == LAST_HOUR and spike.tenant_id == SPEC.tenant_id
        assert spike.severity is Severity.CRITICAL
        assert spike.observed == observed
        assert spike.expected_lower <= spike.expected <= spike.expected_upper
        assert spike.observed > spike.expected_upper
        # The expected value is the tenant's normal level for that hour, not the spike.
        assert 0.5 * normal < spike.expected < 2 * normal
        threshold = [a for a in raised if a.source == "threshold"]
        assert [(a.rule_id, a.time, a.observed) for a in threshold] == [
            ("too-busy", LAST_HOUR, observed)
        ]
        assert threshold[0].severity is Severity.CRITICAL
        assert threshold[0].expected_upper == 2 * normal
        # Stored: listed back by the service (ListAnomalies), newest first.
        stored, _ = svc.list_anomalies(SPEC.tenant_id, 100, "")
        assert {a.alert_id for a in raised} <= {a.alert_id for a in stored}
        # Published: to the sink and on to the alerts stream of the tenant.
        assert [a.alert_id for a in sink.published] == [a.alert_id for a in raised]
        assert {s.alert_id for s in streamed} == {a.alert_id for a in raised}
        live = next(s for s in streamed if s.alert_id == spike.alert_id)
        assert live.severity.value == "critical" and live.observed == observed
        assert live.expected_upper == pytest.approx(spike.expected_upper)
        # Nothing more for the closed hours on the next pass.
        assert asyncio.run(svc.monitor.run_once(SPEC.end)) == []
    finally:
        asyncio.run(svc.aclose())


def test_live_batches_alert_before_the_hour_closes(
    spiked: tuple[DuckDBEventStore, float], tmp_path: Path
) -> None:
    store, normal = spiked
    hub = AlertsHub()
    sink = Recording(hub)
    svc = PredictionService(store, tmp_path, sink=sink, settings=SETTINGS)
    try:
        rows = hour_rows(store, LAST_HOUR)  # the spiked hour, as the live feed hands it over
        assert rows.num_rows == normal * (SPIKE_FACTOR + 1)
        half = rows.num_rows // 2
        svc.live.observe_rows(rows.slice(0, half))
        svc.live.observe_rows(rows.slice(half))
        # 20 minutes into the hour: the hourly job has not closed it, the live check alerts.
        raised = asyncio.run(svc.live.check(LAST_HOUR + timedelta(minutes=20)))
        spike = [a for a in raised if a.metric_name == "event_count"]
        assert len(spike) == 1 and spike[0].source == "live"
        assert spike[0].time == LAST_HOUR and spike[0].observed == rows.num_rows
        assert spike[0].observed > spike[0].expected_upper
        assert spike[0].severity is Severity.CRITICAL
        assert [a.alert_id for a in sink.published] == [a.alert_id for a in raised]
        stored, _ = svc.list_anomalies(SPEC.tenant_id, 100, "")
        assert spike[0].alert_id in {a.alert_id for a in stored}
        # A second check in the same hour does not repeat it ...
        svc.live.observe_rows(rows.slice(0, 10))
        assert asyncio.run(svc.live.check(LAST_HOUR + timedelta(minutes=25))) == []
        # ... nor does the hour's close.
        closed = asyncio.run(svc.monitor.run_once(SPEC.end))
        assert not [a for a in closed if a.metric_name == "event_count" and a.time == LAST_HOUR]
    finally:
        asyncio.run(svc.aclose())


def test_normal_live_batches_raise_nothing(
    spiked: tuple[DuckDBEventStore, float], tmp_path: Path
) -> None:
    store, _ = spiked
    svc = PredictionService(store, tmp_path, settings=SETTINGS)
    try:
        hour = LAST_HOUR - timedelta(hours=1)
        svc.live.observe_rows(hour_rows(store, hour))
        raised = asyncio.run(svc.live.check(hour + timedelta(minutes=59)))
        assert [a for a in raised if a.source == "live"] == []
    finally:
        asyncio.run(svc.aclose())


def _events(rows: pa.Table, tenant_id: str, at: datetime, n: int) -> pa.Table:
    """`n` copies of the first stored row, for `tenant_id` at `at`, with fresh ids."""
    one = rows.slice(0, 1)
    out = copies(one, n)
    tenants = pa.array([tenant_id] * n, out.schema.field("tenant_id").type)
    times = pa.array([at] * n, out.schema.field("occurred_at").type)
    out = out.set_column(out.schema.get_field_index("tenant_id"), "tenant_id", tenants)
    return out.set_column(out.schema.get_field_index("occurred_at"), "occurred_at", times)


def test_a_new_tenants_first_events_are_not_an_anomaly_but_its_rules_apply(
    spiked: tuple[DuckDBEventStore, float], tmp_path: Path
) -> None:
    """28 days without events is no history: before the fix, a new organizer's first
    events were a critical `event_count` anomaly (expected 0, no spread), live and at
    the hour's close. A threshold rule of the new tenant still fires."""
    template = hour_rows(spiked[0], LAST_HOUR)
    store = DuckDBEventStore(tmp_path / "new-tenant.duckdb")  # the module's store stays as it is
    svc = PredictionService(store, tmp_path, settings=SETTINGS)
    tenant = f"new-{uuid.uuid4().hex[:8]}"
    svc.alerts.put_rule(
        ThresholdRule("first-sales", tenant, "event_count", None, 10, Severity.WARNING)
    )
    try:
        rows = _events(template, tenant, LAST_HOUR + timedelta(minutes=5), 40)
        store.append_table(rows)
        svc.live.observe_rows(rows)
        live = asyncio.run(svc.live.check(LAST_HOUR + timedelta(minutes=20)))
        closed = asyncio.run(svc.monitor.run_once(SPEC.end))
        raised = live + [a for a in closed if a.tenant_id == tenant]
        assert [a for a in raised if a.source != "threshold"] == []
        assert [(a.rule_id, a.observed) for a in raised] == [("first-sales", 40.0)]
    finally:
        asyncio.run(svc.aclose())
        store.close()


def test_a_lone_event_in_a_quiet_phase_is_noise_and_a_burst_is_not(
    spiked: tuple[DuckDBEventStore, float], tmp_path: Path
) -> None:
    """A tenant active for 40 days, only ever between 10:00 and 11:00: its other hours
    are all zero, so their spread is zero. One event at 03:00 is Poisson noise (the
    count floor); 30 are an anomaly."""
    template = hour_rows(spiked[0], LAST_HOUR)
    store = DuckDBEventStore(tmp_path / "quiet.duckdb")
    verdicts = {}
    for n in (1, 30):
        tenant = f"quiet-{n}-{uuid.uuid4().hex[:8]}"
        start = SPEC.end.replace(hour=0) - timedelta(days=40)
        for day in range(40):
            store.append_table(
                _events(template, tenant, start + timedelta(days=day, hours=10, minutes=7), 20)
            )
        night = (
            SPEC.end.replace(hour=3)
            if SPEC.end.hour > 4
            else SPEC.end.replace(hour=3) - timedelta(days=1)
        )
        store.append_table(_events(template, tenant, night + timedelta(minutes=2), n))
        svc = PredictionService(store, tmp_path / tenant, settings=SETTINGS)
        try:
            svc.monitor.step(tenant, night)  # the detector is positioned on 03:00
            raised = svc.monitor.step(tenant, night + timedelta(hours=1))
            verdicts[n] = sorted(a.metric_name for a in raised if a.source == "detector")
        finally:
            asyncio.run(svc.aclose())
    store.close()
    assert verdicts[1] == []
    assert "event_count" in verdicts[30]


def weekly_traffic(weeks: int, seed: int) -> np.ndarray:
    """Hourly counts: a daily cycle, and weekends three times as busy as weekdays."""
    rng = np.random.default_rng(seed)
    hours = np.arange(weeks * 168)
    daily = 1 + 0.5 * np.sin(2 * np.pi * (hours % 24 - 9) / 24)
    weekend = np.where((hours // 24) % 7 >= 5, 3.0, 1.0)
    return rng.poisson(100 * daily * weekend).astype(np.float64)


def test_the_detector_uses_a_weekly_season_when_the_week_repeats() -> None:
    series = weekly_traffic(8, seed=5)
    daily = anomaly.DetectorConfig(period=24, seasons=4)
    weekly = anomaly.detector_for(series)
    assert (weekly.period, weekly.seasons) == (168, 4)
    after_warmup = slice(4 * 168, None)
    # No anomaly in this data: the daily season flags every weekend, the weekly one not.
    daily_flags = int(anomaly.detect(series, daily)[after_warmup].sum())
    weekly_flags = int(anomaly.detect(series, weekly)[after_warmup].sum())
    assert daily_flags >= 20 and daily_flags >= 4 * weekly_flags, (daily_flags, weekly_flags)
    config, metrics = anomaly.calibrate(series, (3.5, 5.0, 8.0))
    assert config.period == 168
    assert metrics["period_hours"] == 168
    assert metrics["f1"] > metrics["baseline_f1"]
    # A series with only a daily cycle keeps the daily season.
    rng = np.random.default_rng(5)
    hours = np.arange(8 * 168)
    flat_week = rng.poisson(100 * (1 + 0.5 * np.sin(2 * np.pi * (hours % 24) / 24)))
    assert anomaly.detector_for(flat_week.astype(np.float64)).period == 24


def test_scheduled_retraining_and_its_promotion_policy(
    spiked: tuple[DuckDBEventStore, float], tmp_path: Path
) -> None:
    store, _ = spiked
    settings = SETTINGS.model_copy(update={"retrain_interval_hours": 1e-6})
    svc = PredictionService(store, tmp_path, settings=settings)
    try:
        # 40 days: enough for the anomaly model only; churn (74+ days) and the forecasts
        # (140+ days) are skipped with a logged reason.
        first = asyncio.run(svc.retrain_due())
        assert [(r.tenant_id, r.kind) for r in first] == [(SPEC.tenant_id, ModelKind.ANOMALY)]
        assert first[0].state is ModelState.PROMOTED  # the first that beats its baseline
        promoted = svc.registry.promoted(SPEC.tenant_id, ModelKind.ANOMALY)
        assert promoted is not None and promoted.model_id == first[0].model_id
        assert promoted.training_end == LAST_HOUR  # the data's end, not the clock's
        # Same data, same seeds: as good as the promoted version -> it replaces it.
        second = asyncio.run(svc.retrain_due())
        assert len(second) == 1
        now = svc.registry.promoted(SPEC.tenant_id, ModelKind.ANOMALY)
        assert now is not None and now.model_id == second[0].model_id
        assert svc.registry.promotion_history(SPEC.tenant_id, ModelKind.ANOMALY)[-1] == (
            second[0].model_id,
            first[0].model_id,
        )
        # The promoted version scored better: the next scheduled one stays a candidate.
        svc.registry.merge_metrics(now.model_id, {"f1": now.metrics["f1"] + 0.05})
        third = asyncio.run(svc.retrain_due())
        kept = svc.get_model(SPEC.tenant_id, third[0].model_id)
        assert kept.state is ModelState.READY
        assert kept.stage.startswith("candidate: f1") and now.model_id in kept.stage
        assert svc.registry.promoted(SPEC.tenant_id, ModelKind.ANOMALY).model_id == now.model_id  # type: ignore[union-attr]
        # An on-demand version never replaces the promoted one by itself.
        manual = asyncio.run(svc.train(SPEC.tenant_id, ModelKind.ANOMALY))
        assert manual.state is ModelState.READY
    finally:
        asyncio.run(svc.aclose())


def test_jobs_cli_schedule_list_and_threshold_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "cli"
    write_tenant(work / "events.duckdb").close()  # the CLI opens the store itself
    base = ["--data-dir", str(work)]
    assert jobs.main([*base, "schedule"]) == 0
    out = capsys.readouterr().out
    assert "anomaly promoted" in out and "done in" in out
    assert jobs.main([*base, "list", "--tenant", SPEC.tenant_id]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 and " anomaly promoted " in listed[0] and "f1=" in listed[0]
    assert jobs.main([*base, "list", "--tenant", "nobody"]) == 0
    assert capsys.readouterr().out == ""

    add = [*base, "rules", "add", "--tenant", SPEC.tenant_id, "--metric", "tickets_sold"]
    assert jobs.main([*add, "--lower", "1", "--upper", "50", "--rule-id", "sales"]) == 0
    assert capsys.readouterr().out.strip() == "sales tickets_sold lower=1 upper=50 warning"
    assert jobs.main([*base, "rules", "list", "--tenant", SPEC.tenant_id]) == 0
    assert capsys.readouterr().out.splitlines() == ["sales tickets_sold lower=1 upper=50 warning"]
    # Bad rules get a clear error: no bound, crossed bounds, another tenant's id, a typo.
    assert jobs.main(add) == 2
    assert "a lower or an upper bound" in capsys.readouterr().err
    assert jobs.main([*add, "--lower", "9", "--upper", "1"]) == 2
    other = [*base, "rules", "add", "--tenant", "other", "--metric", "event_count"]
    assert jobs.main([*other, "--upper", "5", "--rule-id", "sales"]) == 2
    assert "taken" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        jobs.main([*base, "rules", "add", "--tenant", "t", "--metric", "nope", "--upper", "1"])
    capsys.readouterr()
    # Rules are per tenant; deleting is too.
    assert jobs.main([*base, "rules", "delete", "--tenant", "other", "sales"]) == 1
    assert jobs.main([*base, "rules", "delete", "--tenant", SPEC.tenant_id, "sales"]) == 0
    assert jobs.main([*base, "rules", "list", "--tenant", SPEC.tenant_id]) == 0
    assert capsys.readouterr().out == ""


def test_the_schedule_covers_every_tenant_kind_and_the_platform_forecasts() -> None:
    scopes = scheduled_scopes(["t1", "t2"])
    assert scopes[: 2 * len(ModelKind)] == [(t, kind) for t in ("t1", "t2") for kind in ModelKind]
    assert scopes[2 * len(ModelKind) :] == [
        (PLATFORM, ModelKind.DEMAND_FORECAST),
        (PLATFORM, ModelKind.REVENUE_FORECAST),
    ]
    assert scheduled_scopes([]) == []  # no events anywhere: nothing to train
