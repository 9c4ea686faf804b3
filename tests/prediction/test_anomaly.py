"""The streaming detector against labelled anomalies: injected ones with known positions,
and the public UCR/KDD-TSAD 2021 series 135 (one labelled anomaly), each against the
non-seasonal rolling z-score baseline."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from services.prediction import anomaly, benchmark_data
from services.prediction.alerts import ThresholdRule

pytestmark = pytest.mark.unit

WARM = 14 * 24


def test_seasonal_detector_beats_rolling_zscore_on_injected_anomalies() -> None:
    rng = np.random.default_rng(11)
    ours, baseline, delays = [], [], []
    for _ in range(3):
        injected = anomaly.inject_anomalies(anomaly.seasonal_counts(rng, 6), rng, 10, start=WARM)
        flags = anomaly.detect(injected.series, anomaly.DetectorConfig(period=24))
        score = anomaly.evaluate(flags, injected.ranges, skip=WARM)
        base = anomaly.evaluate(
            anomaly.detect_baseline(injected.series), injected.ranges, skip=WARM
        )
        ours.append(score.f1)
        baseline.append(base.f1)
        delays.append(score.mean_delay)
    assert np.mean(ours) > 0.75
    assert np.mean(ours) > np.mean(baseline) + 0.2
    assert np.nanmean(delays) <= 6  # hours from anomaly start to the first alert


def test_detector_finds_the_labelled_anomaly_of_ucr_135() -> None:
    values, labels, train_length = benchmark_data.ucr_135()
    ranges = anomaly.ranges_from_labels(labels)
    period = anomaly.estimate_period(values[:train_length], range(20, 400))
    base_config = anomaly.DetectorConfig(
        period=period, seasons=3, threshold=4.0, scale_window=2 * period, level_window=3
    )
    # Threshold from the anomaly-free training part only: no test label is looked at.
    threshold = anomaly.calibrate_threshold(values[:train_length], base_config)
    config = anomaly.DetectorConfig(
        period=period, seasons=3, threshold=threshold, scale_window=2 * period, level_window=3
    )
    score = anomaly.evaluate(
        anomaly.detect(values, config), ranges, tolerance=period, skip=train_length
    )
    base = anomaly.evaluate(
        anomaly.detect_baseline(values, window=2 * period),
        ranges,
        tolerance=period,
        skip=train_length,
    )
    assert score.recall == 1.0
    assert score.f1 > base.f1


def test_an_outlier_does_not_become_the_new_normal() -> None:
    detector = anomaly.SeasonalDetector(anomaly.DetectorConfig(period=4, seasons=3, threshold=4))
    pattern = [10.0, 20.0, 30.0, 20.0]
    for value in pattern * 6:
        detector.observe(value + 0.1)
    spike = detector.observe(300.0)
    assert spike.anomalous and spike.severity is anomaly.Severity.CRITICAL
    # One season later the same phase is expected near 10, not 300.
    for value in pattern[1:]:
        detector.observe(value)
    assert detector.observe(10.0).expected < 15


def test_threshold_rule_alerts_outside_its_bounds() -> None:
    rule = ThresholdRule("r1", "acme", "tickets_sold", lower=5, upper=None)
    when = datetime(2026, 5, 1, tzinfo=UTC)
    assert rule.check(when, 7, 8) is None
    alert = rule.check(when, 2, 8)
    assert alert is not None
    assert (alert.observed, alert.expected_lower, alert.source) == (2, 5, "threshold")
