"""Forecasting methods, rolling-origin backtests and prediction intervals.

Series-agnostic (plain numpy arrays with a `SeriesSpec`), so the same code forecasts a
tenant's daily tickets and the real series shipped with statsmodels (weekly CO2,
yearly sunspots) that check it against data no one here generated.

Methods (all refit from scratch on the history they are given):
- `seasonal_naive`: the value one season ago; the baseline every method must beat.
- `ets`: Holt-Winters exponential smoothing (statsmodels), additive damped trend and
  additive seasonality of `period`.
- `sarimax`: ARIMA(1,1,1) or AR(3) with a constant (lower AIC wins), with Fourier
  terms for the seasonality (dynamic harmonic regression): 3 harmonics of `period`,
  plus 4 of `long_period` (the year of a daily series) once two full long periods of
  history exist.
- `gbm_lags`: XGBoost on lags (1..period, then 2-4 seasons back), a rolling mean and
  calendar terms (position in the season, the phase of `long_period`), forecasting
  recursively one step at a time.

Selection: `backtest` runs each method from several origins (`folds`), forecasting
`horizon` steps each time, and scores MASE (mean absolute error over the in-sample
MAE of the seasonal naive forecast; below 1 beats it) and sMAPE (0-200 %). The lowest
mean MASE wins.

Intervals: from the chosen method's backtest errors, scaled by the series' MASE scale
so they transfer to a series of another size (a single ticketed event): for step h the
`level` quantile of |error| / scale over steps within ±3 of h in all folds, made
non-decreasing in h, grown with sqrt(h) past the backtested horizon. Intervals are
clipped at 0 for series that cannot be negative. Empirical coverage is measured on
the last fold with widths learnt from the other folds only.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

Series = npt.NDArray[np.float64]
Progress = Callable[[float, str], None]


class Method(enum.StrEnum):
    SEASONAL_NAIVE = "seasonal_naive"
    ETS = "ets"
    SARIMAX = "sarimax"
    GBM_LAGS = "gbm_lags"


ALL_METHODS = (Method.SEASONAL_NAIVE, Method.ETS, Method.SARIMAX, Method.GBM_LAGS)


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    """Season length in steps, and an optional longer cycle (365.25 for daily data)."""

    period: int
    long_period: float | None = None
    nonnegative: bool = True


def seasonal_naive(y: Series, horizon: int, spec: SeriesSpec) -> Series:
    m = min(spec.period, len(y))
    last = y[-m:]
    return np.asarray([last[h % m] for h in range(horizon)], dtype=np.float64)


def _fourier(t: npt.NDArray[np.float64], period: float, harmonics: int) -> npt.NDArray[np.float64]:
    columns = []
    for k in range(1, harmonics + 1):
        columns += [np.sin(2 * np.pi * k * t / period), np.cos(2 * np.pi * k * t / period)]
    return np.column_stack(columns)


def _exog(t: npt.NDArray[np.float64], spec: SeriesSpec, use_long: bool) -> npt.NDArray[np.float64]:
    parts = [_fourier(t, spec.period, min(3, spec.period // 2))]
    if use_long and spec.long_period:
        parts.append(_fourier(t, spec.long_period, 4))
    return np.column_stack(parts)


def ets(y: Series, horizon: int, spec: SeriesSpec) -> Series:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing  # type: ignore[import-untyped]

    seasonal = "add" if spec.period > 1 and len(y) >= 2 * spec.period else None
    with warnings.catch_warnings():
        # Convergence chatter on short or flat series; the backtest judges the result.
        warnings.simplefilter("ignore")
        fit = ExponentialSmoothing(
            y,
            trend="add",
            damped_trend=True,
            seasonal=seasonal,
            seasonal_periods=spec.period if seasonal else None,
            initialization_method="estimated",
        ).fit()
        return np.asarray(fit.forecast(horizon), dtype=np.float64)


def sarimax(y: Series, horizon: int, spec: SeriesSpec) -> Series:
    from statsmodels.tsa.statespace.sarimax import SARIMAX  # type: ignore[import-untyped]

    use_long = bool(spec.long_period) and len(y) >= 2 * (spec.long_period or 0)
    t = np.arange(len(y) + horizon, dtype=np.float64)
    exog = _exog(t, spec, use_long) if spec.period > 1 or use_long else None
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A small order grid by AIC: integrated for trending series, a stationary AR(3)
        # with a constant for cycles around a level (sunspots, demand around a mean).
        for order, trend in (((1, 1, 1), "n"), ((3, 0, 0), "c")):
            try:
                fit = SARIMAX(
                    y,
                    exog=None if exog is None else exog[: len(y)],
                    order=order,
                    trend=trend,
                    enforce_stationarity=False,
                    enforce_invertibility=False,
                ).fit(disp=False, maxiter=100)
            except (ValueError, np.linalg.LinAlgError):
                continue
            if best is None or fit.aic < best.aic:
                best = fit
    if best is None:
        return seasonal_naive(y, horizon, spec)
    out = best.forecast(horizon, exog=None if exog is None else exog[len(y) :])
    return np.asarray(out, dtype=np.float64)


def _lags(spec: SeriesSpec) -> list[int]:
    m = spec.period
    return sorted({*range(1, m + 1), 2 * m, 3 * m, 4 * m})


def _gbm_row(history: list[float], t: int, spec: SeriesSpec, lags: list[int]) -> list[float]:
    row = [history[-lag] for lag in lags]
    row.append(float(np.mean(history[-spec.period :])))
    row.append(float(np.mean(history[-4 * spec.period :])))
    row.append(float(t % spec.period))
    if spec.long_period:
        phase = 2 * np.pi * t / spec.long_period
        row += [math.sin(phase), math.cos(phase)]
    return row


def gbm_lags(y: Series, horizon: int, spec: SeriesSpec) -> Series:
    # Imported here, like statsmodels above: every process imports this module through
    # `services.mesh`, and only the prediction service ever fits a model (~8 s of CPU).
    import xgboost as xgb

    lags = _lags(spec)
    first = max(lags)
    if len(y) <= first + 10:
        return seasonal_naive(y, horizon, spec)
    values = y.tolist()
    rows = [_gbm_row(values[:t], t, spec, lags) for t in range(first, len(y))]
    model = xgb.XGBRegressor(
        n_estimators=300,
        max_depth=4,
        learning_rate=0.05,
        subsample=0.9,
        min_child_weight=3,
        n_jobs=1,  # a few hundred rows: threads cost more than they save
        random_state=7,
    )
    model.fit(np.asarray(rows, dtype=np.float32), y[first:])
    history = list(values)
    out = []
    for step in range(horizon):
        row = np.asarray([_gbm_row(history, len(history), spec, lags)], dtype=np.float32)
        value = float(model.predict(row)[0])
        if spec.nonnegative:
            value = max(value, 0.0)
        out.append(value)
        history.append(value)
        del step
    return np.asarray(out, dtype=np.float64)


FORECASTERS: dict[Method, Callable[[Series, int, SeriesSpec], Series]] = {
    Method.SEASONAL_NAIVE: seasonal_naive,
    Method.ETS: ets,
    Method.SARIMAX: sarimax,
    Method.GBM_LAGS: gbm_lags,
}


def forecast(method: Method, y: Series, horizon: int, spec: SeriesSpec) -> Series:
    # One BLAS thread: the statsmodels fits multiply tiny matrices, where OpenBLAS
    # threads only contend; with two busy cores a CO2 backtest took 37 s with them and
    # 5.7 s without (measured).
    with threadpool_limits(1, user_api="blas"):
        out = FORECASTERS[method](np.asarray(y, dtype=np.float64), horizon, spec)
    if not np.all(np.isfinite(out)):
        # A diverged fit must not reach a dashboard: fall back to the baseline.
        out = seasonal_naive(y, horizon, spec)
    return np.maximum(out, 0.0) if spec.nonnegative else out


def mase_scale(y: Series, spec: SeriesSpec) -> float:
    """In-sample MAE of the seasonal naive forecast (period 1 if the series is short)."""
    m = spec.period if len(y) > spec.period else 1
    diffs = np.abs(y[m:] - y[:-m])
    scale = float(np.mean(diffs)) if len(diffs) else 0.0
    if scale <= 0:
        # A constant history: fall back to the mean level so errors stay comparable.
        scale = max(float(np.mean(np.abs(y))), 1e-9)
    return scale


def smape(actual: Series, predicted: Series) -> float:
    denominator = np.abs(actual) + np.abs(predicted)
    ratio = np.where(
        denominator > 0,
        2 * np.abs(actual - predicted) / np.where(denominator > 0, denominator, 1),
        0.0,
    )
    return float(100 * np.mean(ratio))


@dataclass
class MethodScore:
    method: Method
    mase: float
    smape: float
    # Per fold: errors / scale, one array of `horizon` steps each.
    scaled_errors: list[Series] = field(default_factory=list)


@dataclass
class Backtest:
    scores: dict[Method, MethodScore]
    chosen: Method
    horizon: int
    folds: int
    interval_widths: list[float]  # per step, in MASE-scale units, at `level`
    level: float
    coverage: float  # empirical, last fold, widths from the other folds

    def metrics(self) -> dict[str, float]:
        best = self.scores[self.chosen]
        base = self.scores[Method.SEASONAL_NAIVE]
        out = {
            "mase": best.mase,
            "smape": best.smape,
            "baseline_mase": base.mase,
            "baseline_smape": base.smape,
            "backtest_horizon_steps": float(self.horizon),
            "backtest_folds": float(self.folds),
            "interval_level": self.level,
            "interval_coverage": self.coverage,
        }
        for method, score in self.scores.items():
            out[f"mase.{method.value}"] = score.mase
            out[f"smape.{method.value}"] = score.smape
        return out


def _widths(errors: list[Series], level: float) -> list[float]:
    if not errors:
        return []
    stacked = np.abs(np.vstack(errors))
    horizon = stacked.shape[1]
    widths = []
    for h in range(horizon):
        window = stacked[:, max(0, h - 3) : min(horizon, h + 4)]
        widths.append(float(np.quantile(window, level)))
    return [float(w) for w in np.maximum.accumulate(np.asarray(widths))]


def interval_width(widths: list[float], step: int) -> float:
    """Width (MASE-scale units) for 0-based `step`, extrapolated past the table."""
    if not widths:
        return 0.0
    if step < len(widths):
        return widths[step]
    return widths[-1] * math.sqrt((step + 1) / len(widths))


def backtest(
    y: Series,
    spec: SeriesSpec,
    horizon: int,
    folds: int = 3,
    methods: tuple[Method, ...] = ALL_METHODS,
    level: float = 0.9,
    progress: Progress | None = None,
) -> Backtest:
    """Rolling-origin evaluation; origins `horizon` apart ending at the series end."""
    y = np.asarray(y, dtype=np.float64)
    scores: dict[Method, MethodScore] = {}
    for i, method in enumerate(methods):
        if progress:
            progress(i / len(methods), f"backtesting {method.value}")
        mases, smapes, scaled = [], [], []
        for fold in range(folds, 0, -1):
            origin = len(y) - fold * horizon
            train, actual = y[:origin], y[origin : origin + horizon]
            predicted = forecast(method, train, horizon, spec)
            scale = mase_scale(train, spec)
            mases.append(float(np.mean(np.abs(actual - predicted))) / scale)
            smapes.append(smape(actual, predicted))
            scaled.append((actual - predicted) / scale)
        scores[method] = MethodScore(method, float(np.mean(mases)), float(np.mean(smapes)), scaled)
    chosen = min(scores.values(), key=lambda s: s.mase).method
    errors = scores[chosen].scaled_errors
    coverage = float("nan")
    if len(errors) >= 2:
        learnt = _widths(errors[:-1], level)
        inside = [abs(e) <= interval_width(learnt, h) for h, e in enumerate(errors[-1])]
        coverage = float(np.mean(inside))
    return Backtest(scores, chosen, horizon, folds, _widths(errors, level), level, coverage)
