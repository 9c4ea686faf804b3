"""Input drift: how far serving features have moved from the training distribution.

Measured with the population stability index per feature,
PSI = sum over bins of (p_serving - p_training) * ln(p_serving / p_training),
over the training deciles of each feature (ties merged, so a feature that is mostly 0
gets fewer bins). Common reading: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 a
shift worth retraining for (`DRIFT_ALERT_PSI`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

DRIFT_ALERT_PSI = 0.25
_EPSILON = 1e-4  # keeps empty bins from giving infinite PSI


@dataclass(frozen=True, slots=True)
class Reference:
    """Per feature: inner bin edges and the training share of each bin."""

    feature_names: tuple[str, ...]
    edges: list[list[float]]
    shares: list[list[float]]

    @classmethod
    def fit(
        cls, matrix: npt.NDArray[np.float32], feature_names: tuple[str, ...], bins: int = 10
    ) -> Reference:
        edges: list[list[float]] = []
        shares: list[list[float]] = []
        sample = matrix[:: max(1, len(matrix) // 200_000)]
        for j in range(matrix.shape[1]):
            column = sample[:, j]
            inner = np.unique(np.quantile(column, np.linspace(0, 1, bins + 1)[1:-1]))
            edges.append(inner.tolist())
            shares.append(_shares(column, inner).tolist())
        return cls(feature_names, edges, shares)

    def psi(self, matrix: npt.NDArray[np.float32]) -> dict[str, float]:
        out: dict[str, float] = {}
        for j, name in enumerate(self.feature_names):
            expected = np.asarray(self.shares[j])
            actual = _shares(matrix[:, j], np.asarray(self.edges[j]))
            e = np.maximum(expected, _EPSILON)
            a = np.maximum(actual, _EPSILON)
            out[name] = float(np.sum((a - e) * np.log(a / e)))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "feature_names": list(self.feature_names),
            "edges": self.edges,
            "shares": self.shares,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Reference:
        return cls(tuple(value["feature_names"]), value["edges"], value["shares"])


def _shares(
    column: npt.NDArray[np.float32], inner_edges: npt.NDArray[Any]
) -> npt.NDArray[np.float64]:
    if len(column) == 0:
        return np.zeros(len(inner_edges) + 1)
    counts = np.bincount(
        np.searchsorted(inner_edges, column, side="right"), minlength=len(inner_edges) + 1
    )
    return counts / len(column)


def summary(psi: dict[str, float]) -> dict[str, float]:
    """The figures reported with a model: the worst feature and how many drifted."""
    if not psi:
        return {}
    worst = max(psi.values())
    return {
        "drift_psi_max": worst,
        "drift_features_over_alert": float(sum(v > DRIFT_ALERT_PSI for v in psi.values())),
        **{f"drift_psi.{name}": value for name, value in psi.items() if value > 0.1},
    }
