"""Benchmarks and evaluation of the prediction models (results: docs/benchmarks-prediction.md).

    python -m services.prediction.bench [--users 1000000] [--skip-store] [--json out.json]

Parts:
1. churn training at scale: 1 M users x 50 features (the 33 pipeline features plus 17
   noise columns, drawn so churn depends on recency, frequency, trends and an
   interaction), time-split train/eval snapshots of 1 M rows each; wall time of
   `fit_and_evaluate` (XGBoost with early stopping, logistic regression baseline,
   metrics);
2. serving latency: one user and 10,000 users through `PredictionService.predict_churn`
   on a snapshot of 100,000 users (median of repeats), plus the raw model costs
   behind it (probabilities, exact TreeSHAP) and the snapshot build time;
3. the store path: a synthetic tenant in DuckDB, `train_churn` end to end, metrics;
4. forecasts on real series shipped with statsmodels (weekly CO2, yearly sunspots) and
   on the synthetic tenant's daily tickets: MASE / sMAPE of every method vs seasonal
   naive;
5. anomaly detection: injected anomalies (precision, recall, F1, delay) and the public
   UCR/KDD-TSAD series 135, against the rolling z-score baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from services.prediction import anomaly, benchmark_data, forecasting
from services.prediction.churn import ChurnModel, ScoredSnapshot, fit_and_evaluate, train_churn
from services.prediction.features import FEATURE_NAMES, FeatureFrame
from services.prediction.forecasting import SeriesSpec
from services.prediction.registry import ModelKind
from services.prediction.service import PredictionService, PredictionSettings
from services.prediction.synthetic import SyntheticTenant, generate
from services.storage.event_store import DuckDBEventStore

NOISE_FEATURES = 50 - len(FEATURE_NAMES)


def _timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def synthetic_matrix(users: int, seed: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Feature-shaped rows with a known churn rule (recency, frequency, trend, an
    interaction), plus noise columns to reach 50 features."""
    rng = np.random.default_rng(seed)
    rate = rng.lognormal(np.log(0.3), 0.8, users)
    recency = rng.exponential(1 / np.maximum(rate, 0.02)).clip(0, 30)
    events_30 = rng.poisson(rate * 30 * 4)
    trend = rng.normal(0, 0.6, users)
    mobile = rng.beta(2, 3, users)
    buyer = rng.random(users) < 0.4
    logit = (
        -2.0
        + 0.12 * recency
        - 0.02 * events_30
        - 0.9 * trend
        + 1.4 * ((mobile > 0.5) & ~buyer)
        + rng.normal(0, 0.7, users)
    )
    labels = (rng.random(users) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    columns = rng.normal(size=(users, len(FEATURE_NAMES))).astype(np.float32)
    columns[:, 0] = recency
    columns[:, 4] = events_30
    columns[:, 19] = trend
    columns[:, 31] = mobile
    columns[:, 28] = buyer * rng.uniform(0.02, 0.1, users)
    noise = rng.normal(size=(users, NOISE_FEATURES)).astype(np.float32)
    names = (*FEATURE_NAMES, *(f"noise_{i}" for i in range(NOISE_FEATURES)))
    return np.hstack([columns, noise]), labels, names


def bench_training(users: int) -> dict[str, Any]:
    train_x, train_y, names = synthetic_matrix(users, 1)
    eval_x, eval_y, _ = synthetic_matrix(users, 2)
    stages: list[tuple[float, str, float]] = []
    started = time.perf_counter()

    def progress(fraction: float, stage: str) -> None:
        stages.append((fraction, stage, time.perf_counter() - started))
        print(f"  {fraction:4.0%} {stage} ({stages[-1][2]:.1f} s)", flush=True)

    seconds, (model, evaluation) = _timed(
        lambda: fit_and_evaluate(train_x, train_y, eval_x, eval_y, names, progress=progress)
    )
    return {
        "users": users,
        "features": train_x.shape[1],
        "seconds": seconds,
        "stages": stages,
        "metrics": evaluation.metrics,
        "model": model,
        "eval_x": eval_x,
    }


def bench_serving(model: ChurnModel, matrix: np.ndarray) -> dict[str, Any]:
    rows = min(100_000, len(matrix))
    users = np.array([f"u{i}" for i in range(rows)], dtype=object)
    frame = FeatureFrame(
        datetime.now(UTC), users, np.ascontiguousarray(matrix[:rows]), model.feature_names
    )
    build, snapshot = _timed(lambda: ScoredSnapshot.score(model, frame, datetime.now(UTC)))
    one = matrix[:1]
    ten_k = matrix[:10_000]
    # The serving path without the store: the snapshot is what a request reads.
    lookups = {
        "one_user_ms": _timed(lambda: snapshot.lookup(["u42"]), 200)[0] * 1000,
        "ten_thousand_users_ms": _timed(lambda: snapshot.lookup(users[:10_000].tolist()), 20)[0]
        * 1000,
    }
    raw = {
        "probability_one_ms": _timed(lambda: model.probabilities(one), 200)[0] * 1000,
        "probability_10k_ms": _timed(lambda: model.probabilities(ten_k), 10)[0] * 1000,
        "treeshap_one_ms": _timed(lambda: model.contributions(one), 50)[0] * 1000,
        "treeshap_10k_ms": _timed(lambda: model.contributions(ten_k), 2)[0] * 1000,
    }
    return {"snapshot_users": rows, "snapshot_build_s": build, **lookups, **raw}


def bench_store(tmp: Path, users: int) -> dict[str, Any]:
    spec = SyntheticTenant(tenant_id="bench", users=users, days=200, seed=7)
    store = DuckDBEventStore(tmp / "events.duckdb")
    try:
        generated, table = _timed(lambda: generate(spec)[0])
        loaded, _ = _timed(lambda: store.append_table(table))
        trained, result = _timed(lambda: train_churn(store, "bench"))
        settings = PredictionSettings(
            retrain_interval_hours=0,
            schedule_start_delay_seconds=0,
            anomaly_interval_seconds=0,
            snapshot_ttl_seconds=3600,
        )
        service = PredictionService(store, tmp, settings=settings, today=lambda: spec.end.date())
        record = asyncio.run(service.train("bench", ModelKind.CHURN))
        snapshot_s, (_, snapshot) = _timed(lambda: service.churn_snapshot("bench"))
        ids = [str(u) for u in snapshot.frame.user_ids]
        one = _timed(lambda: service.predict_churn("bench", ids[:1]), 200)[0] * 1000
        many = _timed(lambda: service.predict_churn("bench", ids[:10_000]), 20)[0] * 1000
        forecast_record = asyncio.run(service.train("bench", ModelKind.DEMAND_FORECAST))
        forecast_s, _ = _timed(lambda: service.forecast("bench", "tickets", "", 28, 0.9), 3)
        asyncio.run(service.aclose())
        return {
            "events": table.num_rows,
            "generate_s": generated,
            "append_s": loaded,
            "train_churn_s": trained,
            "churn_metrics": result.evaluation.metrics,
            "churn_calibration": result.evaluation.calibration,
            "promoted": record.state.value,
            "snapshot_users": len(ids),
            "snapshot_build_s": snapshot_s,
            "predict_one_ms": one,
            "predict_10k_ms": many if len(ids) >= 10_000 else None,
            "predict_users_in_10k_call": min(10_000, len(ids)),
            "tickets_forecast_metrics": forecast_record.metrics,
            "forecast_request_s": forecast_s,
        }
    finally:
        store.close()


def bench_forecasts() -> dict[str, Any]:
    from statsmodels.datasets import co2, sunspots  # type: ignore[import-untyped]

    weekly = co2.load_pandas().data["co2"].interpolate().bfill().to_numpy()
    yearly = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    out = {}
    for name, y, spec, horizon, folds in (
        ("co2_weekly_h52", weekly, SeriesSpec(52, None), 52, 3),
        ("sunspots_yearly_h11", yearly, SeriesSpec(11, None), 11, 5),
        ("sunspots_yearly_h4", yearly, SeriesSpec(11, None), 4, 5),
    ):
        started = time.perf_counter()
        result = forecasting.backtest(y, spec, horizon, folds)
        seconds = time.perf_counter() - started
        out[name] = {"chosen": result.chosen.value, "seconds": seconds, **result.metrics()}
    return out


def bench_anomalies() -> dict[str, Any]:
    rng = np.random.default_rng(11)
    warm = 14 * 24
    ours, base = [], []
    for _ in range(10):
        injected = anomaly.inject_anomalies(anomaly.seasonal_counts(rng, 8), rng, 12, start=warm)
        ours.append(
            anomaly.evaluate(
                anomaly.detect(injected.series, anomaly.DetectorConfig()),
                injected.ranges,
                skip=warm,
            )
        )
        base.append(
            anomaly.evaluate(anomaly.detect_baseline(injected.series), injected.ranges, skip=warm)
        )

    def mean(scores: list[anomaly.DetectionScore]) -> dict[str, float]:
        return {
            "precision": float(np.mean([s.precision for s in scores])),
            "recall": float(np.mean([s.recall for s in scores])),
            "f1": float(np.mean([s.f1 for s in scores])),
            "mean_delay_steps": float(np.nanmean([s.mean_delay for s in scores])),
            "labelled": float(sum(s.labelled for s in scores)),
        }

    values, labels, train_length = benchmark_data.ucr_135()
    period = anomaly.estimate_period(values[:train_length], range(20, 400))
    config = anomaly.DetectorConfig(
        period=period, seasons=3, scale_window=2 * period, level_window=3
    )
    threshold = anomaly.calibrate_threshold(values[:train_length], config)
    config = anomaly.DetectorConfig(
        period=period, seasons=3, threshold=threshold, scale_window=2 * period, level_window=3
    )
    ranges = anomaly.ranges_from_labels(labels)
    ucr = anomaly.evaluate(
        anomaly.detect(values, config), ranges, tolerance=period, skip=train_length
    )
    ucr_base = anomaly.evaluate(
        anomaly.detect_baseline(values, window=2 * period),
        ranges,
        tolerance=period,
        skip=train_length,
    )
    detector = anomaly.SeasonalDetector(anomaly.DetectorConfig())
    series = anomaly.seasonal_counts(rng, 4)
    per_point_us = (
        _timed(lambda: [detector.observe(float(v)) for v in series])[0] / len(series) * 1e6
    )
    return {
        "injected_seasonal_hourly": {"detector": mean(ours), "baseline": mean(base)},
        "ucr_kdd_tsad_135": {
            "period": period,
            "threshold": threshold,
            "detector": ucr.as_metrics() | {"episodes": ucr.episodes},
            "baseline": ucr_base.as_metrics() | {"episodes": ucr_base.episodes},
        },
        "observe_us_per_point": per_point_us,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=1_000_000, help="rows of the training bench")
    parser.add_argument("--store-users", type=int, default=40_000, help="users of the store bench")
    parser.add_argument("--skip-store", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    }
    print(f"churn training: {args.users:,} users x 50 features", flush=True)
    training = bench_training(args.users)
    model, eval_x = training.pop("model"), training.pop("eval_x")
    results["churn_training"] = training
    print(json.dumps(training["metrics"], indent=1), flush=True)
    print(f"churn training took {training['seconds']:.1f} s", flush=True)
    results["churn_serving"] = bench_serving(model, eval_x)
    print(json.dumps(results["churn_serving"], indent=1), flush=True)
    if not args.skip_store:
        with tempfile.TemporaryDirectory() as tmp:
            results["store"] = bench_store(Path(tmp), args.store_users)
            print(json.dumps(results["store"], indent=1, default=str), flush=True)
    results["forecasts"] = bench_forecasts()
    print(json.dumps(results["forecasts"], indent=1), flush=True)
    results["anomalies"] = bench_anomalies()
    print(json.dumps(results["anomalies"], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
