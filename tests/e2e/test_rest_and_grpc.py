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


def test_rest_seed_read_paths_through_envoy(system: RunningSystem) -> None:
    """The seed's read paths other than /analytics/metrics, each over REST through Envoy,
    checked against known events of users, event names and a ticketed event of their own."""
    write = _bearer(system.credentials["write_key"])
    read = _bearer(system.credentials["admin_token"])
    tag = uuid.uuid4().hex[:8]
    viewed, bought, concert = f"seen_{tag}", f"paid_{tag}", f"concert-{tag}"
    buyer, browser = f"buyer-{tag}", f"browser-{tag}"
    now = datetime.now(UTC)
    with httpx.Client(base_url=system.rest_url, timeout=30) as http:
        for user in (buyer, browser):
            r = http.post(
                "/events/page",
                headers=write,
                json={
                    "eventName": viewed,
                    "userId": user,
                    "occurredAt": _iso(now - timedelta(minutes=10)),
                    "page": {"url": f"https://bilten.example/{concert}"},
                    "ticketing": {"ticketedEventId": concert},
                },
            )
            assert r.status_code == 200, r.text
        r = http.post(
            "/events/conversion",
            headers=write,
            json={
                "eventName": bought,
                "userId": buyer,
                "occurredAt": _iso(now - timedelta(minutes=5)),
                "ticketing": {
                    "ticketedEventId": concert,
                    "quantity": 3,
                    "revenue": {"currencyCode": "EUR", "units": "90"},
                },
            },
        )
        assert r.status_code == 200, r.text

        r = http.get(f"/analytics/events/{concert}", headers=read, params=_range())
        assert r.status_code == 200, r.text
        ticketed = r.json()
        assert ticketed["ticketedEventId"] == concert
        assert int(ticketed["viewCount"]) == 2
        assert int(ticketed["uniqueVisitorCount"]) == 2
        assert int(ticketed["buyerCount"]) == 1
        assert int(ticketed["ticketsSold"]) == 3
        assert ticketed["conversionRate"] == 0.5
        assert {(m["currencyCode"], m["units"]) for m in ticketed["revenues"]} == {("EUR", "90")}

        r = http.get(f"/analytics/users/{buyer}", headers=read)
        assert r.status_code == 200, r.text
        user = r.json()
        assert user["userId"] == buyer
        assert int(user["totalSessions"]) == 1
        assert int(user["pageViewCount"]) == 1
        assert int(user["ticketsPurchased"]) == 3
        assert user["totalSpent"][0]["currencyCode"] == "EUR"
        assert http.get(f"/analytics/users/nobody-{tag}", headers=read).status_code == 404

        r = http.get(
            "/analytics/funnels",
            headers=read,
            params=[("stepEventNames", viewed), ("stepEventNames", bought), *_range().items()],
        )
        assert r.status_code == 200, r.text
        (breakdown,) = r.json()["breakdowns"]
        steps = [(s["eventName"], int(s["userCount"])) for s in breakdown["steps"]]
        assert steps == [(viewed, 2), (bought, 1)]

        r = http.get(
            "/analytics/cohorts",
            headers=read,
            params={
                "cohortEventName": viewed,
                "returnEventName": bought,
                "periodCount": "2",
                **_range(),
            },
        )
        assert r.status_code == 200, r.text
        cohorts = r.json()["cohorts"]
        assert sum(int(c["size"]) for c in cohorts) == 2
        assert sum(int(c["retainedCounts"][0]) for c in cohorts) == 1  # the buyer came back

        r = http.post(
            "/analytics/queries",
            headers=read,
            json={
                "sql": "SELECT user_id, count(*) AS n FROM events "
                f"WHERE event_name IN ('{viewed}', '{bought}') GROUP BY user_id ORDER BY user_id"
            },
        )
        assert r.status_code == 200, r.text
        answer = r.json()
        assert [c["name"] for c in answer["columns"]] == ["user_id", "n"]
        assert [[row[0], int(row[1])] for row in answer["rows"]] == [[browser, 1], [buyer, 2]]

        r = http.post(
            "/analytics/reports",
            headers=read,
            json={
                "displayName": f"Paid {tag}",
                "sql": f"SELECT count(*) AS paid FROM events WHERE event_name = '{bought}'",
                "schedule": "REPORT_SCHEDULE_DAILY",
            },
        )
        assert r.status_code == 200, r.text
        report_id = r.json()["report"]["reportId"]
        r = http.get(f"/analytics/reports/{report_id}", headers=read)
        assert r.status_code == 200, r.text
        report = r.json()["report"]
        assert (report["reportId"], report["displayName"]) == (report_id, f"Paid {tag}")
        assert report["schedule"] == "REPORT_SCHEDULE_DAILY"
        r = http.get(f"/analytics/reports/{report_id}x", headers=read)
        assert r.status_code == 404
        _assert_status_json(r, NOT_FOUND)


def test_up_prints_the_dev_credentials(system: RunningSystem) -> None:
    if system.log_path is None:
        pytest.skip("external deployment: no `up` output")
    printed = system.log_path.read_text()
    for key in ("tenant_id", "write_key", "admin_token"):
        assert system.credentials[key] in printed, key


# google.rpc.Code numbers.
INVALID_ARGUMENT, NOT_FOUND = 3, 5


def _assert_status_json(r: httpx.Response, code: int) -> dict[str, object]:
    """The body of every HTTP error: a JSON google.rpc.Status, as for the services' errors."""
    assert r.headers["content-type"].startswith("application/json"), (r.headers, r.text)
    body = r.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body["details"], list), body
    return body  # type: ignore[no-any-return]


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
        # Not a timestamp.
        ({"json": {"eventName": "x", "userId": "a", "occurredAt": "yesterday"}}, 400, None),
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
    body = _assert_status_json(r, INVALID_ARGUMENT)
    if reason is not None:
        details: list[dict[str, str]] = body["details"]  # type: ignore[assignment]
        infos = [d for d in details if d["@type"].endswith("ErrorInfo")]
        assert infos[0]["reason"] == reason
        violations = [d for d in details if d["@type"].endswith("BadRequest")]
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
    read = _bearer(system.credentials["admin_token"])
    with httpx.Client(base_url=system.rest_url, timeout=10) as http:
        for path in ("/no/such/path", "/analytics/nothing-here"):
            r = http.get(path, headers=read)
            assert r.status_code == 404
            _assert_status_json(r, NOT_FOUND)
        for params in (
            {"metrics": "METRIC_KIND_EVENT_COUNT", "bogus": "1", **_range()},  # unknown param
            {"metrics": "METRIC_KIND_NOPE", **_range()},  # unknown enum name in the query
            {"metrics": "METRIC_KIND_EVENT_COUNT", "timeRange.startTime": "soon"},  # timestamp
        ):
            r = http.get("/analytics/metrics", headers=read, params=params)
            assert r.status_code == 400, (params, r.text)
            _assert_status_json(r, INVALID_ARGUMENT)


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
