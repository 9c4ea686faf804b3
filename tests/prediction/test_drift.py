"""Input drift (PSI) against the training reference."""

from __future__ import annotations

import numpy as np
import pytest

from services.prediction import drift

pytestmark = pytest.mark.unit


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(5)
    train = rng.normal(size=(20_000, 2)).astype(np.float32)
    reference = drift.Reference.fit(train, ("a", "b"))
    same = reference.psi(rng.normal(size=(20_000, 2)).astype(np.float32))
    assert max(same.values()) < 0.01
    shifted = rng.normal(size=(20_000, 2)).astype(np.float32)
    shifted[:, 1] += 1.0
    psi = reference.psi(shifted)
    assert psi["a"] < 0.01 and psi["b"] > drift.DRIFT_ALERT_PSI
    summary = drift.summary(psi)
    assert summary["drift_features_over_alert"] == 1 and "drift_psi.b" in summary


def test_reference_survives_json() -> None:
    reference = drift.Reference.fit(np.arange(100, dtype=np.float32).reshape(50, 2), ("x", "y"))
    again = drift.Reference.from_json(reference.to_json())
    assert again == reference
