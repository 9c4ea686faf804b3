"""Model registry and alert store on real SQLite files."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.platform.errors import AnalyticsError, StatusCode
from services.prediction.alerts import Alert, AlertBus, AlertStore, ThresholdRule
from services.prediction.anomaly import Severity
from services.prediction.registry import ModelKind, ModelRegistry, ModelState

pytestmark = pytest.mark.integration

NOW = datetime(2026, 5, 1, tzinfo=UTC)


def test_registry_lifecycle_and_pages(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "p.sqlite3")
    ids = []
    for i in range(3):
        record = registry.create("t", ModelKind.CHURN, NOW + timedelta(minutes=i))
        registry.report_progress(record.model_id, 0.5, "fitting")
        assert registry.get("t", record.model_id).progress == 0.5  # type: ignore[union-attr]
        registry.complete(
            record.model_id,
            metrics={"roc_auc": 0.8},
            feature_names=("a", "b"),
            config={},
            training_start=NOW - timedelta(days=90),
            training_end=NOW,
        )
        ids.append(record.model_id)
    assert registry.get("other", ids[0]) is None  # tenant isolation
    first, token = registry.page("t", ModelKind.CHURN, 2, "")
    assert [r.model_id for r in first] == ids[:0:-1]  # newest first
    rest, end = registry.page("t", ModelKind.CHURN, 2, token)
    assert [r.model_id for r in rest] == [ids[0]] and end == ""
    with pytest.raises(AnalyticsError) as caught:
        registry.page("other", ModelKind.CHURN, 2, token)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    registry.promote("t", ids[0], NOW)
    registry.promote("t", ids[1], NOW)
    assert registry.get("t", ids[0]).state is ModelState.READY  # type: ignore[union-attr]
    assert registry.promoted("t", ModelKind.CHURN).model_id == ids[1]  # type: ignore[union-attr]
    registry.merge_metrics(ids[1], {"drift_psi_max": 0.3})
    assert registry.get("t", ids[1]).metrics == {"roc_auc": 0.8, "drift_psi_max": 0.3}  # type: ignore[union-attr]
    # A version cut off by a crash is failed on the next open, not left training.
    stuck = registry.create("t", ModelKind.ANOMALY, NOW)
    registry.close()
    reopened = ModelRegistry(tmp_path / "p.sqlite3")
    assert reopened.get("t", stuck.model_id).state is ModelState.FAILED  # type: ignore[union-attr]
    with pytest.raises(AnalyticsError) as caught:
        reopened.promote("t", stuck.model_id, NOW)
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    reopened.close()


def alert(i: int, tenant: str = "t") -> Alert:
    return Alert(
        f"a{i}",
        tenant,
        "event_count",
        NOW + timedelta(hours=i),
        10.0,
        50.0,
        40.0,
        60.0,
        5.0,
        Severity.WARNING,
        "detector",
    )


def test_alert_store_pages_newest_first_and_keeps_rules(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "p.sqlite3")
    store.add([alert(i) for i in range(5)] + [alert(9, "other")])
    page, token = store.page("t", 3, "")
    assert [a.alert_id for a in page] == ["a4", "a3", "a2"]
    rest, end = store.page("t", 3, token)
    assert [a.alert_id for a in rest] == ["a1", "a0"] and end == ""
    store.put_rule(ThresholdRule("r1", "t", "tickets_sold", 5, None, Severity.CRITICAL))
    assert store.rules("t")[0].severity is Severity.CRITICAL
    assert store.rules("other") == []
    assert store.delete_rule("t", "r1") and store.rules("t") == []
    with pytest.raises(ValueError):
        store.put_rule(ThresholdRule("r2", "t", "x", None, None))
    store.close()


async def test_alert_bus_fans_out_per_tenant() -> None:
    bus = AlertBus(queue_size=2)
    received: list[str] = []

    async def read() -> None:
        async for item in bus.subscribe("t"):
            received.append(item.alert_id)
            if len(received) == 2:
                return

    reader = asyncio.create_task(read())
    await asyncio.sleep(0)
    await bus.publish(alert(1, "other"))  # another tenant's alert never arrives
    await bus.publish(alert(2))
    await bus.publish(alert(3))
    await asyncio.wait_for(reader, 2)
    assert received == ["a2", "a3"]
    assert bus.subscriber_count("t") == 0
