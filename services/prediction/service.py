"""The prediction service's domain facade: training jobs, the registry, serving.

No gRPC here: the servicer converts protos to these calls and back.

Training runs one job at a time (the machine has two cores and XGBoost uses both) in a
worker thread; `start_training` returns at once with the version in state TRAINING,
whose `progress` and `stage` the registry updates as the job goes. The first version of
a kind that beats its baseline on held-out data is promoted automatically (so a fresh
tenant gets predictions without a manual step); later versions wait for `promote`.

Serving always uses the promoted version of the caller's tenant and kind. Churn scores
come from a snapshot (`churn.ScoredSnapshot`) rebuilt when the promoted version changes
or the snapshot is older than `snapshot_ttl_seconds`; each rebuild also measures input
drift against the training distribution and stores it with the model version.

Background work (`start_background`): the anomaly monitor every
`anomaly_interval_seconds`, and scheduled retraining of every kind for every tenant
with data every `retrain_interval_hours` (after `schedule_start_delay_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.platform.errors import AnalyticsError, FieldViolation, StatusCode, invalid_request
from services.prediction import anomaly, demand, drift
from services.prediction.alerts import (
    Alert,
    AlertBus,
    AlertSink,
    AlertStore,
    AnomalyMonitor,
    floor_hour,
    hourly_metrics,
)
from services.prediction.churn import ChurnModel, ScoredSnapshot, ScoredUser, data_end, train_churn
from services.prediction.errors import insufficient_data, no_serving_model, unknown_users
from services.prediction.features import CHURN_HORIZON_DAYS, build_features, data_span
from services.prediction.forecasting import Method
from services.prediction.registry import PLATFORM, ModelKind, ModelRecord, ModelRegistry
from services.storage.event_store import TABLE, EventStore

log = structlog.get_logger(__name__)

REGISTRY_FILE = "prediction.sqlite3"
MODELS_DIR = "models"
ANOMALY_CANDIDATE_THRESHOLDS = (3.0, 3.5, 4.0, 5.0, 6.0, 8.0)


class PredictionSettings(BaseSettings):
    """`BILTEN_PREDICTION_*` settings of the prediction service."""

    model_config = SettingsConfigDict(env_prefix="BILTEN_PREDICTION_", extra="ignore", frozen=True)

    retrain_interval_hours: float = Field(
        24.0, ge=0, description="Scheduled retraining period; 0 disables the schedule."
    )
    schedule_start_delay_seconds: float = Field(
        600.0, ge=0, description="Wait after start before the first scheduled retraining."
    )
    anomaly_interval_seconds: float = Field(
        300.0, ge=0, description="How often the anomaly monitor closes hours; 0 disables."
    )
    snapshot_ttl_seconds: float = Field(
        900.0, gt=0, description="Age after which churn scores are recomputed."
    )


@dataclass(frozen=True, slots=True)
class ForecastResult:
    model_id: str
    points: list[demand.ForecastPoint]
    currency: str


def _kind_label(kind: ModelKind) -> str:
    return kind.value.replace("_", " ")


class PredictionService:
    def __init__(
        self,
        store: EventStore,
        data_dir: Path,
        *,
        sink: AlertSink | None = None,
        settings: PredictionSettings | None = None,
        today: Callable[[], date] | None = None,
    ) -> None:
        self.store = store
        # pydantic-settings fills the fields from the environment.
        self.settings = settings or PredictionSettings()
        self.models_dir = data_dir / MODELS_DIR
        self.registry = ModelRegistry(data_dir / REGISTRY_FILE)
        self.alerts = AlertStore(data_dir / REGISTRY_FILE)
        self.bus = AlertBus()
        self.monitor = AnomalyMonitor(store, self.alerts, sink or self.bus, self._detector_config)
        self._today = today or (lambda: datetime.now(UTC).date())
        self._training = threading.Lock()  # one job at a time: two cores
        self._snapshots: dict[str, ScoredSnapshot] = {}
        self._snapshot_models: dict[str, str] = {}
        self._snapshot_lock = threading.Lock()
        self._refreshing: set[str] = set()
        self._models: dict[str, ChurnModel] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    def start_background(self) -> None:
        """Starts the anomaly monitor and the retraining schedule on the running loop."""
        if self.settings.anomaly_interval_seconds > 0:
            self._spawn(self.monitor.run_forever(self.settings.anomaly_interval_seconds))
        if self.settings.retrain_interval_hours > 0:
            self._spawn(self._schedule())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.registry.close()
        self.alerts.close()

    async def _schedule(self) -> None:
        await asyncio.sleep(self.settings.schedule_start_delay_seconds)
        while True:
            await self.retrain_due()
            await asyncio.sleep(self.settings.retrain_interval_hours * 3600)

    async def retrain_due(self) -> list[ModelRecord]:
        """The scheduled job: retrains every kind whose newest version is older than
        the interval, for every tenant with events. Returns the finished versions."""
        interval = timedelta(hours=self.settings.retrain_interval_hours or 24)
        done: list[ModelRecord] = []
        tenants = await asyncio.to_thread(self._tenants_with_events)
        for tenant_id in tenants:
            for kind in ModelKind:
                newest, _ = self.registry.page(tenant_id, kind, 1, "")
                if newest and datetime.now(UTC) - newest[0].created_at < interval:
                    continue
                try:
                    await asyncio.to_thread(self.precheck, tenant_id, kind)
                except AnalyticsError as error:
                    log.info(
                        "scheduled_training_skipped",
                        tenant_id=tenant_id,
                        kind=kind.value,
                        reason=error.message,
                    )
                    continue
                done.append(await self.train(tenant_id, kind))
        return done

    def _tenants_with_events(self) -> list[str]:
        table = self.store.read(f"SELECT DISTINCT tenant_id FROM {TABLE} ORDER BY 1")
        return [str(t) for t in table.column("tenant_id").to_pylist()]

    # --- training ----------------------------------------------------------------------

    def precheck(self, tenant_id: str, kind: ModelKind) -> None:
        """Cheap checks that the tenant's history can support `kind` (clear errors
        before a version is created)."""
        if kind is ModelKind.CHURN:
            if tenant_id == PLATFORM:
                raise invalid_request(
                    [FieldViolation("kind", "churn models are per tenant: use a tenant credential")]
                )
            span = data_span(self.store, tenant_id)
            end = data_end(self.store, tenant_id)
            needed = 2 * CHURN_HORIZON_DAYS + 14
            if span.first is None or end is None:
                raise insufficient_data(
                    "the tenant has no events of identified users to learn churn from"
                )
            days = (end - span.first).total_seconds() / 86_400
            if days < needed:
                raise insufficient_data(
                    f"churn needs {needed}+ days of history; the tenant has {days:.0f}"
                )
        elif kind in (ModelKind.DEMAND_FORECAST, ModelKind.REVENUE_FORECAST):
            target = (
                demand.Target.TICKETS
                if kind is ModelKind.DEMAND_FORECAST
                else demand.Target.REVENUE
            )
            series = demand.daily_series(self.store, tenant_id, target, today=self._today())
            needed = demand.BACKTEST_FOLDS * demand.BACKTEST_HORIZON_DAYS + 8 * 7
            if len(series.values) < needed or not np.any(series.values):
                raise insufficient_data(
                    f"a {target} forecast needs {needed}+ days of sales history; the scope "
                    f"has {len(series.values)}"
                )
        else:
            hours = self._hourly_history(tenant_id)
            if len(hours) < 21 * 24 or not np.any(hours):
                raise insufficient_data(
                    f"anomaly calibration needs 21+ days of hourly activity; the tenant has "
                    f"{len(hours) / 24:.1f}"
                )

    def _hourly_history(self, tenant_id: str, days: int = 56) -> np.ndarray:
        where = "" if tenant_id == PLATFORM else "WHERE tenant_id = $tenant"
        params = {} if tenant_id == PLATFORM else {"tenant": tenant_id}
        row = self.store.read(
            f"SELECT min(occurred_at) AS first, max(occurred_at) AS last FROM {TABLE} {where}",
            params,
        ).to_pylist()[0]
        if row["last"] is None:
            return np.zeros(0)
        end = floor_hour(row["last"])
        start = max(floor_hour(row["first"]), end - timedelta(days=days))
        return hourly_metrics(self.store, tenant_id, start, end)["event_count"]

    def start_training(self, tenant_id: str, kind: ModelKind) -> ModelRecord:
        """Creates the version (TRAINING) and runs the job in the background."""
        self.precheck(tenant_id, kind)
        record = self.registry.create(tenant_id, kind, datetime.now(UTC))
        self._spawn(asyncio.to_thread(self._run_job, record))
        return record

    async def train(self, tenant_id: str, kind: ModelKind) -> ModelRecord:
        """Trains to completion (scheduled jobs, CLI, tests); returns the final record."""
        record = self.registry.create(tenant_id, kind, datetime.now(UTC))
        await asyncio.to_thread(self._run_job, record)
        final = self.registry.get(tenant_id, record.model_id)
        assert final is not None
        return final

    def _run_job(self, record: ModelRecord) -> None:
        def progress(fraction: float, stage: str) -> None:
            self.registry.report_progress(record.model_id, fraction, stage)
            log.info(
                "training_progress",
                model_id=record.model_id,
                progress=round(fraction, 2),
                stage=stage,
            )

        with self._training:
            try:
                if record.kind is ModelKind.CHURN:
                    self._train_churn(record, progress)
                elif record.kind is ModelKind.ANOMALY:
                    self._train_anomaly(record, progress)
                else:
                    self._train_forecast(record, progress)
            except AnalyticsError as error:
                self.registry.fail(record.model_id, error.message)
                log.warning("training_failed", model_id=record.model_id, reason=error.message)
                return
            except Exception as error:
                self.registry.fail(record.model_id, f"{type(error).__name__}: {error}")
                log.exception("training_failed", model_id=record.model_id)
                return
        self._auto_promote(record)

    def _train_churn(self, record: ModelRecord, progress: Callable[[float, str], None]) -> None:
        result = train_churn(self.store, record.tenant_id, progress=progress)
        result.model.save(self.models_dir / record.model_id)
        self.registry.complete(
            record.model_id,
            metrics=result.evaluation.metrics,
            feature_names=result.model.feature_names,
            config={
                "horizon_days": result.model.horizon_days,
                "calibration": result.evaluation.calibration,
            },
            training_start=result.window_start,
            training_end=result.window_end,
        )

    def _train_forecast(self, record: ModelRecord, progress: Callable[[float, str], None]) -> None:
        target = (
            demand.Target.TICKETS
            if record.kind is ModelKind.DEMAND_FORECAST
            else demand.Target.REVENUE
        )
        result = demand.train_forecast(
            self.store, record.tenant_id, target, today=self._today(), progress=progress
        )
        start = datetime.combine(result.series.start, datetime.min.time(), UTC)
        end = datetime.combine(result.series.end, datetime.min.time(), UTC)
        self.registry.complete(
            record.model_id,
            metrics=result.backtest.metrics(),
            feature_names=("day_of_week", "day_of_year", "lags")
            if result.backtest.chosen is Method.GBM_LAGS
            else (),
            config=result.config(),
            training_start=start,
            training_end=end,
        )

    def _train_anomaly(self, record: ModelRecord, progress: Callable[[float, str], None]) -> None:
        progress(0.1, "reading hourly history")
        history = self._hourly_history(record.tenant_id)
        if len(history) < 21 * 24:
            raise insufficient_data("anomaly calibration needs 21+ days of hourly activity")
        period = anomaly.estimate_period(history, (24, 168))
        warm = 7 * 24
        rng = np.random.default_rng(7)
        # Semi-synthetic labels: the tenant's own series with anomalies injected at
        # known places (real labels do not exist for a fresh tenant).
        trials = [anomaly.inject_anomalies(history, rng, 8, start=warm) for _ in range(3)]
        best: tuple[float, float, dict[str, float]] | None = None
        for i, threshold in enumerate(ANOMALY_CANDIDATE_THRESHOLDS):
            progress(
                0.2 + 0.7 * i / len(ANOMALY_CANDIDATE_THRESHOLDS), f"scoring threshold {threshold}"
            )
            config = anomaly.DetectorConfig(
                period=24, seasons=4 if period == 24 else 2, threshold=threshold
            )
            scores = [
                anomaly.evaluate(anomaly.detect(t.series, config), t.ranges, skip=warm)
                for t in trials
            ]
            f1 = float(np.mean([s.f1 for s in scores]))
            if best is None or f1 > best[0]:
                best = (
                    f1,
                    threshold,
                    {
                        "precision": float(np.mean([s.precision for s in scores])),
                        "recall": float(np.mean([s.recall for s in scores])),
                        "f1": f1,
                        "mean_delay_hours": float(np.nanmean([s.mean_delay for s in scores]))
                        if any(s.detected for s in scores)
                        else float("nan"),
                    },
                )
        assert best is not None
        baseline = [
            anomaly.evaluate(anomaly.detect_baseline(t.series), t.ranges, skip=warm) for t in trials
        ]
        metrics = {
            **best[2],
            "baseline_precision": float(np.mean([s.precision for s in baseline])),
            "baseline_recall": float(np.mean([s.recall for s in baseline])),
            "baseline_f1": float(np.mean([s.f1 for s in baseline])),
            "period_hours": float(period),
            "threshold": best[1],
        }
        config = anomaly.DetectorConfig(
            period=24, seasons=4 if period == 24 else 2, threshold=best[1]
        )
        end = floor_hour(datetime.now(UTC))
        self.registry.complete(
            record.model_id,
            metrics=metrics,
            feature_names=("hourly_event_count",),
            config=dict(config.to_json()),
            training_start=end - timedelta(hours=len(history)),
            training_end=end,
        )

    def _auto_promote(self, record: ModelRecord) -> None:
        final = self.registry.get(record.tenant_id, record.model_id)
        if final is None or final.state.value != "ready":
            return
        if self.registry.promoted(record.tenant_id, record.kind) is not None:
            return
        m = final.metrics
        beats = {
            ModelKind.CHURN: m.get("roc_auc", 0) > m.get("baseline_recency_roc_auc", 1),
            ModelKind.DEMAND_FORECAST: m.get("mase", 9) < m.get("baseline_mase", 0),
            ModelKind.REVENUE_FORECAST: m.get("mase", 9) < m.get("baseline_mase", 0),
            ModelKind.ANOMALY: m.get("f1", 0) > m.get("baseline_f1", 1),
        }[record.kind]
        if beats:
            self.registry.promote(record.tenant_id, record.model_id, datetime.now(UTC))
            log.info("model_auto_promoted", model_id=record.model_id)

    # --- registry ----------------------------------------------------------------------

    def get_model(self, tenant_id: str, model_id: str) -> ModelRecord:
        record = self.registry.get(tenant_id, model_id)
        if record is None:
            raise AnalyticsError(StatusCode.NOT_FOUND, "NOT_FOUND", f"model {model_id!r} not found")
        return record

    def list_models(
        self, tenant_id: str, kind: ModelKind | None, page_size: int, page_token: str
    ) -> tuple[list[ModelRecord], str]:
        return self.registry.page(tenant_id, kind, page_size, page_token)

    def promote(self, tenant_id: str, model_id: str) -> ModelRecord:
        return self.registry.promote(tenant_id, model_id, datetime.now(UTC))

    # --- churn -------------------------------------------------------------------------

    def _serving(self, tenant_id: str, kind: ModelKind) -> ModelRecord:
        record = self.registry.promoted(tenant_id, kind)
        if record is None:
            raise no_serving_model(_kind_label(kind))
        return record

    def _churn_model(self, record: ModelRecord) -> ChurnModel:
        model = self._models.get(record.model_id)
        if model is None:
            model = ChurnModel.load(self.models_dir / record.model_id)
            self._models = {record.model_id: model}  # only the serving version stays loaded
        return model

    def churn_snapshot(self, tenant_id: str) -> tuple[ModelRecord, ScoredSnapshot]:
        """The scored snapshot of the promoted version. Missing or of another version:
        built now. Older than the TTL: served as is while a rebuild runs in the
        background, so no request waits for TreeSHAP over every user."""
        record = self._serving(tenant_id, ModelKind.CHURN)
        with self._snapshot_lock:
            snapshot = self._snapshots.get(tenant_id)
            current = (
                snapshot is not None and self._snapshot_models.get(tenant_id) == record.model_id
            )
            if snapshot is None or not current:
                snapshot = self._build_snapshot(tenant_id, record)
                self._snapshots[tenant_id] = snapshot
                self._snapshot_models[tenant_id] = record.model_id
                return record, snapshot
            age = (datetime.now(UTC) - snapshot.built_at).total_seconds()
            if age >= self.settings.snapshot_ttl_seconds and tenant_id not in self._refreshing:
                self._refreshing.add(tenant_id)
                threading.Thread(
                    target=self._refresh, args=(tenant_id, record), daemon=True
                ).start()
        return record, snapshot

    def _refresh(self, tenant_id: str, record: ModelRecord) -> None:
        try:
            snapshot = self._build_snapshot(tenant_id, record)
            with self._snapshot_lock:
                if self._snapshot_models.get(tenant_id) == record.model_id:
                    self._snapshots[tenant_id] = snapshot
        except Exception:
            log.exception("churn_snapshot_refresh_failed", tenant_id=tenant_id)
        finally:
            with self._snapshot_lock:
                self._refreshing.discard(tenant_id)

    def _build_snapshot(self, tenant_id: str, record: ModelRecord) -> ScoredSnapshot:
        model = self._churn_model(record)
        as_of = data_end(self.store, tenant_id) or datetime.now(UTC)
        frame = build_features(self.store, tenant_id, as_of)
        snapshot = ScoredSnapshot.score(model, frame, datetime.now(UTC))
        if len(frame):
            psi = model.reference.psi(frame.matrix)
            report = drift.summary(psi)
            self.registry.merge_metrics(record.model_id, report)
            if report.get("drift_psi_max", 0) > drift.DRIFT_ALERT_PSI:
                log.warning(
                    "churn_feature_drift",
                    model_id=record.model_id,
                    psi_max=report["drift_psi_max"],
                    features=[k for k, v in psi.items() if v > drift.DRIFT_ALERT_PSI],
                )
        return snapshot

    def predict_churn(self, tenant_id: str, user_ids: list[str]) -> tuple[str, list[ScoredUser]]:
        if tenant_id == PLATFORM:
            raise invalid_request(
                [FieldViolation("user_ids", "users belong to a tenant: use a tenant credential")]
            )
        record, snapshot = self.churn_snapshot(tenant_id)
        found, missing = snapshot.lookup(user_ids)
        if missing:
            raise unknown_users(user_ids, missing, f"{snapshot.frame.cutoff:%Y-%m-%d %H:%M} UTC")
        return record.model_id, found

    # --- forecasts ---------------------------------------------------------------------

    def forecast(
        self, tenant_id: str, target: str, ticketed_event_id: str, horizon_days: int, level: float
    ) -> ForecastResult:
        kind = (
            ModelKind.DEMAND_FORECAST
            if target == demand.Target.TICKETS
            else ModelKind.REVENUE_FORECAST
        )
        record = self._serving(tenant_id, kind)
        config = record.config
        currency = str(config.get("currency", "")) if target == demand.Target.REVENUE else None
        series = demand.daily_series(
            self.store,
            tenant_id,
            target,
            ticketed_event_id,
            today=self._today(),
            currency=currency,
        )
        what = (
            f"ticketed event {ticketed_event_id!r}"
            if ticketed_event_id
            else ("the platform" if tenant_id == PLATFORM else "the tenant")
        )
        demand.check_history(series, horizon_days, what)
        widths = [float(w) for w in config.get("interval_widths", [])]  # type: ignore[attr-defined]
        trained_level = float(config.get("interval_level", 0.9))  # type: ignore[arg-type]
        points = demand.predict(
            series, Method(str(config["method"])), widths, trained_level, horizon_days, level or 0.9
        )
        return ForecastResult(record.model_id, points, series.currency)

    # --- anomalies ---------------------------------------------------------------------

    def _detector_config(self, tenant_id: str) -> anomaly.DetectorConfig:
        record = self.registry.promoted(tenant_id, ModelKind.ANOMALY)
        if record is None:
            return anomaly.DetectorConfig()
        return anomaly.DetectorConfig.from_json(record.config)

    def list_anomalies(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[Alert], str]:
        return self.alerts.page(tenant_id, page_size, page_token)
