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
    AnomalyFilter,
    AnomalyMonitor,
    LiveAnomalyCheck,
    ThresholdRule,
    floor_hour,
    hourly_metrics,
    new_rule,
)
from services.prediction.anomaly import Severity
from services.prediction.churn import ChurnModel, ScoredSnapshot, ScoredUser, data_end, train_churn
from services.prediction.errors import insufficient_data, no_serving_model, unknown_users
from services.prediction.features import (
    CHURN_HORIZON_DAYS,
    FeatureFrame,
    build_features,
    data_span,
)
from services.prediction.forecasting import Method
from services.prediction.registry import (
    PLATFORM,
    ModelKind,
    ModelRecord,
    ModelRegistry,
    ModelState,
)
from services.storage.event_store import TABLE, EventStore

log = structlog.get_logger(__name__)

REGISTRY_FILE = "prediction.sqlite3"
MODELS_DIR = "models"
ANOMALY_CANDIDATE_THRESHOLDS = (3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
# PredictChurn for at most this many users scores them on demand while no snapshot of
# the promoted version exists yet (the snapshot is built in the background meanwhile).
ON_DEMAND_MAX_USERS = 100
# The held-out metric the promotion policy compares, and whether higher is better; the
# baseline's value is stored as `baseline_<name>` (`baseline_recency_<name>` for churn).
PROMOTION_METRIC: dict[ModelKind, tuple[str, bool]] = {
    ModelKind.CHURN: ("roc_auc", True),
    ModelKind.DEMAND_FORECAST: ("mase", False),
    ModelKind.REVENUE_FORECAST: ("mase", False),
    ModelKind.ANOMALY: ("f1", True),
}


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
    live_check_seconds: float = Field(
        5.0,
        ge=0,
        description="How often live event totals of the open hour are checked for "
        "anomalies (streaming detection); 0 disables.",
    )


@dataclass(frozen=True, slots=True)
class ForecastResult:
    model_id: str
    points: list[demand.ForecastPoint]
    currency: str


def _better(value: float, other: float, higher_is_better: bool) -> bool:
    return value > other if higher_is_better else value < other


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
        # Streaming detection: the mesh feeds it the committed event batches.
        self.live = LiveAnomalyCheck(self.monitor)
        self._today = today or (lambda: datetime.now(UTC).date())
        self._training = threading.Lock()  # one job at a time: two cores
        self._snapshots: dict[str, ScoredSnapshot] = {}
        self._snapshot_models: dict[str, str] = {}
        self._snapshot_lock = threading.Lock()
        self._refreshing: set[str] = set()
        self._build_locks: dict[str, threading.Lock] = {}
        self._models: dict[str, ChurnModel] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    def start_background(self) -> None:
        """Starts the anomaly monitor and the retraining schedule on the running loop."""
        if self.settings.anomaly_interval_seconds > 0:
            self._spawn(self.monitor.run_forever(self.settings.anomaly_interval_seconds))
        if self.settings.live_check_seconds > 0:
            self._spawn(self.live.run_forever(self.settings.live_check_seconds))
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
        the interval, for every tenant with events and the platform's forecasts.
        Returns the finished versions."""
        interval = timedelta(hours=self.settings.retrain_interval_hours or 24)
        done: list[ModelRecord] = []
        tenants = await asyncio.to_thread(self._tenants_with_events)
        for tenant_id, kind in scheduled_scopes(tenants):
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
            done.append(await self.train(tenant_id, kind, scheduled=True))
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
            hours, _ = self._hourly_history(tenant_id)
            if len(hours) < 21 * 24 or not np.any(hours):
                raise insufficient_data(
                    f"anomaly calibration needs 21+ days of hourly activity; the tenant has "
                    f"{len(hours) / 24:.1f}"
                )

    def _hourly_history(self, tenant_id: str, days: int = 56) -> tuple[np.ndarray, datetime]:
        """Hourly event counts up to the last closed hour of the data, and that end."""
        where = "" if tenant_id == PLATFORM else "WHERE tenant_id = $tenant"
        params = {} if tenant_id == PLATFORM else {"tenant": tenant_id}
        row = self.store.read(
            f"SELECT min(occurred_at) AS first, max(occurred_at) AS last FROM {TABLE} {where}",
            params,
        ).to_pylist()[0]
        if row["last"] is None:
            return np.zeros(0), datetime.now(UTC)
        end = floor_hour(row["last"])
        start = max(floor_hour(row["first"]), end - timedelta(days=days))
        return hourly_metrics(self.store, tenant_id, start, end)["event_count"], end

    def start_training(self, tenant_id: str, kind: ModelKind) -> ModelRecord:
        """Creates the version (TRAINING) and runs the job in the background."""
        self.precheck(tenant_id, kind)
        record = self.registry.create(tenant_id, kind, datetime.now(UTC))
        self._spawn(asyncio.to_thread(self._run_job, record))
        return record

    async def train(
        self, tenant_id: str, kind: ModelKind, *, scheduled: bool = False
    ) -> ModelRecord:
        """Trains to completion (scheduled jobs, CLI, tests); returns the final record.
        `scheduled`: the promotion policy of scheduled versions applies (`_auto_promote`)."""
        record = self.registry.create(tenant_id, kind, datetime.now(UTC))
        await asyncio.to_thread(self._run_job, record, scheduled)
        final = self.registry.get(tenant_id, record.model_id)
        assert final is not None
        return final

    def _run_job(self, record: ModelRecord, scheduled: bool = False) -> None:
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
        self._auto_promote(record, scheduled)

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
        history, end = self._hourly_history(record.tenant_id)
        if len(history) < 21 * 24:
            raise insufficient_data("anomaly calibration needs 21+ days of hourly activity")
        config, metrics = anomaly.calibrate(history, ANOMALY_CANDIDATE_THRESHOLDS, progress)
        self.registry.complete(
            record.model_id,
            metrics=metrics,
            feature_names=("hourly_event_count",),
            config=dict(config.to_json()),
            # The window of the data read, not of the clock: the data may be older.
            training_start=end - timedelta(hours=len(history)),
            training_end=end,
        )

    def _auto_promote(self, record: ModelRecord, scheduled: bool = False) -> None:
        """The promotion policy.

        - A version that does not beat its baseline on held-out data never serves by
          itself.
        - The first version of a kind that does is promoted (a fresh tenant gets
          predictions without a manual step).
        - A scheduled version replaces the promoted one when it is at least as good on
          the kind's held-out metric (`PROMOTION_METRIC`); otherwise it stays a READY
          candidate, the reason in its `stage`. Each version is evaluated on the window
          after its own training data, so this compares the latest evaluation with the
          older one.
        - An on-demand version (TrainModel, the CLI) waits for PromoteModel.
        """
        final = self.registry.get(record.tenant_id, record.model_id)
        if final is None or final.state is not ModelState.READY:
            return
        name, higher_is_better = PROMOTION_METRIC[record.kind]
        m = final.metrics
        baseline = m.get(f"baseline_{name}", m.get(f"baseline_recency_{name}"))
        value = m.get(name)
        if value is None or baseline is None or not _better(value, baseline, higher_is_better):
            self.registry.note(
                record.model_id, f"candidate: {name} {value} does not beat the baseline {baseline}"
            )
            return
        current = self.registry.promoted(record.tenant_id, record.kind)
        if current is not None and not scheduled:
            return
        if current is not None:
            served = current.metrics.get(name)
            if served is not None and not (
                value == served or _better(value, served, higher_is_better)
            ):
                reason = (
                    f"candidate: {name} {value:.4g} is worse than the promoted "
                    f"{current.model_id}'s {served:.4g}"
                )
                self.registry.note(record.model_id, reason)
                log.info(
                    "scheduled_model_kept_as_candidate", model_id=record.model_id, reason=reason
                )
                return
        self.registry.promote(record.tenant_id, record.model_id, datetime.now(UTC))
        log.info(
            "model_auto_promoted",
            model_id=record.model_id,
            replaced=current.model_id if current else None,
        )
        if record.kind is ModelKind.CHURN:
            self._warm_snapshot(record.tenant_id)

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
        record = self.registry.promote(tenant_id, model_id, datetime.now(UTC))
        if record.kind is ModelKind.CHURN:
            self._warm_snapshot(tenant_id)  # the next PredictChurn should not wait for it
        return record

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

    def _current_snapshot(self, tenant_id: str, record: ModelRecord) -> ScoredSnapshot | None:
        with self._snapshot_lock:
            snapshot = self._snapshots.get(tenant_id)
            if snapshot is None or self._snapshot_models.get(tenant_id) != record.model_id:
                return None
            return snapshot

    def _build_lock(self, tenant_id: str) -> threading.Lock:
        with self._snapshot_lock:
            return self._build_locks.setdefault(tenant_id, threading.Lock())

    def _ensure_snapshot(self, tenant_id: str, record: ModelRecord) -> ScoredSnapshot:
        """The snapshot of `record`, built now unless one is current (one build per
        tenant at a time: a request arriving during a build waits for it)."""
        with self._build_lock(tenant_id):
            snapshot = self._current_snapshot(tenant_id, record)
            if snapshot is None:
                snapshot = self._build_snapshot(tenant_id, record)
                with self._snapshot_lock:
                    self._snapshots[tenant_id] = snapshot
                    self._snapshot_models[tenant_id] = record.model_id
            return snapshot

    def churn_snapshot(self, tenant_id: str) -> tuple[ModelRecord, ScoredSnapshot]:
        """The scored snapshot of the promoted version. Missing or of another version:
        built now (promotions start that build in the background). Older than the TTL:
        served as is while a rebuild runs in the background, so no request waits for
        TreeSHAP over every user."""
        record = self._serving(tenant_id, ModelKind.CHURN)
        snapshot = self._current_snapshot(tenant_id, record)
        if snapshot is None:
            return record, self._ensure_snapshot(tenant_id, record)
        age = (datetime.now(UTC) - snapshot.built_at).total_seconds()
        with self._snapshot_lock:
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

    def _warm_snapshot(self, tenant_id: str) -> None:
        """Builds the promoted version's snapshot in the background (after a promotion)."""
        with self._snapshot_lock:
            if tenant_id in self._refreshing:
                return
            self._refreshing.add(tenant_id)
        threading.Thread(target=self._warm, args=(tenant_id,), daemon=True).start()

    def _warm(self, tenant_id: str) -> None:
        try:
            record = self.registry.promoted(tenant_id, ModelKind.CHURN)
            if record is not None:
                self._ensure_snapshot(tenant_id, record)
        except Exception:
            log.exception("churn_snapshot_warm_failed", tenant_id=tenant_id)
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
        record = self._serving(tenant_id, ModelKind.CHURN)
        snapshot = self._current_snapshot(tenant_id, record)
        if snapshot is None and len(user_ids) <= ON_DEMAND_MAX_USERS:
            # Right after a promotion: these users now, every user in the background.
            self._warm_snapshot(tenant_id)
            snapshot = self._score_users(tenant_id, record, user_ids)
        else:
            record, snapshot = self.churn_snapshot(tenant_id)
        found, missing = snapshot.lookup(user_ids)
        if missing:
            raise unknown_users(user_ids, missing, f"{snapshot.frame.cutoff:%Y-%m-%d %H:%M} UTC")
        return record.model_id, found

    def _score_users(
        self, tenant_id: str, record: ModelRecord, user_ids: list[str]
    ) -> ScoredSnapshot:
        """A snapshot of just `user_ids` (SHAP for a few rows, not for everyone)."""
        model = self._churn_model(record)
        as_of = data_end(self.store, tenant_id) or datetime.now(UTC)
        frame = build_features(self.store, tenant_id, as_of)
        keep = np.isin(frame.user_ids, np.asarray(user_ids, dtype=object))
        part = FeatureFrame(
            frame.cutoff, frame.user_ids[keep], frame.matrix[keep], frame.feature_names
        )
        return ScoredSnapshot.score(model, part, datetime.now(UTC))

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
        self,
        tenant_id: str,
        page_size: int,
        page_token: str,
        where: AnomalyFilter | None = None,
    ) -> tuple[list[Alert], str]:
        return self.alerts.page(tenant_id, page_size, page_token, where)

    # --- threshold rules ---------------------------------------------------------------

    def put_rule(
        self,
        tenant_id: str,
        metric_name: str,
        lower: float | None,
        upper: float | None,
        severity: Severity = Severity.WARNING,
        rule_id: str = "",
    ) -> ThresholdRule:
        """Adds (or replaces, same id) a tenant's threshold rule; checked first."""
        if tenant_id == PLATFORM:
            raise invalid_request(
                [FieldViolation("rule", "threshold rules are per tenant: use a tenant credential")]
            )
        rule = new_rule(self.alerts, tenant_id, metric_name, lower, upper, severity, rule_id)
        self.alerts.put_rule(rule)
        return rule

    def list_rules(self, tenant_id: str) -> list[ThresholdRule]:
        return self.alerts.rules(tenant_id)

    def delete_rule(self, tenant_id: str, rule_id: str) -> None:
        if not self.alerts.delete_rule(tenant_id, rule_id):
            raise AnalyticsError(
                StatusCode.NOT_FOUND, "NOT_FOUND", f"threshold rule {rule_id!r} not found"
            )


# Platform-wide models the schedule keeps fresh: only forecasts exist for the platform
# (churn and anomaly models are per tenant).
PLATFORM_SCHEDULED_KINDS = (ModelKind.DEMAND_FORECAST, ModelKind.REVENUE_FORECAST)


def scheduled_scopes(tenants: list[str]) -> list[tuple[str, ModelKind]]:
    """(tenant or PLATFORM, kind) pairs the retraining schedule considers, in order:
    every kind for every tenant with events, then the platform's forecasts."""
    scopes = [(tenant_id, kind) for tenant_id in tenants for kind in ModelKind]
    if tenants:
        scopes += [(PLATFORM, kind) for kind in PLATFORM_SCHEDULED_KINDS]
    return scopes
