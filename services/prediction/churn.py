"""Churn: an XGBoost classifier over `features.FEATURE_NAMES`, its evaluation, serving.

Training (`train_churn`) uses a time-based split, never a random one: with `as_of` the
end of the tenant's data and H the churn horizon,
- the training snapshot is taken at `as_of - 2H` (features from the 90 days before,
  labels from the H days after), 15 % of its users held out for early stopping;
- the evaluation snapshot is taken at `as_of - H` (labels from the last H days), so the
  model is judged on a later window it never saw, like in production.
Every training reports ROC AUC, PR AUC (average precision), Brier score, log loss and
the expected calibration error (ECE, 10 equal-width bins) of the model and of two
baselines on the same evaluation snapshot: the recency rule (score = days since the
last event) and a logistic regression on standardised features. All of it is stored
with the model version.

Serving (`ChurnScorer`) scores a *snapshot*: features of every active user as of the
end of the data, computed in one query, with probabilities and SHAP contributions
(XGBoost's `pred_contribs`, exact TreeSHAP, in log-odds) computed once for all users.
A request is then an index lookup. Why: exact TreeSHAP costs ~0.1-0.5 ms per user, so
10,000 users on demand would take seconds; churn scores move daily, not per request.
The snapshot is rebuilt when older than its time-to-live (see `ChurnScorer`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from services.prediction import drift
from services.prediction.errors import feature_schema_mismatch, insufficient_data
from services.prediction.features import (
    CHURN_HORIZON_DAYS,
    FEATURE_NAMES,
    LOOKBACK_DAYS,
    FeatureFrame,
    build_features,
    churn_labels,
    data_span,
)
from services.storage.event_store import EventStore

# XGBoost and scikit-learn are imported where a model is trained, loaded or scored, not
# here: `services.mesh` imports this module in every process (ingestion-only ones too),
# and the two cost ~8 s of CPU to import (scikit-learn pulls scipy and pandas).
if TYPE_CHECKING:
    import xgboost as xgb

Floats = npt.NDArray[np.float32]
# XGBoost threads. Default: every core. The test suite sets 1, because its two xdist
# workers each running two OpenMP threads on two cores spin against each other
# (training slowed >10x when the machine was also busy).
THREADS = int(os.environ.get("BILTEN_PREDICTION_THREADS", "0")) or (os.cpu_count() or 2)
Progress = Callable[[float, str], None]

# Fewer users than this in either snapshot, or fewer churners/returners, and the
# evaluation would be noise: training refuses with a clear message instead.
MIN_USERS = 200
MIN_CLASS = 20
TOP_FEATURES = 5

# Chosen by hand on the synthetic tenants and the 1 M x 50 benchmark: depth 4 keeps
# exact TreeSHAP affordable; strong leaf regularisation because labels are noisy
# (an active user may simply be quiet for a month).
XGB_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "eval_metric": "logloss",
    "tree_method": "hist",
    "max_depth": 4,
    "eta": 0.08,
    "min_child_weight": 30,
    "reg_lambda": 10.0,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "max_bin": 128,
    "nthread": THREADS,
}
MAX_ROUNDS = 300
EARLY_STOPPING_ROUNDS = 25


def _quiet(_fraction: float, _stage: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Scores of the model and baselines on the held-out later window."""

    metrics: dict[str, float]
    calibration: list[dict[str, float]]  # per bin: mean_predicted, observed_rate, count


@dataclass
class ChurnModel:
    """A trained churn model: what serving needs, and what drift is measured against."""

    booster: xgb.Booster
    feature_names: tuple[str, ...]
    reference: drift.Reference
    horizon_days: int = CHURN_HORIZON_DAYS
    calibration: list[dict[str, float]] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(directory / "model.ubj"))
        meta = {
            "feature_names": list(self.feature_names),
            "horizon_days": self.horizon_days,
            "reference": self.reference.to_json(),
            "calibration": self.calibration,
        }
        (directory / "churn.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> ChurnModel:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(directory / "model.ubj"))
        booster.set_param({"nthread": THREADS})
        meta = json.loads((directory / "churn.json").read_text())
        return cls(
            booster,
            tuple(meta["feature_names"]),
            drift.Reference.from_json(meta["reference"]),
            int(meta["horizon_days"]),
            list(meta["calibration"]),
        )

    def probabilities(self, matrix: Floats) -> Floats:
        out: Floats = np.asarray(self.booster.inplace_predict(matrix), dtype=np.float32)
        return out

    def contributions(self, matrix: Floats, chunk: int = 20_000) -> Floats:
        """SHAP values in log-odds, one column per feature plus the bias last."""
        import xgboost as xgb

        parts = [
            np.asarray(
                self.booster.predict(
                    xgb.DMatrix(
                        matrix[i : i + chunk],
                        feature_names=list(self.feature_names),
                        nthread=THREADS,
                    ),
                    pred_contribs=True,
                ),
                dtype=np.float32,
            )
            for i in range(0, len(matrix), chunk)
        ]
        if not parts:
            return np.zeros((0, len(self.feature_names) + 1), dtype=np.float32)
        return np.concatenate(parts)


def expected_calibration_error(
    labels: npt.NDArray[Any], scores: Floats, bins: int = 10
) -> tuple[float, list[dict[str, float]]]:
    """ECE over equal-width probability bins, and the reliability table behind it."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    table: list[dict[str, float]] = []
    ece = 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        if count == 0:
            continue
        predicted = float(scores[mask].mean())
        observed = float(labels[mask].mean())
        ece += count / len(scores) * abs(predicted - observed)
        table.append(
            {"mean_predicted": predicted, "observed_rate": observed, "count": float(count)}
        )
    return ece, table


def _scores(
    prefix: str, labels: npt.NDArray[Any], scores: Floats, probabilistic: bool
) -> dict[str, float]:
    from sklearn.metrics import (  # type: ignore[import-untyped]
        average_precision_score,
        brier_score_loss,
        log_loss,
        roc_auc_score,
    )

    out = {
        f"{prefix}roc_auc": float(roc_auc_score(labels, scores)),
        f"{prefix}pr_auc": float(average_precision_score(labels, scores)),
    }
    if probabilistic:
        clipped = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
        out[f"{prefix}brier"] = float(brier_score_loss(labels, clipped))
        out[f"{prefix}log_loss"] = float(log_loss(labels, clipped))
        out[f"{prefix}calibration_ece"] = expected_calibration_error(labels, scores)[0]
    return out


def fit_and_evaluate(
    train_x: Floats,
    train_y: npt.NDArray[Any],
    eval_x: Floats,
    eval_y: npt.NDArray[Any],
    feature_names: tuple[str, ...],
    *,
    seed: int = 7,
    progress: Progress = _quiet,
    recency_column: int | None = 0,
) -> tuple[ChurnModel, Evaluation]:
    """Fits XGBoost (early stopping on a slice of the training snapshot), then scores it
    and the baselines on the evaluation snapshot."""
    import xgboost as xgb
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    rng = np.random.default_rng(seed)
    validation = rng.random(len(train_x)) < 0.15
    progress(0.35, "fitting xgboost")
    params = {**XGB_PARAMS, "seed": seed}
    fit = xgb.DMatrix(train_x[~validation], train_y[~validation], feature_names=list(feature_names))
    held = xgb.DMatrix(train_x[validation], train_y[validation], feature_names=list(feature_names))
    booster = xgb.train(
        params,
        fit,
        num_boost_round=MAX_ROUNDS,
        evals=[(held, "validation")],
        early_stopping_rounds=EARLY_STOPPING_ROUNDS,
        verbose_eval=False,
    )
    # Keep exactly the best iteration: serving and SHAP then use the same trees.
    booster = booster[: booster.best_iteration + 1]
    progress(0.7, "fitting baselines")
    # Logistic regression on at most 200k rows: its score stops moving long before,
    # and lbfgs on 1 M rows would dominate the training time budget.
    sample = rng.permutation(len(train_x))[:200_000]
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    logistic.fit(train_x[sample], train_y[sample])
    progress(0.85, "evaluating")
    model = ChurnModel(booster, feature_names, drift.Reference.fit(train_x, feature_names))
    probabilities = model.probabilities(eval_x)
    metrics = _scores("", eval_y, probabilities, probabilistic=True)
    metrics.update(
        _scores(
            "baseline_logreg_",
            eval_y,
            logistic.predict_proba(eval_x)[:, 1].astype(np.float32),
            probabilistic=True,
        )
    )
    if recency_column is not None:
        metrics.update(
            _scores("baseline_recency_", eval_y, eval_x[:, recency_column], probabilistic=False)
        )
    metrics.update(
        {
            "train_rows": float(len(train_x)),
            "eval_rows": float(len(eval_x)),
            "eval_churn_rate": float(np.mean(eval_y)),
            "boosting_rounds": float(booster.num_boosted_rounds()),
        }
    )
    _, table = expected_calibration_error(eval_y, probabilities)
    model.calibration = table
    return model, Evaluation(metrics, table)


@dataclass(frozen=True, slots=True)
class ChurnTraining:
    model: ChurnModel
    evaluation: Evaluation
    window_start: datetime
    window_end: datetime


def data_end(store: EventStore, tenant_id: str) -> datetime | None:
    """End of the last UTC day with identified-user events (the serving `as_of`)."""
    span = data_span(store, tenant_id)
    if span.last is None:
        return None
    midnight = span.last.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight + timedelta(days=1)


def train_churn(
    store: EventStore,
    tenant_id: str,
    *,
    horizon_days: int = CHURN_HORIZON_DAYS,
    seed: int = 7,
    progress: Progress = _quiet,
) -> ChurnTraining:
    """Snapshots, labels, fit and evaluation for one tenant (see the module docstring)."""
    progress(0.02, "checking history")
    span = data_span(store, tenant_id)
    end = data_end(store, tenant_id)
    if span.first is None or end is None:
        raise insufficient_data(
            f"tenant has no events of identified users; churn needs {MIN_USERS}+"
        )
    history_days = (end - span.first).total_seconds() / 86_400
    needed = 2 * horizon_days + 14
    if history_days < needed:
        raise insufficient_data(
            f"churn needs at least {needed} days of history (two {horizon_days}-day "
            f"label windows and two weeks of features); the tenant has {history_days:.0f}"
        )
    train_cutoff = end - timedelta(days=2 * horizon_days)
    eval_cutoff = end - timedelta(days=horizon_days)
    progress(0.1, "building training snapshot")
    train = build_features(store, tenant_id, train_cutoff)
    train_y = churn_labels(store, tenant_id, train, horizon_days)
    progress(0.2, "building evaluation snapshot")
    held_out = build_features(store, tenant_id, eval_cutoff)
    eval_y = churn_labels(store, tenant_id, held_out, horizon_days)
    for name, frame, labels in (("training", train, train_y), ("evaluation", held_out, eval_y)):
        positives = int(labels.sum())
        if len(frame) < MIN_USERS or min(positives, len(frame) - positives) < MIN_CLASS:
            raise insufficient_data(
                f"the {name} snapshot at {frame.cutoff:%Y-%m-%d} has {len(frame)} active users "
                f"({positives} churned); churn needs {MIN_USERS}+ users and {MIN_CLASS}+ of "
                "each outcome"
            )
    model, evaluation = fit_and_evaluate(
        train.matrix, train_y, held_out.matrix, eval_y, FEATURE_NAMES, seed=seed, progress=progress
    )
    model.horizon_days = horizon_days
    return ChurnTraining(model, evaluation, train_cutoff - timedelta(days=LOOKBACK_DAYS), end)


@dataclass(frozen=True, slots=True)
class ScoredUser:
    user_id: str
    churn_probability: float
    top_features: list[tuple[str, float]]


@dataclass
class ScoredSnapshot:
    """Probabilities and top SHAP contributions of every user of one snapshot."""

    frame: FeatureFrame
    probabilities: Floats
    top_index: npt.NDArray[np.int16]  # (users, TOP_FEATURES) feature positions
    top_value: Floats  # (users, TOP_FEATURES) contributions in log-odds
    positions: dict[str, int]
    built_at: datetime

    @classmethod
    def score(cls, model: ChurnModel, frame: FeatureFrame, built_at: datetime) -> ScoredSnapshot:
        if frame.feature_names != model.feature_names:
            raise feature_schema_mismatch(model.feature_names, frame.feature_names)
        probabilities = model.probabilities(frame.matrix)
        contributions = model.contributions(frame.matrix)[:, :-1]  # drop the bias column
        k = min(TOP_FEATURES, contributions.shape[1])
        order = np.argsort(-np.abs(contributions), axis=1)[:, :k].astype(np.int16)
        values = np.take_along_axis(contributions, order.astype(np.int64), axis=1)
        positions = {user: i for i, user in enumerate(frame.user_ids.tolist())}
        return cls(frame, probabilities, order, values, positions, built_at)

    def lookup(self, user_ids: list[str]) -> tuple[list[ScoredUser], list[int]]:
        """Scores in request order, and the request positions of users not in it."""
        found: list[ScoredUser] = []
        missing: list[int] = []
        names = self.frame.feature_names
        for i, user_id in enumerate(user_ids):
            row = self.positions.get(user_id)
            if row is None:
                missing.append(i)
                continue
            top = [
                (names[int(j)], float(v))
                for j, v in zip(self.top_index[row], self.top_value[row], strict=True)
            ]
            found.append(ScoredUser(user_id, float(self.probabilities[row]), top))
        return found, missing
