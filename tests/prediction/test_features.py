"""The feature pipeline against values worked out by hand, and the time split's promise:
nothing at or after the cutoff reaches the features."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from services.events.model import EventSource, TrackedEvent, TrackedEventType
from services.prediction.features import FEATURE_NAMES, build_features, churn_labels
from services.storage.event_store import DuckDBEventStore

pytestmark = pytest.mark.integration

CUTOFF = datetime(2026, 3, 1, tzinfo=UTC)  # a Sunday midnight


def ev(n: int, user: str, ago: timedelta, **kw: object) -> TrackedEvent:
    at = CUTOFF - ago
    fields: dict[str, object] = {
        "tenant_id": "t",
        "event_id": f"e{n}",
        "event_type": TrackedEventType.PAGE_VIEW,
        "event_name": "page_view",
        "occurred_at": at,
        "received_at": at,
        "user_id": user,
        **kw,
    }
    return TrackedEvent(**fields)  # type: ignore[arg-type]


def test_features_match_hand_computed_values(tmp_path: Path) -> None:
    day = timedelta(days=1)
    events = [
        # u1: two sessions 2 and 40 days ago, one purchase, one mobile event.
        ev(1, "u1", 2 * day, session_id="s1"),
        ev(
            2,
            "u1",
            2 * day - timedelta(minutes=10),
            session_id="s1",
            event_type=TrackedEventType.CONVERSION,
            event_name="ticket_purchased",
            revenue=Decimal("50"),
            currency="EUR",
            quantity=2,
            ticketed_event_id="c1",
        ),
        ev(3, "u1", 40 * day, session_id="s2", source=EventSource.MOBILE),
        # u2: one event 45 days ago only -> outside the 30-day active population.
        ev(4, "u2", 45 * day, session_id="s3"),
        # Other tenant and after-cutoff events must not count.
        ev(5, "u1", -day, session_id="s9"),
        TrackedEvent(
            "other",
            "e6",
            TrackedEventType.PAGE_VIEW,
            "page_view",
            CUTOFF - day,
            CUTOFF - day,
            user_id="u1",
        ),
        # u3 comes back after the cutoff: not churned.
        ev(7, "u3", 10 * day, session_id="s4"),
        ev(8, "u3", -3 * day, session_id="s5"),
    ]
    with DuckDBEventStore(tmp_path / "e.duckdb") as store:
        store.append(events)
        frame = build_features(store, "t", CUTOFF)
        assert frame.user_ids.tolist() == ["u1", "u3"]
        row = dict(zip(FEATURE_NAMES, frame.matrix[0].tolist(), strict=True))
        assert row["days_since_last_event"] == pytest.approx(2 - 10 / 1440, abs=1e-4)
        assert row["days_since_last_purchase"] == pytest.approx(2 - 10 / 1440, abs=1e-4)
        assert row["days_since_first_event"] == pytest.approx(40)
        assert (row["events_7d"], row["events_30d"], row["events_90d"]) == (2, 2, 3)
        assert (row["active_days_7d"], row["active_days_90d"]) == (1, 2)
        assert (row["sessions_30d"], row["sessions_90d"]) == (1, 2)
        assert (row["purchases_90d"], row["revenue_90d"], row["tickets_90d"]) == (1, 50, 2)
        assert row["avg_order_value_90d"] == 50
        assert row["events_per_session_90d"] == 1.5
        assert row["mean_session_minutes_90d"] == pytest.approx(5)  # (10 + 0) / 2
        assert row["events_trend_30d"] == pytest.approx(math.log(3 / 2), rel=1e-5)
        assert row["share_mobile"] == pytest.approx(1 / 3)
        assert row["share_conversion"] == pytest.approx(1 / 3)
        assert row["distinct_ticketed_events_90d"] == 1
        assert row["mean_gap_days"] == pytest.approx((40 - (2 - 10 / 1440)) / 1, rel=1e-5)
        labels = churn_labels(store, "t", frame, 30)
        assert labels.tolist() == [0, 0]  # u1 and u3 both act in the following 30 days
        later = build_features(store, "t", CUTOFF + timedelta(days=20))
        assert np.all(later.matrix[:, 0] >= 0)
        assert churn_labels(store, "t", later, 30).tolist() == [1, 1]
