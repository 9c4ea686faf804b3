"""Streaming anomaly detection on metric series, and its evaluation on labelled data.

`SeasonalDetector` sees one value at a time (no look-ahead) and keeps a bounded
history, so it runs on live metrics as they close:
- expected value = median of the values one, two, ... `seasons` periods ago (the same
  hour of past days, say), plus the median of the last `level_window` residuals so a
  slow trend does not read as an anomaly. Medians, not means: one past outlier does
  not move the expectation;
- scale = 1.4826 x the median absolute residual over the last `scale_window` points
  (a robust standard deviation), floored so a flat series does not divide by zero.
  A detector of counts (`counts=True`: events, tickets, users per hour) is floored at
  the Poisson standard deviation sqrt(max(expected, 1)) too: a phase that was always
  zero (the night of a small organizer) has no spread to measure, and one event in it
  is noise, not a critical anomaly;
- score = |observed - expected| / scale; an anomaly when score > `threshold`,
  `critical` severity past twice the threshold; the expected range is
  expected ± threshold x scale;
- an anomalous value enters the history clipped to that range, so an outage or spike
  does not become the new normal for the seasons that follow (a lasting level shift
  is still absorbed, through the level term, after about `level_window` points).

Evaluation (`evaluate`): labelled anomalies are index ranges. Consecutive alerts form
one alert episode. An episode that touches a labelled range (or starts within
`tolerance` points after its end) is a true positive; recall counts labelled ranges
hit, precision counts true episodes over all episodes; delay is the steps from a
range's start to its first alert. The baseline is a non-seasonal rolling z-score
(mean and standard deviation of the trailing window, threshold 3).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Series = npt.NDArray[np.float64]


class Severity(enum.StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    period: int = 24
    seasons: int = 4
    threshold: float = 3.5
    scale_window: int = 168
    level_window: int = 12
    critical_factor: float = 2.0

    def to_json(self) -> dict[str, float]:
        return {
            "period": self.period,
            "seasons": self.seasons,
            "threshold": self.threshold,
            "scale_window": self.scale_window,
            "level_window": self.level_window,
            "critical_factor": self.critical_factor,
        }

    @classmethod
    def from_json(cls, value: dict[str, object]) -> DetectorConfig:
        def num(key: str, default: float) -> float:
            raw = value.get(key, default)
            return float(raw) if isinstance(raw, int | float) else default

        return cls(
            period=int(num("period", 24)),
            seasons=int(num("seasons", 4)),
            threshold=num("threshold", 3.5),
            scale_window=int(num("scale_window", 168)),
            level_window=int(num("level_window", 12)),
            critical_factor=num("critical_factor", 2.0),
        )


@dataclass(frozen=True, slots=True)
class Detection:
    observed: float
    expected: float
    lower: float
    upper: float
    score: float
    anomalous: bool
    severity: Severity | None


class SeasonalDetector:
    """One metric's streaming detector (see the module docstring)."""

    def __init__(self, config: DetectorConfig, *, counts: bool = False) -> None:
        self.config = config
        self.counts = counts
        self._history: deque[float] = deque(maxlen=config.period * config.seasons + 1)
        self._residuals: deque[float] = deque(maxlen=config.scale_window)
        self._recent: deque[float] = deque(maxlen=config.level_window)

    @property
    def warm(self) -> bool:
        """Whether a full season of history exists (before that nothing is flagged)."""
        return len(self._history) >= self.config.period and len(self._residuals) >= 8

    def _baseline(self) -> tuple[float, float]:
        """(seasonal median, level offset); their sum is the expected value."""
        p = self.config.period
        history = self._history
        same_phase = [
            history[-k * p] for k in range(1, self.config.seasons + 1) if k * p <= len(history)
        ]
        if not same_phase:
            return (float(np.median(list(history)[-p:])) if history else 0.0), 0.0
        level = float(np.median(self._recent)) if self._recent else 0.0
        return float(np.median(same_phase)), level

    def assess(self, value: float) -> Detection:
        """How `value` compares with the next point's expected range, without taking it
        in (live checks of a partial interval use this; `observe` then takes the final
        value)."""
        return self._assess(value)[0]

    def _assess(self, value: float) -> tuple[Detection, float]:
        base, level = self._baseline()
        expected = base + level
        mad = float(np.median(np.abs(np.asarray(self._residuals)))) if self._residuals else 0.0
        scale = max(1.4826 * mad, 1e-3 * (1 + abs(expected)))
        if self.counts:
            scale = max(scale, float(np.sqrt(max(expected, 1.0))))
        threshold = self.config.threshold
        score = abs(value - expected) / scale
        lower, upper = expected - threshold * scale, expected + threshold * scale
        anomalous = self.warm and score > threshold
        severity = None
        if anomalous:
            critical = score > threshold * self.config.critical_factor
            severity = Severity.CRITICAL if critical else Severity.WARNING
        return Detection(value, expected, lower, upper, score, anomalous, severity), base

    def observe(self, value: float) -> Detection:
        detection, base = self._assess(value)
        kept = min(max(value, detection.lower), detection.upper) if detection.anomalous else value
        self._history.append(kept)
        self._recent.append(kept - base)
        self._residuals.append(kept - detection.expected)
        return detection


class RollingZScore:
    """The naive baseline: trailing mean and standard deviation, no seasonality."""

    def __init__(self, window: int = 168, threshold: float = 3.0) -> None:
        self._values: deque[float] = deque(maxlen=window)
        self.threshold = threshold

    def observe(self, value: float) -> bool:
        flagged = False
        if len(self._values) >= 8:
            mean = float(np.mean(self._values))
            std = float(np.std(self._values)) or 1e-9
            flagged = abs(value - mean) / std > self.threshold
        self._values.append(value)
        return flagged


def detect(series: Iterable[float], config: DetectorConfig) -> npt.NDArray[np.bool_]:
    detector = SeasonalDetector(config)
    return np.asarray([detector.observe(float(v)).anomalous for v in series], dtype=bool)


def detect_baseline(
    series: Iterable[float], window: int = 168, threshold: float = 3.0
) -> npt.NDArray[np.bool_]:
    baseline = RollingZScore(window, threshold)
    return np.asarray([baseline.observe(float(v)) for v in series], dtype=bool)


def calibrate_threshold(normal: Series, config: DetectorConfig, margin: float = 1.2) -> float:
    """A threshold just above every score seen on data known to be normal (no labels
    needed): `margin` x the highest score after warm-up, never below the configured one."""
    detector = SeasonalDetector(config)
    scores = [d.score for d in (detector.observe(float(v)) for v in normal) if detector.warm]
    highest = max(scores[config.period :], default=0.0)
    return max(config.threshold, margin * highest)


def estimate_period(series: Series, candidates: Iterable[int]) -> int:
    """The candidate lag with the highest autocorrelation."""
    y = np.asarray(series, dtype=np.float64)
    y = y - y.mean()
    denominator = float(np.dot(y, y)) or 1.0
    best, best_value = 1, -np.inf
    for lag in candidates:
        if 1 <= lag < len(y) // 2:
            value = float(np.dot(y[:-lag], y[lag:])) / denominator
            if value > best_value:
                best, best_value = lag, value
    return best


# --- evaluation ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelledRange:
    start: int
    end: int  # inclusive


def ranges_from_labels(
    labels: npt.NDArray[np.bool_] | npt.NDArray[np.int64],
) -> list[LabelledRange]:
    out: list[LabelledRange] = []
    start = None
    for i, flag in enumerate(np.asarray(labels).astype(bool)):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append(LabelledRange(start, i - 1))
            start = None
    if start is not None:
        out.append(LabelledRange(start, len(labels) - 1))
    return out


@dataclass(frozen=True, slots=True)
class DetectionScore:
    precision: float
    recall: float
    f1: float
    mean_delay: float  # steps; nan when nothing was detected
    episodes: int
    true_episodes: int
    detected: int
    labelled: int

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}precision": self.precision,
            f"{prefix}recall": self.recall,
            f"{prefix}f1": self.f1,
            f"{prefix}mean_delay_steps": self.mean_delay,
        }


def evaluate(
    flags: npt.NDArray[np.bool_], labelled: list[LabelledRange], tolerance: int = 3, skip: int = 0
) -> DetectionScore:
    """Event-wise precision / recall / delay (see the module docstring).

    `skip`: leading points that served as training history and are not scored."""
    episodes: list[tuple[int, int]] = []
    i = skip
    n = len(flags)
    while i < n:
        if flags[i]:
            j = i
            while j + 1 < n and flags[j + 1]:
                j += 1
            episodes.append((i, j))
            i = j + 1
        else:
            i += 1
    ranges = [r for r in labelled if r.end >= skip]
    true_episodes = sum(
        any(start <= r.end + tolerance and end >= r.start for r in ranges)
        for start, end in episodes
    )
    delays: list[int] = []
    for r in ranges:
        hits = np.flatnonzero(flags[r.start : r.end + tolerance + 1])
        if len(hits):
            delays.append(int(hits[0]))
    precision = true_episodes / len(episodes) if episodes else 0.0
    recall = len(delays) / len(ranges) if ranges else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    mean_delay = float(np.mean(delays)) if delays else float("nan")
    return DetectionScore(
        precision, recall, f1, mean_delay, len(episodes), true_episodes, len(delays), len(ranges)
    )


@dataclass
class Injected:
    series: Series
    ranges: list[LabelledRange] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)


def inject_anomalies(
    series: Series, rng: np.random.Generator, count: int, start: int, min_gap: int = 48
) -> Injected:
    """Copies `series` with spikes, dips and level shifts at known, spaced positions.

    Sizes are relative to the local level and noise, so they are real anomalies for a
    human looking at the chart, not 100x outliers that any rule catches."""
    y = np.asarray(series, dtype=np.float64).copy()
    out = Injected(y)
    spread = float(np.std(np.diff(y))) / np.sqrt(2) or 1.0
    positions: list[int] = []
    attempts = 0
    while len(positions) < count and attempts < 10_000:
        attempts += 1
        p = int(rng.integers(start, len(y) - 30))
        if all(abs(p - q) > min_gap for q in positions):
            positions.append(p)
    kinds: list[Callable[[int], tuple[int, str]]] = []

    def spike(p: int) -> tuple[int, str]:
        length = int(rng.integers(1, 3))
        y[p : p + length] += rng.uniform(5, 8) * spread + 0.3 * abs(y[p : p + length])
        return length, "spike"

    def dip(p: int) -> tuple[int, str]:
        length = int(rng.integers(3, 7))
        y[p : p + length] *= rng.uniform(0.05, 0.35)
        return length, "dip"

    def shift(p: int) -> tuple[int, str]:
        length = int(rng.integers(12, 25))
        y[p : p + length] += rng.uniform(4, 6) * spread + 0.25 * np.abs(y[p : p + length])
        return length, "level_shift"

    kinds = [spike, dip, shift]
    for i, p in enumerate(sorted(positions)):
        length, kind = kinds[i % 3](p)
        out.ranges.append(LabelledRange(p, p + length - 1))
        out.kinds.append(kind)
    return out


def seasonal_counts(rng: np.random.Generator, weeks: int, level: float = 120.0) -> Series:
    """Hourly counts with a daily and a weekly cycle and Poisson noise (test data)."""
    hours = np.arange(weeks * 168)
    daily = 1 + 0.6 * np.sin(2 * np.pi * (hours % 24 - 9) / 24)
    weekly = 1 + 0.25 * np.sin(2 * np.pi * (hours % 168) / 168)
    trend = 1 + 0.1 * hours / len(hours)
    return rng.poisson(level * daily * weekly * trend).astype(np.float64)


# --- calibration of a tenant's detector ------------------------------------------------

WEEK_HOURS = 168


def detector_for(history: Series, threshold: float = 3.5) -> DetectorConfig:
    """The detector's season for an hourly series: a week (168 points, four weeks of
    history) when the week repeats more than the day does (weekend traffic unlike
    weekdays), else a day (24 points, four days)."""
    period = estimate_period(history, (24, WEEK_HOURS))
    return DetectorConfig(period=WEEK_HOURS if period == WEEK_HOURS else 24, threshold=threshold)


def calibrate(
    history: Series,
    thresholds: Iterable[float],
    progress: Callable[[float, str], None] | None = None,
    trials: int = 3,
    seed: int = 7,
) -> tuple[DetectorConfig, dict[str, float]]:
    """The detector for a tenant's hourly series and its evaluation.

    Semi-synthetic labels: the tenant's own series with anomalies injected at known
    places (real labels do not exist for a fresh tenant). The season comes from
    `detector_for`; the threshold with the best mean F1 over `trials` injections wins.
    Metrics: precision, recall, F1, mean delay, and the rolling z-score baseline's."""
    base = detector_for(history)
    warm = 7 * 24
    rng = np.random.default_rng(seed)
    injected = [inject_anomalies(history, rng, 8, start=warm) for _ in range(trials)]
    candidates = list(thresholds)
    best: tuple[float, DetectorConfig, dict[str, float]] | None = None
    for i, threshold in enumerate(candidates):
        if progress:
            progress(0.2 + 0.7 * i / len(candidates), f"scoring threshold {threshold}")
        config = DetectorConfig(period=base.period, seasons=base.seasons, threshold=threshold)
        scores = [evaluate(detect(t.series, config), t.ranges, skip=warm) for t in injected]
        f1 = float(np.mean([s.f1 for s in scores]))
        if best is None or f1 > best[0]:
            best = (
                f1,
                config,
                {
                    "precision": float(np.mean([s.precision for s in scores])),
                    "recall": float(np.mean([s.recall for s in scores])),
                    "f1": f1,
                    "mean_delay_hours": float(np.nanmean([s.mean_delay for s in scores]))
                    if any(s.detected for s in scores)
                    else float("nan"),
                },
            )
    assert best is not None, "no candidate threshold"
    baseline = [evaluate(detect_baseline(t.series), t.ranges, skip=warm) for t in injected]
    metrics = {
        **best[2],
        "baseline_precision": float(np.mean([s.precision for s in baseline])),
        "baseline_recall": float(np.mean([s.recall for s in baseline])),
        "baseline_f1": float(np.mean([s.f1 for s in baseline])),
        "period_hours": float(best[1].period),
        "threshold": best[1].threshold,
    }
    return best[1], metrics
