"""End-to-end: the real `up` process, Envoy transcoding REST onto gRPC, and gRPC directly."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as ingestion_pb2
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as ingestion_grpc
from bilten.analytics.prediction.v1 import prediction_service_pb2 as prediction_pb2
from bilten.analytics.prediction.v1 import prediction_service_pb2_grpc as prediction_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.conftest import tracked_event
from tests.e2e.conftest import RunningSystem

# One worker runs the e2e tier: two `up` systems at once overload a 2-core box.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _range() -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "timeRange.startTime": _iso(now - timedelta(days=1)),
        "timeRange.endTime": _iso(now + timedelta(minutes=1)),
    }


def test_rest_track_page_conversion_then_read_metrics(system: RunningSystem) -> None:
    write = _bearer(system.credentials["write_key"])
    read = _bearer(system.credentials["admin_token"])
    with httpx.Client(base_url=system.rest_url, timeout=10) as http:
        marker = f"e2e_{uuid.uuid4().hex[:8]}"
        for _ in range(3):
            r = http.post(
                "/events/track", headers=write, json={"eventName": marker, "userId": "alice"}
            )
            assert r.status_code == 200, r.text
            assert r.json()["result"]["status"] == "INGEST_STATUS_ACCEPTED"
        r = http.post(
            "/events/page",
            headers={
                **write,
                "user-agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
            },
            json={
                "eventName": "home",
                "anonymousId": "anon-1",
                "page": {"url": "https://bilten.example/"},
            },
        )
        assert r.status_code == 200, r.text
        r = http.post(
            "/events/conversion",
            headers=write,
            json={
                "eventName": "ticket_purchased",
                "userId": "alice",
                "ticketing": {"quantity": 2, "revenue": {"currencyCode": "EUR", "units": "40"}},
            },
        )
        assert r.status_code == 200, r.text
        r = http.get(
            "/analytics/metrics",
            headers=read,
            params={
                "metrics": "METRIC_KIND_EVENT_COUNT",
                "groupBy": "DIMENSION_EVENT_NAME",
                **_range(),
            },
        )
        assert r.status_code == 200, r.text
        points = r.json()["series"][0]["points"]
        by_name: dict[str, float] = {}
        for point in points:
            name = point["dimensions"]["event_name"]
            by_name[name] = by_name.get(name, 0) + point["value"]
        assert by_name[marker] == 3
        r = http.get("/analytics/revenue", headers=read, params=_range())
        assert r.status_code == 200, r.text
        totals = {t["currencyCode"]: t for t in r.json()["totals"]}
        assert totals["EUR"]["units"] == "40"
        r = http.get("/analytics/active-users", headers=read, params=_range())
        assert r.status_code == 200, r.text
        assert int(r.json()["dailyActiveUsers"]) == 2  # alice and anon-1


@pytest.mark.parametrize(
    ("request_kwargs", "status", "reason"),
    [
        # Malformed JSON: refused by Envoy's transcoder before any service runs.
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
        # Wrong type.
        ({"json": {"eventName": 5, "userId": "a"}}, 400, None),
        # Unknown enum value.
        (
            {"json": {"eventName": "x", "userId": "a", "eventType": "TRACKED_EVENT_TYPE_NOPE"}},
            400,
            None,
        ),
        # Shape rule: bad event name pattern (field violation, quarantined).
        ({"json": {"eventName": "Bad Name", "userId": "a"}}, 400, "ERROR_REASON_INVALID_REQUEST"),
        # Shape rule: no identity.
        ({"json": {"eventName": "ok"}}, 400, "ERROR_REASON_INVALID_REQUEST"),
    ],
)
def test_rest_bad_input_gets_precise_4xx_json(
    system: RunningSystem, request_kwargs: dict[str, object], status: int, reason: str | None
) -> None:
    headers = {**_bearer(system.credentials["write_key"]), **request_kwargs.pop("headers", {})}  # type: ignore[dict-item]
    with httpx.Client(base_url=system.rest_url, timeout=10) as http:
        r = http.post("/events/track", headers=headers, **request_kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    if reason is not None:
        body = r.json()
        infos = [d for d in body["details"] if d["@type"].endswith("ErrorInfo")]
        assert infos[0]["reason"] == reason
        violations = [d for d in body["details"] if d["@type"].endswith("BadRequest")]
        assert violations and violations[0]["fieldViolations"][0]["field"].startswith("event")


def test_rest_auth_errors(system: RunningSystem) -> None:
    with httpx.Client(base_url=system.rest_url, timeout=10) as http:
        r = http.get(
            "/analytics/metrics", params={"metrics": "METRIC_KIND_EVENT_COUNT", **_range()}
        )
        assert r.status_code == 401
        assert r.json()["details"][0]["reason"] == "ERROR_REASON_CREDENTIAL_MISSING"
        r = http.get(
            "/analytics/metrics",
            headers=_bearer("bak_nokey_nosecret"),
            params={"metrics": "METRIC_KIND_EVENT_COUNT", **_range()},
        )
        assert r.status_code == 401
        # A write key cannot read analytics.
        r = http.get(
            "/analytics/metrics",
            headers=_bearer(system.credentials["write_key"]),
            params={"metrics": "METRIC_KIND_EVENT_COUNT", **_range()},
        )
        assert r.status_code == 403
        assert r.json()["details"][0]["reason"] == "ERROR_REASON_SCOPE_MISSING"
        # A tenant token cannot name another tenant.
        r = http.get(
            "/analytics/metrics",
            headers=_bearer(system.credentials["admin_token"]),
            params={"metrics": "METRIC_KIND_EVENT_COUNT", "tenantId": "someone-else", **_range()},
        )
        assert r.status_code == 403
        assert r.json()["details"][0]["reason"] == "ERROR_REASON_TENANT_MISMATCH"


def test_rest_unknown_paths_and_params_are_4xx(system: RunningSystem) -> None:
    with httpx.Client(base_url=system.rest_url, timeout=10) as http:
        assert http.get("/no/such/path").status_code == 404
        r = http.get(
            "/analytics/metrics",
            headers=_bearer(system.credentials["admin_token"]),
            params={"metrics": "METRIC_KIND_EVENT_COUNT", "bogus": "1", **_range()},
        )
        assert r.status_code == 400


def test_rest_oversized_batch_is_rejected_whole(system: RunningSystem) -> None:
    events = [{"eventName": "x", "userId": "a", "eventType": "TRACKED_EVENT_TYPE_TRACK"}] * 1001
    with httpx.Client(base_url=system.rest_url, timeout=10) as http:
        r = http.post(
            "/events/batch",
            headers=_bearer(system.credentials["write_key"]),
            json={"events": events},
        )
    assert r.status_code == 400
    violations = next(d for d in r.json()["details"] if d["@type"].endswith("BadRequest"))
    assert violations["fieldViolations"][0]["field"] == "events"


def test_grpc_batch_with_per_event_results_and_quarantine(system: RunningSystem) -> None:
    metadata = (("authorization", f"Bearer {system.credentials['write_key']}"),)
    with grpc.insecure_channel(system.grpc_target) as channel:
        stub = ingestion_grpc.IngestionServiceStub(channel)
        good = tracked_event("seat_selected", event_id=f"id-{uuid.uuid4().hex}")
        bad = tracked_event("Bad Name")
        future = tracked_event("seat_selected", ago=-timedelta(hours=2))
        response = stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[good, good, bad, future]), metadata=metadata
        )
        statuses = [r.status for r in response.results]
        assert statuses == [
            ingestion_pb2.INGEST_STATUS_ACCEPTED,
            ingestion_pb2.INGEST_STATUS_DUPLICATE,
            ingestion_pb2.INGEST_STATUS_REJECTED,
            ingestion_pb2.INGEST_STATUS_REJECTED,
        ]
        assert response.results[2].field_path == "events[2].event_name"
        assert (
            response.results[3].rejection_reason
            == ingestion_pb2.REJECTION_REASON_TIMESTAMP_IN_FUTURE
        )
        read = (("authorization", f"Bearer {system.credentials['admin_token']}"),)
        listed = stub.ListQuarantinedEvents(
            ingestion_pb2.ListQuarantinedEventsRequest(page_size=1000), metadata=read
        )
        ids = {q.quarantined_event_id for q in listed.quarantined_events}
        assert response.results[2].quarantined_event_id in ids
        assert response.results[3].quarantined_event_id in ids


def test_grpc_health_reflection_and_precise_errors(system: RunningSystem) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    services = [
        f"bilten.analytics.{name}.v1.{name.capitalize()}Service"
        for name in ("ingestion", "query", "aggregation", "compliance", "prediction")
    ]
    with grpc.insecure_channel(system.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", *services]:
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        listed = {s.name for s in answer.list_services_response.service}
        assert set(services) <= listed
        stub = prediction_grpc.PredictionServiceStub(channel)
        metadata = (("authorization", f"Bearer {system.credentials['admin_token']}"),)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Forecast(prediction_pb2.ForecastRequest(horizon_days=5), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(caught.value)
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(info)
        assert info.reason == "ERROR_REASON_INVALID_REQUEST"
        bad_request = error_details_pb2.BadRequest()
        status.details[1].Unpack(bad_request)
        assert bad_request.field_violations[0].field == "target"


def test_prometheus_endpoint_exports_rpc_metrics(system: RunningSystem) -> None:
    if not system.metrics_url:
        pytest.skip("external deployment: metrics endpoint not given")
    body = httpx.get(system.metrics_url, timeout=10).text
    assert "rpc_server_requests" in body
    assert 'rpc_method="/bilten.analytics.ingestion.v1.IngestionService/Track"' in body
