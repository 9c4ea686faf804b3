"""PredictionService over real gRPC: the edge (auth, scopes, validation), the servicer,
and the error model, on an in-process server bound to a free port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from bilten.analytics.prediction.v1 import prediction_service_pb2 as pb
from bilten.analytics.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from services.platform.auth import ORGANIZER_ADMIN_SCOPES, Authenticator, Scope, TokenIssuer
from services.platform.server import Registration, start_grpc_server
from services.prediction.alerts import Alert
from services.prediction.anomaly import Severity
from services.prediction.convert import timestamp
from services.prediction.registry import ModelKind, ModelState
from services.prediction.service import PredictionService
from services.prediction.servicer import PredictionServicer
from services.storage.event_store import DuckDBEventStore
from tests.prediction.conftest import STORE_GROUP, TENANT
from tests.prediction.test_service import SETTINGS

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group(STORE_GROUP)]


class _NoKeys:
    def find_api_key(self, key_id: str) -> None:
        return None


@pytest.fixture
async def channel(
    populated_store: DuckDBEventStore, tmp_path: Path
) -> AsyncIterator[tuple[grpc.aio.Channel, TokenIssuer, PredictionService]]:
    tokens = TokenIssuer("test-secret-of-enough-length-0123456789", "iss", "aud")
    service = PredictionService(
        populated_store, tmp_path, settings=SETTINGS, today=lambda: TENANT.end.date()
    )
    servicer = PredictionServicer(populated_store, tmp_path, service=service)
    server, port, _ = await start_grpc_server(
        [
            Registration(
                "bilten.analytics.prediction.v1.PredictionService",
                servicer,
                pb_grpc.add_PredictionServiceServicer_to_server,
            )
        ],
        Authenticator(tokens, _NoKeys(), "pepper"),
        "127.0.0.1",
        0,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan, tokens, service
    await server.stop(0)
    await service.aclose()


def auth(
    tokens: TokenIssuer, scopes: frozenset[str] = ORGANIZER_ADMIN_SCOPES
) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {tokens.issue('dev', TENANT.tenant_id, scopes)}")]


async def test_train_poll_promote_predict_over_grpc(
    channel: tuple[grpc.aio.Channel, TokenIssuer, PredictionService],
) -> None:
    chan, tokens, service = channel
    stub = pb_grpc.PredictionServiceStub(chan)
    md = auth(tokens)
    started = await stub.TrainModel(pb.TrainModelRequest(kind=pb.MODEL_KIND_CHURN), metadata=md)
    assert started.model.state == pb.MODEL_STATE_TRAINING
    model_id = started.model.model_id
    # Training runs in the background; on a loaded 2-core box it can take minutes.
    deadline = time.monotonic() + 300
    while True:
        got = await stub.GetModel(pb.GetModelRequest(model_id=model_id), metadata=md)
        # READY comes first, then the automatic promotion of a first version that beats
        # its baseline: a poll can land between the two.
        done = got.model.state not in (pb.MODEL_STATE_TRAINING, pb.MODEL_STATE_READY)
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert got.model.state == pb.MODEL_STATE_PROMOTED
    assert got.model.metrics["roc_auc"] > got.model.metrics["baseline_recency_roc_auc"]
    # The lifecycle fields: progress reached 1, a stage is named, nothing failed.
    assert got.model.training_progress == 1.0
    assert got.model.training_stage and got.model.failure_message == ""
    listed = await stub.ListModels(pb.ListModelsRequest(kind=pb.MODEL_KIND_CHURN), metadata=md)
    assert [m.model_id for m in listed.models] == [model_id]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.PredictChurn(pb.PredictChurnRequest(user_ids=["nobody"]), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody" in (caught.value.details() or "")

    _, snapshot = await asyncio.to_thread(service.churn_snapshot, TENANT.tenant_id)
    users = [str(u) for u in snapshot.frame.user_ids[:3]]
    response = await stub.PredictChurn(pb.PredictChurnRequest(user_ids=users), metadata=md)
    assert [p.user_id for p in response.predictions] == users
    assert response.model_id == model_id
    assert len(response.predictions[0].top_features) == 5


async def test_errors_at_the_edge(
    channel: tuple[grpc.aio.Channel, TokenIssuer, PredictionService],
) -> None:
    chan, tokens, _ = channel
    stub = pb_grpc.PredictionServiceStub(chan)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.TrainModel(
            pb.TrainModelRequest(kind=pb.MODEL_KIND_CHURN),
            metadata=auth(tokens, frozenset({Scope.PREDICTIONS_READ})),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Forecast(
            pb.ForecastRequest(target=pb.FORECAST_TARGET_TICKETS, horizon_days=400),
            metadata=auth(tokens),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # contract: 1-365
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.PredictChurn(pb.PredictChurnRequest(), metadata=auth(tokens))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModel(pb.GetModelRequest(model_id="churn-nope"), metadata=auth(tokens))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    anomalies = await stub.ListAnomalies(pb.ListAnomaliesRequest(), metadata=auth(tokens))
    assert anomalies.next_page_token == ""


async def test_stored_anomalies_are_listed_with_severity_source_and_rule(
    channel: tuple[grpc.aio.Channel, TokenIssuer, PredictionService],
) -> None:
    chan, tokens, service = channel
    stub = pb_grpc.PredictionServiceStub(chan)
    hour = datetime(2026, 11, 20, 14, tzinfo=UTC)
    detector = Alert(
        "a-detector", TENANT.tenant_id, "event_count", hour, 900.0, 120.0, 60.0, 180.0,
        19.5, Severity.CRITICAL, "live",
    )  # fmt: skip
    rule = Alert(
        "a-rule", TENANT.tenant_id, "tickets_sold", hour + timedelta(hours=1), 40.0, 12.0,
        0.0, 30.0, 0.0, Severity.WARNING, "threshold", "sold-out",
    )  # fmt: skip
    other = Alert(
        "a-other", "another-tenant", "event_count", hour, 1.0, 1.0, 0.0, 2.0, 0.0,
        Severity.WARNING, "detector",
    )  # fmt: skip
    await asyncio.to_thread(service.alerts.add, [detector, rule, other])
    listed = await stub.ListAnomalies(pb.ListAnomaliesRequest(), metadata=auth(tokens))
    by_id = {a.anomaly_id: a for a in listed.anomalies}
    assert "a-other" not in by_id  # another tenant's
    live, breach = by_id["a-detector"], by_id["a-rule"]
    assert (live.severity, live.source, live.rule_id) == (
        pb.ALERT_SEVERITY_CRITICAL,
        pb.ANOMALY_SOURCE_LIVE,
        "",
    )
    assert (live.observed_value, live.expected_value, live.expected_upper) == (900, 120, 180)
    assert (breach.severity, breach.source, breach.rule_id) == (
        pb.ALERT_SEVERITY_WARNING,
        pb.ANOMALY_SOURCE_THRESHOLD,
        "sold-out",
    )
    assert breach.expected_value == 12 and breach.metric_name == "tickets_sold"


async def test_threshold_rules_over_grpc(
    channel: tuple[grpc.aio.Channel, TokenIssuer, PredictionService],
) -> None:
    chan, tokens, service = channel
    stub = pb_grpc.PredictionServiceStub(chan)
    md = auth(tokens)
    created = await stub.CreateThresholdRule(
        pb.CreateThresholdRuleRequest(
            rule=pb.ThresholdRule(
                metric_name="tickets_sold", upper=500, severity=pb.ALERT_SEVERITY_CRITICAL
            )
        ),
        metadata=md,
    )
    rule_id = created.rule.rule_id
    assert rule_id and created.rule.upper == 500 and not created.rule.HasField("lower")
    # The monitor reads the same rules.
    stored = service.alerts.rules(TENANT.tenant_id)
    assert [(r.rule_id, r.lower, r.upper, r.severity.value) for r in stored] == [
        (rule_id, None, 500.0, "critical")
    ]
    listed = await stub.ListThresholdRules(pb.ListThresholdRulesRequest(), metadata=md)
    assert [r.rule_id for r in listed.rules] == [rule_id]
    assert listed.rules[0].severity == pb.ALERT_SEVERITY_CRITICAL

    bad = (
        pb.ThresholdRule(metric_name="tickets_sold"),  # no bound
        pb.ThresholdRule(metric_name="tickets_sold", lower=9, upper=1),
        pb.ThresholdRule(metric_name="revenue", upper=1),  # not an hourly metric
    )
    for rule in bad:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateThresholdRule(pb.CreateThresholdRuleRequest(rule=rule), metadata=md)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Reading needs predictions:read only; changing needs models:manage.
    reader = auth(tokens, frozenset({Scope.PREDICTIONS_READ}))
    assert (
        len((await stub.ListThresholdRules(pb.ListThresholdRulesRequest(), metadata=reader)).rules)
        == 1
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DeleteThresholdRule(
            pb.DeleteThresholdRuleRequest(rule_id=rule_id), metadata=reader
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    await stub.DeleteThresholdRule(pb.DeleteThresholdRuleRequest(rule_id=rule_id), metadata=md)
    assert service.alerts.rules(TENANT.tenant_id) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DeleteThresholdRule(pb.DeleteThresholdRuleRequest(rule_id=rule_id), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_anomalies_filter_by_metric_time_and_severity_and_tokens_keep_the_filter(
    channel: tuple[grpc.aio.Channel, TokenIssuer, PredictionService],
) -> None:
    chan, tokens, service = channel
    stub = pb_grpc.PredictionServiceStub(chan)
    md = auth(tokens)
    base = datetime(2026, 10, 1, tzinfo=UTC)
    stored = [
        Alert(
            f"f-{i}",
            TENANT.tenant_id,
            ("event_count", "tickets_sold")[i % 2],
            base + timedelta(hours=i),
            10.0 + i,
            1.0,
            0.0,
            2.0,
            9.0,
            Severity.CRITICAL if i % 3 == 0 else Severity.WARNING,
            "detector",
        )
        for i in range(12)
    ]
    await asyncio.to_thread(service.alerts.add, stored)
    window = {
        "start_time": timestamp(base + timedelta(hours=2)),
        "end_time": timestamp(base + timedelta(hours=10)),
    }

    async def ids(**fields: Any) -> list[str]:
        got, token = [], ""
        while True:
            page = await stub.ListAnomalies(
                pb.ListAnomaliesRequest(page_size=2, page_token=token, **fields), metadata=md
            )
            got += [a.anomaly_id for a in page.anomalies]
            token = page.next_page_token
            if not token:
                return got

    def expected(keep: Callable[[Alert], bool]) -> list[str]:
        return [a.alert_id for a in sorted(stored, key=lambda a: a.time, reverse=True) if keep(a)]

    in_window = lambda a: base + timedelta(hours=2) <= a.time < base + timedelta(hours=10)  # noqa: E731
    assert await ids(metric_name="tickets_sold", **window) == expected(
        lambda a: a.metric_name == "tickets_sold" and in_window(a)
    )
    assert await ids(min_severity=pb.ALERT_SEVERITY_CRITICAL, **window) == expected(
        lambda a: a.severity is Severity.CRITICAL and in_window(a)
    )
    everything = await ids()
    assert [i for i in everything if i.startswith("f-")] == expected(lambda a: True)

    # A token continues only the filter it was made for (AIP-158).
    first = await stub.ListAnomalies(
        pb.ListAnomaliesRequest(page_size=2, metric_name="event_count"), metadata=md
    )
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListAnomalies(
            pb.ListAnomaliesRequest(page_size=2, page_token=first.next_page_token), metadata=md
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Bad filters name their field.
    for request, field in (
        (pb.ListAnomaliesRequest(metric_name="revenue"), "metric_name"),
        (pb.ListAnomaliesRequest(start_time=window["end_time"], end_time=window["start_time"]), "end_time"),
        (pb.ListAnomaliesRequest(min_severity=7), "min_severity"),
    ):  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListAnomalies(request, metadata=md)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in _violated_fields(caught.value), (field, caught.value.details())


def _violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_revenue_forecast_names_its_currency_and_only_admins_pick_a_tenant(
    channel: tuple[grpc.aio.Channel, TokenIssuer, PredictionService],
) -> None:
    chan, tokens, service = channel
    stub = pb_grpc.PredictionServiceStub(chan)
    record = await service.train(TENANT.tenant_id, ModelKind.REVENUE_FORECAST)
    assert record.state is ModelState.PROMOTED, record.failure
    request = pb.ForecastRequest(target=pb.FORECAST_TARGET_REVENUE, horizon_days=7)
    mine = await stub.Forecast(request, metadata=auth(tokens))
    assert mine.currency_code == "EUR" and mine.model_id == record.model_id
    assert len(mine.points) == 7
    # A platform admin (no tenant of its own) names the organizer and gets its forecast.
    admin = [("authorization", f"Bearer {tokens.issue('ops', '', frozenset({Scope.ADMIN}))}")]
    chosen = pb.ForecastRequest(
        target=pb.FORECAST_TARGET_REVENUE, horizon_days=7, tenant_id=TENANT.tenant_id
    )
    theirs = await stub.Forecast(chosen, metadata=admin)
    assert (theirs.model_id, theirs.currency_code) == (record.model_id, "EUR")
    assert [p.value for p in theirs.points] == [p.value for p in mine.points]
    # An organizer naming another tenant is refused, not silently scoped.
    other = pb.ForecastRequest(
        target=pb.FORECAST_TARGET_REVENUE, horizon_days=7, tenant_id="someone-else"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Forecast(other, metadata=auth(tokens))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
