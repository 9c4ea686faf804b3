"""A/B results: the statistics against scipy / statsmodels, the SQL against hand counts."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from scipy.stats.contingency import relative_risk
from statsmodels.stats.proportion import proportions_ztest

from services.aggregation import experiments
from services.aggregation.experiments import VariantCounts
from services.events.model import TrackedEvent, TrackedEventType
from services.query.metrics import Scope, TimeRange
from services.storage.event_store import DuckDBEventStore

T0 = datetime(2026, 3, 2, 12, tzinfo=UTC)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("control", "variant", "confidence"),
    [
        ((45, 510), (60, 500), 0.95),
        ((1200, 10_000), (1290, 10_050), 0.99),
        ((3, 40), (9, 41), 0.9),
        ((500, 1000), (480, 1000), 0.95),
    ],
)
def test_statistics_match_scipy_and_statsmodels(
    control: tuple[int, int], variant: tuple[int, int], confidence: float
) -> None:
    result = experiments.analyze(
        [VariantCounts("b", variant[1], variant[0]), VariantCounts("a", control[1], control[0])],
        confidence,
    )
    assert [v.variant for v in result.variants] == ["a", "b"]  # control first, by name
    assert result.test_name.startswith("two-proportion z-test")
    base, tested = result.variants
    assert (base.uplift, base.p_value) == (0.0, 1.0)
    _, p_value = proportions_ztest([variant[0], control[0]], [variant[1], control[1]])
    assert tested.p_value == pytest.approx(float(p_value), rel=1e-9)
    ratio = relative_risk(variant[0], variant[1], control[0], control[1])
    interval = ratio.confidence_interval(confidence_level=confidence)
    assert tested.uplift == pytest.approx(ratio.relative_risk - 1, rel=1e-12)
    assert tested.uplift_lower == pytest.approx(interval.low - 1, rel=1e-9)
    assert tested.uplift_upper == pytest.approx(interval.high - 1, rel=1e-9)
    assert tested.conversion_rate == variant[0] / variant[1]


@pytest.mark.unit
def test_hand_computed_z_test() -> None:
    # p_a = 0.1, p_b = 0.15, n = 1000 each: pooled 0.125, se = sqrt(.125*.875*.002)
    se = math.sqrt(0.125 * 0.875 * 0.002)
    z = 0.05 / se  # 3.3806...
    assert experiments.two_proportion_z_test(150, 1000, 100, 1000) == pytest.approx(
        math.erfc(z / math.sqrt(2)), rel=1e-12
    )


@pytest.mark.unit
def test_degenerate_counts() -> None:
    none_converted = experiments.analyze(
        [VariantCounts("a", 10, 0), VariantCounts("b", 10, 0)]
    ).variants[1]
    assert none_converted.p_value == 1.0
    assert math.isnan(none_converted.uplift)  # relative to a zero rate: undefined
    lost_all = experiments.analyze(
        [VariantCounts("a", 100, 10), VariantCounts("b", 100, 0)]
    ).variants[1]
    assert lost_all.uplift == -1.0
    assert lost_all.uplift_lower < -0.9 and lost_all.uplift_upper < 0  # Haldane-corrected
    assert experiments.analyze([]).variants == ()


def _event(
    user: str, name: str, minutes: int, *, tenant: str = "t1", **properties: object
) -> TrackedEvent:
    return TrackedEvent(
        tenant_id=tenant,
        event_id=f"{tenant}-{user}-{name}-{minutes}",
        event_type=TrackedEventType.CONVERSION
        if name == "ticket_purchased"
        else TrackedEventType.TRACK,
        event_name=name,
        occurred_at=T0 + timedelta(minutes=minutes),
        received_at=T0 + timedelta(minutes=minutes),
        user_id=user,
        quantity=1 if name == "ticket_purchased" else 0,
        properties_json=json.dumps(properties) if properties else "{}",
    )


@pytest.mark.integration
def test_exposure_assignment_and_conversion_after_exposure(tmp_path: Path) -> None:
    expose = "experiment_viewed"
    events = [
        # u1: A, converts after exposure.
        _event("u1", expose, 0, experiment_id="exp1", variant="A"),
        _event("u1", "ticket_purchased", 5),
        # u2: A, converted only *before* exposure: not a conversion of the test.
        _event("u2", "ticket_purchased", 0),
        _event("u2", expose, 10, experiment_id="exp1", variant="A"),
        # u3: B first, later also sees A: stays in B; converts.
        _event("u3", expose, 1, experiment_id="exp1", variant="B"),
        _event("u3", expose, 2, experiment_id="exp1", variant="A"),
        _event("u3", "ticket_purchased", 3),
        _event("u3", "ticket_purchased", 4),  # converts twice: one converted user
        # u4: B, no conversion; another experiment and an empty variant do not count.
        _event("u4", expose, 1, experiment_id="exp1", variant="B"),
        _event("u5", expose, 1, experiment_id="exp2", variant="A"),
        _event("u6", expose, 1, experiment_id="exp1", variant=""),
        # Another tenant's user with the same id and variant.
        _event("u1", expose, 0, tenant="t2", experiment_id="exp1", variant="A"),
        # Outside the range.
        _event("u7", expose, 60 * 24 * 3, experiment_id="exp1", variant="B"),
    ]
    window = TimeRange(T0 - timedelta(hours=1), T0 + timedelta(days=1))
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        store.append(events)
        counts = experiments.variant_counts(
            store, Scope.tenant("t1"), window, "exp1", "ticket_purchased"
        )
        assert counts == (VariantCounts("A", 2, 1), VariantCounts("B", 2, 1))
        everyone = experiments.variant_counts(
            store, Scope.all_tenants(), window, "exp1", "ticket_purchased"
        )
        assert everyone == (VariantCounts("A", 3, 1), VariantCounts("B", 2, 1))
