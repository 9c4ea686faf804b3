"""A/B test results: who saw which variant, who converted after, and whether it matters.

Definitions (the contract of `GetExperimentResults`):
- Exposure: any tracked event in the range whose properties carry `experiment_id` equal
  to the experiment and a non-empty `variant` (e.g. an `experiment_viewed` event the
  SDK sends when it renders the variant). Users are actors as in the metrics
  (`user_id`, else `anonymous_id`); events of no actor are ignored.
- Assignment: a user belongs to the variant of their *first* exposure in the range (ties
  at the same instant: the smaller variant name), so a user who later sees another
  variant (a bug, a cleared cookie) is still counted once.
- Conversion: the user has an event named `conversion_event_name` in the range at or
  after their first exposure. Conversions before the exposure do not count: the
  variant cannot have caused them.
- Control: the first variant by name (the contract's rule); every other variant is
  compared with it.

Statistics, per variant against control (rates p = converted / exposed):
- significance: the two-proportion z-test with the pooled rate, two-sided:
  z = (p_v - p_c) / sqrt(p (1 - p) (1/n_v + 1/n_c)), p-value = 2 Phi(-|z|);
  1.0 when both groups have the same all-or-nothing outcome (no variance).
- uplift: relative, p_v / p_c - 1; its interval is the Katz log interval of the risk
  ratio: exp(ln(p_v/p_c) +- z_(1+c)/2 * sqrt(1/x_v - 1/n_v + 1/x_c - 1/n_c)) - 1, the
  usual interval for a ratio of proportions (asymmetric, as a ratio's should be). A
  zero conversion count gets the Haldane correction (0.5 added to converted and
  exposed counts of both groups) for the interval only. With no control conversion
  the relative uplift is undefined: uplift and bounds are NaN.
Checked against statsmodels' `proportions_ztest` and scipy's `relative_risk` in
tests/aggregation/test_experiments.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

from services.query.metrics import Scope, TimeRange
from services.storage.event_store import TABLE, EventStore

TEST_NAME = "two-proportion z-test (pooled, two-sided); uplift interval: Katz log risk ratio"
DEFAULT_CONFIDENCE = 0.95
_NORMAL = NormalDist()


@dataclass(frozen=True, slots=True)
class VariantCounts:
    variant: str
    exposed_users: int
    converted_users: int


@dataclass(frozen=True, slots=True)
class VariantResult:
    variant: str
    exposed_users: int
    converted_users: int
    conversion_rate: float
    uplift: float  # relative to control; 0 for control, NaN when undefined
    uplift_lower: float
    uplift_upper: float
    p_value: float  # 1.0 for control


@dataclass(frozen=True, slots=True)
class ExperimentResults:
    variants: tuple[VariantResult, ...]  # control first
    test_name: str = TEST_NAME


def variant_counts(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    experiment_id: str,
    conversion_event_name: str,
) -> tuple[VariantCounts, ...]:
    """Exposed and converted users per variant, by name (see the module docstring)."""
    params: dict[str, object] = {
        "start": time_range.start,
        "end": time_range.end,
        "experiment_id": experiment_id,
        "conversion": conversion_event_name,
    }
    tenant = ""
    if scope.tenant_id is not None:
        tenant = "tenant_id = $tenant_id AND "
        params["tenant_id"] = scope.tenant_id
    window = f"{tenant}occurred_at >= $start AND occurred_at < $end AND actor_key IS NOT NULL"
    # Users are tenant scoped, so (tenant_id, actor_key) is the user across tenants.
    sql = f"""
        WITH exposures AS (
          SELECT tenant_id, actor_key, min(occurred_at) AS first_seen,
                 first(variant ORDER BY occurred_at, variant) AS variant
          FROM (
            SELECT tenant_id, actor_key, occurred_at,
                   properties_json->>'variant' AS variant
            FROM {TABLE}
            WHERE {window} AND properties_json->>'experiment_id' = $experiment_id
          )
          WHERE coalesce(variant, '') <> ''
          GROUP BY tenant_id, actor_key
        ),
        conversions AS (
          SELECT tenant_id, actor_key, max(occurred_at) AS last_conversion
          FROM {TABLE} WHERE {window} AND event_name = $conversion
          GROUP BY tenant_id, actor_key
        )
        SELECT e.variant, count(*) AS exposed,
               count(*) FILTER (WHERE c.last_conversion >= e.first_seen) AS converted
        FROM exposures e LEFT JOIN conversions c USING (tenant_id, actor_key)
        GROUP BY e.variant ORDER BY e.variant
    """
    return tuple(
        VariantCounts(str(row["variant"]), int(row["exposed"]), int(row["converted"]))
        for row in store.read(sql, params).to_pylist()
    )


def two_proportion_z_test(x1: int, n1: int, x2: int, n2: int) -> float:
    """Two-sided p-value of H0: p1 == p2, with the pooled standard error."""
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:
        return 1.0
    z = (x1 / n1 - x2 / n2) / math.sqrt(variance)
    # cdf(-|z|) rather than 1 - cdf(|z|): no cancellation for tiny p-values.
    return 2 * _NORMAL.cdf(-abs(z))


def relative_uplift_interval(
    x_variant: int, n_variant: int, x_control: int, n_control: int, confidence: float
) -> tuple[float, float, float]:
    """(uplift, lower, upper) of p_variant / p_control - 1 (Katz log interval)."""
    if x_control == 0:
        return math.nan, math.nan, math.nan
    uplift = (x_variant / n_variant) / (x_control / n_control) - 1
    xv, nv, xc, nc = float(x_variant), float(n_variant), float(x_control), float(n_control)
    if x_variant == 0:
        xv, nv, xc, nc = xv + 0.5, nv + 0.5, xc + 0.5, nc + 0.5
    log_ratio = math.log((xv / nv) / (xc / nc))
    se = math.sqrt(max(1 / xv - 1 / nv + 1 / xc - 1 / nc, 0.0))
    z = _NORMAL.inv_cdf((1 + confidence) / 2)
    return uplift, math.exp(log_ratio - z * se) - 1, math.exp(log_ratio + z * se) - 1


def analyze(counts: Sequence[VariantCounts], confidence: float = 0.0) -> ExperimentResults:
    """Rates, uplifts with intervals and p-values against the first variant by name."""
    level = confidence or DEFAULT_CONFIDENCE
    if not 0 < level < 1:
        raise ValueError("confidence must be in (0, 1)")
    ordered = sorted(counts, key=lambda c: c.variant)
    if not ordered:
        return ExperimentResults(())
    control = ordered[0]
    results = [
        VariantResult(
            control.variant,
            control.exposed_users,
            control.converted_users,
            control.converted_users / control.exposed_users,
            0.0,
            0.0,
            0.0,
            1.0,
        )
    ]
    for variant in ordered[1:]:
        uplift, lower, upper = relative_uplift_interval(
            variant.converted_users,
            variant.exposed_users,
            control.converted_users,
            control.exposed_users,
            level,
        )
        results.append(
            VariantResult(
                variant.variant,
                variant.exposed_users,
                variant.converted_users,
                variant.converted_users / variant.exposed_users,
                uplift,
                lower,
                upper,
                two_proportion_z_test(
                    variant.converted_users,
                    variant.exposed_users,
                    control.converted_users,
                    control.exposed_users,
                ),
            )
        )
    return ExperimentResults(tuple(results))
