"""Forecasting methods and backtests, on real series shipped with statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.datasets import co2, sunspots  # type: ignore[import-untyped]

from services.prediction import forecasting
from services.prediction.forecasting import Method, SeriesSpec

pytestmark = pytest.mark.unit


def monthly_co2() -> np.ndarray:
    weekly = co2.load_pandas().data["co2"]
    return weekly.resample("MS").mean().interpolate().to_numpy()


def test_backtest_picks_a_method_that_beats_seasonal_naive_on_co2() -> None:
    result = forecasting.backtest(monthly_co2(), SeriesSpec(period=12), horizon=12, folds=3)
    metrics = result.metrics()
    assert result.chosen is not Method.SEASONAL_NAIVE
    # Mauna Loa CO2 has a trend the seasonal naive forecast ignores.
    assert metrics["mase"] < 0.6 * metrics["baseline_mase"]
    assert metrics["smape"] < metrics["baseline_smape"]


def test_selection_never_does_worse_than_the_baseline_on_sunspots() -> None:
    yearly = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    result = forecasting.backtest(yearly, SeriesSpec(period=11), horizon=4, folds=4)
    assert result.scores[result.chosen].mase <= result.scores[Method.SEASONAL_NAIVE].mase


def test_seasonal_naive_repeats_the_last_season() -> None:
    y = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=float)
    out = forecasting.seasonal_naive(y, 5, SeriesSpec(period=3))
    assert out.tolist() == [8, 9, 10, 8, 9]


def test_intervals_widen_with_the_horizon() -> None:
    widths = [1.0, 1.5, 2.0]
    assert forecasting.interval_width(widths, 1) == 1.5
    assert forecasting.interval_width(widths, 11) == pytest.approx(2.0 * 2)


def test_mase_scale_of_a_flat_series_is_not_zero() -> None:
    assert forecasting.mase_scale(np.full(30, 5.0), SeriesSpec(period=7)) == 5.0
