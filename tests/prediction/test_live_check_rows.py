"""The live anomaly check's vectorised `observe_rows` against its per-row rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.prediction.alerts import LiveAnomalyCheck

pytestmark = pytest.mark.unit

START = datetime(2026, 11, 28, 9, tzinfo=UTC)

_row = st.tuples(
    st.sampled_from(["t1", "t2", "t3"]),
    st.integers(0, 3 * 3600 - 1),  # seconds after START: three hours
    st.sampled_from(["page_view", "conversion", "track"]),
    st.integers(0, 5),
    st.sampled_from(["", "u1", "u2"]),
    st.sampled_from(["", "a1", "a2"]),
)


def _table(rows: list[tuple[str, int, str, int, str, str]]) -> pa.Table:
    return pa.table(
        {
            "tenant_id": pa.array([r[0] for r in rows], pa.string()),
            "occurred_at": pa.array(
                [START + timedelta(seconds=r[1]) for r in rows], pa.timestamp("us", tz="UTC")
            ),
            "event_type": pa.array([r[2] for r in rows], pa.string()),
            "quantity": pa.array([r[3] for r in rows], pa.int32()),
            "user_id": pa.array([r[4] for r in rows], pa.string()),
            "anonymous_id": pa.array([r[5] for r in rows], pa.string()),
        }
    )


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(_row, max_size=30), min_size=1, max_size=4))
def test_batches_count_as_the_per_row_rule_does(
    batches: list[list[tuple[str, int, str, int, str, str]]],
) -> None:
    vectorised = LiveAnomalyCheck(cast(Any, None))
    per_row = LiveAnomalyCheck(cast(Any, None))
    for rows in batches:
        vectorised.observe_rows(_table(rows))
        for tenant, seconds, kind, quantity, user, anonymous in rows:
            conversion = kind == "conversion"
            per_row._note(
                tenant,
                START + timedelta(seconds=seconds),
                1.0 if conversion else 0.0,
                float(quantity) if conversion else 0.0,
                f"u:{user}" if user else f"a:{anonymous}",
            )
    for tenant in ("t1", "t2", "t3"):
        assert vectorised.open_hour(tenant) == per_row.open_hour(tenant)
