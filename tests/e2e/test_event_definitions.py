"""End-to-end: event definitions in the schema registry drive custom event validation.

The tenant registers an Avro schema for a custom event through the Confluent API of the
registry `up` serves, with its own admin token; ingestion then validates custom events
against it; the definition evolves compatibly (v2) and an incompatible v3 is refused.
"""

from __future__ import annotations

import json
import time
import uuid

import grpc
import httpx
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as ingestion_pb2
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as ingestion_grpc

from tests.e2e.conftest import RunningSystem

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

V1 = {
    "type": "record",
    "name": "SeatMapOpened",
    "fields": [
        {"name": "section", "type": "string"},
        {"name": "zoom", "type": "int"},
    ],
}
# v2 adds an optional property: old events (without it) and new ones are both valid.
V2 = {
    **V1,
    "fields": [*V1["fields"], {"name": "accessible", "type": ["null", "boolean"], "default": None}],
}
# v3 changes a type incompatibly (int -> string cannot read old data).
V3 = {**V1, "fields": [{"name": "section", "type": "string"}, {"name": "zoom", "type": "string"}]}

SR_JSON = "application/vnd.schemaregistry.v1+json"


def _register(
    system: RunningSystem, token: str, subject: str, schema: dict[str, object]
) -> httpx.Response:
    return httpx.post(
        f"{system.registry_url}/subjects/{subject}/versions",
        auth=("anything", token),
        headers={"content-type": SR_JSON},
        content=json.dumps({"schema": json.dumps(schema)}),
        timeout=10,
    )


def _track_custom(
    system: RunningSystem, name: str, properties: dict[str, object], version: int = 0
) -> httpx.Response:
    body: dict[str, object] = {"eventName": name, "userId": "u-def", "properties": properties}
    if version:
        body["definitionVersion"] = version
    return httpx.post(
        f"{system.rest_url}/events/custom",
        headers={"authorization": f"Bearer {system.credentials['write_key']}"},
        json=body,
        timeout=10,
    )


def _quarantined(
    system: RunningSystem, quarantined_event_id: str
) -> ingestion_pb2.QuarantinedEvent:
    """The stored quarantine entry, read back through ListQuarantinedEvents."""
    metadata = (("authorization", f"Bearer {system.credentials['admin_token']}"),)
    with grpc.insecure_channel(system.grpc_target) as channel:
        stub = ingestion_grpc.IngestionServiceStub(channel)
        token = ""
        while True:
            page = stub.ListQuarantinedEvents(
                ingestion_pb2.ListQuarantinedEventsRequest(page_size=1000, page_token=token),
                metadata=metadata,
            )
            for entry in page.quarantined_events:
                if entry.quarantined_event_id == quarantined_event_id:
                    return entry
            token = page.next_page_token
            if not token:
                raise AssertionError(f"{quarantined_event_id} is not in quarantine")


def _eventually(check: object, seconds: float = 15.0) -> httpx.Response:
    # Definitions are cached by ingestion for a few seconds; new versions show up after.
    deadline = time.monotonic() + seconds
    while True:
        response = check()  # type: ignore[operator]
        if response.status_code == 200 or time.monotonic() > deadline:
            return response  # type: ignore[no-any-return]
        time.sleep(0.5)


def test_custom_events_are_validated_against_their_registered_definition(
    system: RunningSystem,
) -> None:
    tenant = system.credentials["tenant_id"]
    token = system.credentials["admin_token"]
    name = f"seat_map_opened_{uuid.uuid4().hex[:6]}"
    subject = f"events.{tenant}.{name}"

    # Unknown definition: rejected into quarantine with its own reason.
    r = _track_custom(system, name, {"section": "A", "zoom": 2})
    assert r.status_code == 400, r.text
    assert r.json()["details"][0]["metadata"]["rejection_reason"] == "UNKNOWN_EVENT_DEFINITION"

    r = _register(system, token, subject, V1)
    assert r.status_code == 200, r.text
    v1_id = r.json()["id"]

    r = _eventually(lambda: _track_custom(system, name, {"section": "A", "zoom": 2}))
    assert r.status_code == 200, r.text
    # Wrong type: the failing property is named.
    r = _track_custom(system, name, {"section": "A", "zoom": "two"})
    assert r.status_code == 400
    violation = next(d for d in r.json()["details"] if d["@type"].endswith("BadRequest"))
    assert violation["fieldViolations"][0]["field"] == "event.properties.zoom"
    metadata = r.json()["details"][0]["metadata"]
    assert metadata["rejection_reason"] == "SCHEMA_VIOLATION"
    # The quarantine record itself carries the failing field path, not only the response.
    entry = _quarantined(system, metadata["quarantined_event_id"])
    assert entry.field_path == "event.properties.zoom"
    assert entry.rejection_reason == ingestion_pb2.REJECTION_REASON_SCHEMA_VIOLATION
    assert "zoom" in entry.message
    # Unknown property.
    r = _track_custom(system, name, {"section": "A", "zoom": 2, "colour": "red"})
    assert r.status_code == 400
    assert "colour" in r.text

    # v2: an optional property; both old-style and new events are accepted.
    r = _register(system, token, subject, V2)
    assert r.status_code == 200, r.text
    assert r.json()["id"] != v1_id
    r = _eventually(
        lambda: _track_custom(system, name, {"section": "B", "zoom": 1, "accessible": True})
    )
    assert r.status_code == 200, r.text
    assert _track_custom(system, name, {"section": "B", "zoom": 1}).status_code == 200
    # An event may pin the version it follows.
    assert _track_custom(system, name, {"section": "C", "zoom": 3}, version=1).status_code == 200
    pinned = _track_custom(
        system, name, {"section": "C", "zoom": 3, "accessible": False}, version=1
    )
    assert pinned.status_code == 400

    # v3: incompatible under the default BACKWARD level.
    r = _register(system, token, subject, V3)
    assert r.status_code == 409
    assert r.json()["error_code"] == 40901


def test_a_tenant_cannot_write_another_tenants_definitions(system: RunningSystem) -> None:
    r = _register(system, system.credentials["admin_token"], "events.some_other_tenant.evil", V1)
    assert r.status_code == 403
    assert r.json()["error_code"] == 40301
    # Nor global config.
    r = httpx.put(
        f"{system.registry_url}/config",
        auth=("x", system.credentials["admin_token"]),
        json={"compatibility": "NONE"},
        timeout=10,
    )
    assert r.status_code == 403
    # A write key (events:write only) cannot use the registry at all.
    r = httpx.get(
        f"{system.registry_url}/subjects", auth=("x", system.credentials["write_key"]), timeout=10
    )
    assert r.status_code == 403
    # No credentials: 401.
    assert httpx.get(f"{system.registry_url}/subjects", timeout=10).status_code == 401


def test_up_registers_the_envelope_under_the_topic_value_subject(system: RunningSystem) -> None:
    from services.streaming.avro_envelope import ENVELOPE_SCHEMA_JSON, subject_for

    r = httpx.get(
        f"{system.registry_url}/subjects/{subject_for()}/versions/latest",
        auth=("x", system.credentials["admin_token"]),
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["schema"]) == json.loads(ENVELOPE_SCHEMA_JSON)
