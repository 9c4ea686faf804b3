"""The prediction service end to end on a real DuckDB store: training with a time-based
split, baselines beaten on held-out data, registry lifecycle, serving, clear errors."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.platform.errors import AnalyticsError, StatusCode
from services.prediction.churn import ScoredSnapshot
from services.prediction.demand import Target
from services.prediction.registry import PLATFORM, ModelKind, ModelRecord, ModelState
from services.prediction.service import PredictionService, PredictionSettings
from services.prediction.synthetic import SyntheticTenant, generate
from services.storage.event_store import DuckDBEventStore
from tests.prediction.conftest import STORE_GROUP, TENANT

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group(STORE_GROUP)]

SETTINGS = PredictionSettings(
    retrain_interval_hours=0,
    schedule_start_delay_seconds=0,
    anomaly_interval_seconds=0,
    snapshot_ttl_seconds=900,
)


@pytest.fixture(scope="module")
def service(
    populated_store: DuckDBEventStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PredictionService]:
    svc = PredictionService(
        populated_store,
        tmp_path_factory.mktemp("prediction-data"),
        settings=SETTINGS,
        today=lambda: TENANT.end.date(),
    )
    yield svc
    asyncio.run(svc.aclose())


@pytest.fixture(scope="module")
def churn_model(service: PredictionService) -> str:
    record = asyncio.run(service.train(TENANT.tenant_id, ModelKind.CHURN))
    assert record.state is ModelState.PROMOTED, record.failure
    return record.model_id


def test_churn_beats_its_baselines_on_the_later_window(
    service: PredictionService, churn_model: str
) -> None:
    m = service.get_model(TENANT.tenant_id, churn_model).metrics
    # Held out: the evaluation snapshot is 30 days after the training one.
    assert m["roc_auc"] > m["baseline_recency_roc_auc"] + 0.005
    assert m["pr_auc"] > m["baseline_recency_pr_auc"] + 0.005
    assert m["roc_auc"] > m["baseline_logreg_roc_auc"]
    assert m["calibration_ece"] < 0.05
    record = service.get_model(TENANT.tenant_id, churn_model)
    assert record.training_start is not None and record.training_end is not None
    assert record.training_end.date() == TENANT.end.date()
    assert len(record.feature_names) >= 30


def test_predict_churn_for_a_page_of_users_with_shap_contributions(
    service: PredictionService, churn_model: str
) -> None:
    _, snapshot = service.churn_snapshot(TENANT.tenant_id)
    users = [str(u) for u in snapshot.frame.user_ids[:500]]
    model_id, scored = service.predict_churn(TENANT.tenant_id, users)
    assert model_id == churn_model
    assert [s.user_id for s in scored] == users
    assert all(0 <= s.churn_probability <= 1 for s in scored)
    top = scored[0].top_features
    assert len(top) == 5
    assert abs(top[0][1]) >= abs(top[-1][1])
    # Drift of the serving snapshot against training is recorded with the version.
    assert "drift_psi_max" in service.get_model(TENANT.tenant_id, churn_model).metrics


def test_unknown_user_gets_a_clear_error(service: PredictionService, churn_model: str) -> None:
    _, snapshot = service.churn_snapshot(TENANT.tenant_id)
    known = str(snapshot.frame.user_ids[0])
    with pytest.raises(AnalyticsError) as caught:
        service.predict_churn(TENANT.tenant_id, [known, "nobody"])
    assert caught.value.code is StatusCode.NOT_FOUND
    assert caught.value.field_violations[0].field == "user_ids[1]"


@pytest.fixture(scope="module")
def demand_model(service: PredictionService) -> str:
    record = asyncio.run(service.train(TENANT.tenant_id, ModelKind.DEMAND_FORECAST))
    assert record.state is ModelState.PROMOTED, record.failure
    return record.model_id


def test_a_stale_snapshot_is_served_while_it_rebuilds(
    service: PredictionService, churn_model: str
) -> None:
    fast = PredictionService(
        service.store,
        service.models_dir.parent,
        settings=SETTINGS.model_copy(update={"snapshot_ttl_seconds": 0.001}),
    )
    try:
        _, first = fast.churn_snapshot(TENANT.tenant_id)
        time.sleep(0.01)
        _, second = fast.churn_snapshot(TENANT.tenant_id)
        assert second is first  # no request waits for the rebuild
        for _ in range(600):
            if not fast._refreshing:
                break
            time.sleep(0.05)
        _, third = fast.churn_snapshot(TENANT.tenant_id)
        assert third is not first and third.built_at > first.built_at
    finally:
        asyncio.run(fast.aclose())


def test_demand_forecast_beats_seasonal_naive_and_serves_intervals(
    service: PredictionService, demand_model: str
) -> None:
    record = service.get_model(TENANT.tenant_id, demand_model)
    assert record.metrics["mase"] < record.metrics["baseline_mase"]
    result = service.forecast(TENANT.tenant_id, Target.TICKETS, "", 14, 0.8)
    assert len(result.points) == 14
    assert result.points[0].day_start.date() == TENANT.end.date()
    assert all(p.lower <= p.value <= p.upper for p in result.points)
    # Per ticketed event: the season pass sells every day of the period.
    per_event = service.forecast(TENANT.tenant_id, Target.TICKETS, "season-pass", 7, 0.9)
    assert len(per_event.points) == 7


def test_forecast_errors_are_clear(service: PredictionService, demand_model: str) -> None:
    with pytest.raises(AnalyticsError) as caught:
        service.forecast(TENANT.tenant_id, Target.TICKETS, "", 365, 0.9)
    assert caught.value.field_violations[0].field == "horizon_days"
    assert (caught.value.code, caught.value.reason) == (
        StatusCode.INVALID_ARGUMENT,
        "INSUFFICIENT_HISTORY",
    )
    with pytest.raises(AnalyticsError) as caught:
        service.forecast(TENANT.tenant_id, Target.TICKETS, "no-such-concert", 7, 0.9)
    assert "no sales" in caught.value.message
    with pytest.raises(AnalyticsError) as caught:
        service.forecast(TENANT.tenant_id, Target.REVENUE, "", 7, 0.9)
    # No revenue model trained yet: the request is fine, the system is not ready for it.
    assert (caught.value.code, caught.value.reason) == (
        StatusCode.FAILED_PRECONDITION,
        "MODEL_NOT_READY",
    )
    assert caught.value.metadata == {"model_kind": "revenue forecast"}


def test_empty_history_cannot_train(service: PredictionService) -> None:
    for kind in ModelKind:
        with pytest.raises(AnalyticsError) as caught:
            service.precheck("empty-tenant", kind)
        assert caught.value.code is StatusCode.INVALID_ARGUMENT
        assert caught.value.reason == "INSUFFICIENT_HISTORY"


def test_promote_and_roll_back(service: PredictionService, churn_model: str) -> None:
    second = asyncio.run(service.train(TENANT.tenant_id, ModelKind.CHURN))
    assert second.state is ModelState.READY  # later versions wait for a promotion
    service.promote(TENANT.tenant_id, second.model_id)
    assert service.registry.promoted(TENANT.tenant_id, ModelKind.CHURN).model_id == second.model_id  # type: ignore[union-attr]
    assert service.get_model(TENANT.tenant_id, churn_model).state is ModelState.READY
    model_id, _ = service.predict_churn(
        TENANT.tenant_id, [str(service.churn_snapshot(TENANT.tenant_id)[1].frame.user_ids[0])]
    )
    assert model_id == second.model_id  # serving follows the promoted version
    service.promote(TENANT.tenant_id, churn_model)  # roll back
    assert service.registry.promotion_history(TENANT.tenant_id, ModelKind.CHURN)[-1] == (
        churn_model,
        second.model_id,
    )
    page, token = service.list_models(TENANT.tenant_id, ModelKind.CHURN, 1, "")
    assert len(page) == 1 and token
    rest, _ = service.list_models(TENANT.tenant_id, ModelKind.CHURN, 10, token)
    assert {r.model_id for r in [*page, *rest]} >= {churn_model, second.model_id}


def test_anomaly_model_training_and_monitoring(tmp_path: Path) -> None:
    spec = SyntheticTenant(tenant_id="live", users=3_000, days=40, seed=3)
    store = DuckDBEventStore(tmp_path / "events.duckdb")
    try:
        table, _ = generate(spec)
        store.append_table(table)
        svc = PredictionService(store, tmp_path, settings=SETTINGS)
        record = asyncio.run(svc.train("live", ModelKind.ANOMALY))
        assert record.state is ModelState.PROMOTED, record.failure
        assert record.metrics["f1"] > record.metrics["baseline_f1"]
        # The last hours of the data are replayed through the monitor.
        alerts = asyncio.run(svc.monitor.run_once(spec.end))
        assert all(a.tenant_id == "live" for a in alerts)
        asyncio.run(svc.aclose())
    finally:
        store.close()


def test_revenue_forecast_beats_seasonal_naive_with_currency_and_intervals(
    service: PredictionService,
) -> None:
    record = asyncio.run(service.train(TENANT.tenant_id, ModelKind.REVENUE_FORECAST))
    assert record.state is ModelState.PROMOTED, record.failure
    m = record.metrics
    # Held out: rolling origins, each fold forecast from the days before it only.
    assert m["mase"] < m["baseline_mase"]
    assert m["smape"] < m["baseline_smape"]
    assert record.config["currency"] == "EUR"
    result = service.forecast(TENANT.tenant_id, Target.REVENUE, "", 14, 0.8)
    assert result.model_id == record.model_id and result.currency == "EUR"
    assert len(result.points) == 14
    assert all(0 <= p.lower <= p.value <= p.upper for p in result.points)
    assert any(p.upper > p.lower for p in result.points)
    assert sum(p.value for p in result.points) > 0


def test_platform_wide_demand_forecast_is_trained_and_served(
    service: PredictionService,
) -> None:
    # The platform scope (a platform admin, no tenant) sums every tenant's sales.
    record = asyncio.run(service.train(PLATFORM, ModelKind.DEMAND_FORECAST))
    assert record.state is ModelState.PROMOTED, record.failure
    assert record.tenant_id == PLATFORM
    assert record.metrics["mase"] < record.metrics["baseline_mase"]
    result = service.forecast(PLATFORM, Target.TICKETS, "", 7, 0.9)
    assert result.model_id == record.model_id and len(result.points) == 7
    assert all(p.lower <= p.value <= p.upper for p in result.points)
    # Churn stays per tenant.
    with pytest.raises(AnalyticsError) as caught:
        service.precheck(PLATFORM, ModelKind.CHURN)
    assert caught.value.code is StatusCode.INVALID_ARGUMENT


def test_shap_contributions_and_bias_sum_to_the_logit(
    service: PredictionService, churn_model: str
) -> None:
    record, snapshot = service.churn_snapshot(TENANT.tenant_id)
    model = service._churn_model(record)
    rows = snapshot.frame.matrix[:200]
    contributions = model.contributions(rows)
    assert contributions.shape == (200, len(model.feature_names) + 1)  # bias last
    p = np.clip(model.probabilities(rows).astype(np.float64), 1e-7, 1 - 1e-7)
    logit = np.log(p / (1 - p))
    np.testing.assert_allclose(contributions.sum(axis=1), logit, atol=2e-3)
    # The served top features are the largest of those contributions.
    user = str(snapshot.frame.user_ids[0])
    _, scored = service.predict_churn(TENANT.tenant_id, [user])
    largest = np.sort(np.abs(contributions[0, :-1]))[::-1][: len(scored[0].top_features)]
    np.testing.assert_allclose([abs(v) for _, v in scored[0].top_features], largest, rtol=1e-5)


def test_a_feature_schema_mismatch_is_a_clear_failed_precondition(
    service: PredictionService, churn_model: str
) -> None:
    record, snapshot = service.churn_snapshot(TENANT.tenant_id)
    model = service._churn_model(record)
    older = dataclasses.replace(model, feature_names=(*model.feature_names[:-1], "old_feature"))
    with pytest.raises(AnalyticsError) as caught:
        ScoredSnapshot.score(older, snapshot.frame, snapshot.built_at)
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    assert "feature schema" in caught.value.message and "old_feature" in caught.value.message
    assert "TrainModel" in caught.value.message


def test_a_single_user_is_scored_at_once_after_a_promotion(
    service: PredictionService, churn_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, before = service.churn_snapshot(TENANT.tenant_id)
    users = [str(u) for u in before.frame.user_ids[:3]]
    other = (
        next(
            (
                r.model_id
                for r in service.list_models(TENANT.tenant_id, ModelKind.CHURN, 100, "")[0]
                if r.model_id != churn_model and r.state is ModelState.READY
            ),
            None,
        )
        or asyncio.run(service.train(TENANT.tenant_id, ModelKind.CHURN)).model_id
    )
    release = threading.Event()
    started = threading.Event()
    build = service._build_snapshot

    def slow_build(tenant_id: str, record: ModelRecord) -> ScoredSnapshot:
        started.set()
        release.wait(30)  # the whole-snapshot build takes seconds on real tenants
        return build(tenant_id, record)

    monkeypatch.setattr(service, "_build_snapshot", slow_build)
    try:
        service.promote(TENANT.tenant_id, other)
        assert started.wait(5)  # the promotion started the snapshot in the background
        began = time.perf_counter()
        model_id, scored = service.predict_churn(TENANT.tenant_id, users[:1])
        assert time.perf_counter() - began < 5
        assert model_id == other and scored[0].user_id == users[0]
        assert (
            service._current_snapshot(
                TENANT.tenant_id, service._serving(TENANT.tenant_id, ModelKind.CHURN)
            )
            is None
        )
    finally:
        release.set()
    # Once built, the snapshot gives the same answer.
    for _ in range(600):
        if TENANT.tenant_id not in service._refreshing:
            break
        time.sleep(0.05)
    _, full = service.predict_churn(TENANT.tenant_id, users[:1])
    assert full[0].churn_probability == pytest.approx(scored[0].churn_probability, abs=1e-6)
    assert [n for n, _ in full[0].top_features] == [n for n, _ in scored[0].top_features]
    service.promote(TENANT.tenant_id, churn_model)  # back to the module's serving version
