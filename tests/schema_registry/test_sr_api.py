"""The REST API against each real store (SQLite always, PostgreSQL when configured)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from schema_registry.app import create_app
from schema_registry.auth import StaticTokenAuthenticator
from schema_registry.settings import RegistrySettings

pytestmark = pytest.mark.integration

V1_JSON = "application/vnd.schemaregistry.v1+json"


def avro(fields: list[dict[str, Any]], name: str = "User", **extra: Any) -> str:
    return json.dumps(
        {"type": "record", "name": name, "namespace": "ex", "fields": fields, **extra}
    )


USER_V1 = avro([{"name": "id", "type": "long"}])
USER_V2 = avro(
    [{"name": "id", "type": "long"}, {"name": "email", "type": ["null", "string"], "default": None}]
)
USER_BAD = avro([{"name": "id", "type": "long"}, {"name": "age", "type": "int"}])


async def register(
    client: httpx.AsyncClient, subject: str, schema: str, **extra: Any
) -> httpx.Response:
    return await client.post(f"/subjects/{subject}/versions", json={"schema": schema, **extra})


def error(response: httpx.Response, status: int, code: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error_code", "message"}
    assert body["error_code"] == code, body
    return str(body["message"])


async def test_root_and_types(client: httpx.AsyncClient) -> None:
    r = await client.get("/", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json() == {}
    r = await client.get("/schemas/types")
    assert r.json() == ["AVRO"]
    assert r.headers["content-type"] == V1_JSON


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/vnd.schemaregistry.v1+json", "application/vnd.schemaregistry.v1+json"),
        ("application/vnd.schemaregistry+json", "application/vnd.schemaregistry+json"),
        ("application/json", "application/json"),
        ("*/*", V1_JSON),
    ],
)
async def test_content_negotiation(client: httpx.AsyncClient, accept: str, expected: str) -> None:
    r = await client.get("/config", headers={"Accept": accept})
    assert r.headers["content-type"] == expected
    r = await client.post(
        "/subjects/ct/versions",
        content=json.dumps({"schema": '"string"'}),
        headers={"Content-Type": accept if accept != "*/*" else "application/json"},
    )
    assert r.status_code == 200
    r = await client.post(
        "/subjects/ct/versions", content=b"{}", headers={"Content-Type": "text/plain"}
    )
    error(r, 415, 415)


async def test_register_is_content_addressed_and_global(client: httpx.AsyncClient) -> None:
    r = await register(client, "users-value", USER_V1)
    assert r.json() == {"id": 1}
    # Re-registering: same id, no new version.
    assert (await register(client, "users-value", USER_V1)).json() == {"id": 1}
    # Same schema in another presentation (key order, whitespace, full name, doc) and subject.
    variant = json.dumps(
        {
            "fields": [{"type": {"type": "long"}, "name": "id", "doc": "d"}],
            "type": "record",
            "name": "ex.User",
        },
        indent=2,
    )
    assert (await register(client, "other-subject", variant)).json() == {"id": 1}
    assert (await client.get("/subjects/users-value/versions")).json() == [1]
    r = await register(client, "users-value", USER_V2)
    assert r.json() == {"id": 2}
    assert (await client.get("/subjects/users-value/versions")).json() == [1, 2]
    # Unknown request fields are tolerated.
    r = await register(
        client,
        "users-value",
        USER_V2,
        metadata={"properties": {"a": "b"}},
        ruleSet={"domainRules": []},
        schemaType="AVRO",
        references=[],
    )
    assert r.json() == {"id": 2}


PLAIN_EMAIL = avro([{"name": "email", "type": "string"}], name="SignedUp")
MARKED_EMAIL = avro([{"name": "email", "type": "string", "personal": True}], name="SignedUp")


async def test_custom_attributes_are_part_of_identity(client: httpx.AsyncClient) -> None:
    # `"personal": true` decides which event properties are sealed: a schema that differs
    # only by it is a different schema (new id, new version), and its text keeps the mark.
    plain = (await register(client, "events.t1.signed_up", PLAIN_EMAIL)).json()["id"]
    marked = (await register(client, "events.t1.signed_up", MARKED_EMAIL)).json()["id"]
    assert marked != plain
    assert (await client.get("/subjects/events.t1.signed_up/versions")).json() == [1, 2]
    latest = (await client.get("/subjects/events.t1.signed_up/versions/latest")).json()
    assert latest["id"] == marked
    assert json.loads(latest["schema"])["fields"][0]["personal"] is True
    assert json.loads((await client.get(f"/schemas/ids/{marked}")).json()["schema"])["fields"][0][
        "personal"
    ]
    # Another tenant registering the marked shape gets the marked text, not the plain one.
    assert (await register(client, "events.t2.signed_up", MARKED_EMAIL)).json()["id"] == marked
    r = await client.get("/subjects/events.t2.signed_up/versions/latest/schema")
    assert r.json()["fields"][0]["personal"] is True
    # Custom attributes are normalised: key order and whitespace do not make a new schema,
    # and the same shape without marks still dedups to the plain id.
    reordered = json.dumps(
        {
            "name": "ex.SignedUp",
            "fields": [{"personal": True, "type": {"type": "string"}, "name": "email"}],
            "type": "record",
        },
        indent=4,
    )
    assert (await register(client, "events.t3.signed_up", reordered)).json()["id"] == marked
    assert (await register(client, "events.t4.signed_up", PLAIN_EMAIL)).json()["id"] == plain
    nested = avro(
        [{"name": "email", "type": "string", "personal": True, "tags": {"b": 1, "a": [2]}}],
        name="SignedUp",
    )
    nested_reordered = avro(
        [{"tags": {"a": [2], "b": 1}, "name": "email", "personal": True, "type": "string"}],
        name="SignedUp",
    )
    first = (await register(client, "n1", nested)).json()["id"]
    assert first not in (plain, marked)
    assert (await register(client, "n2", nested_reordered)).json()["id"] == first
    # Lookup distinguishes them as well.
    r = await client.post("/subjects/events.t4.signed_up", json={"schema": MARKED_EMAIL})
    error(r, 404, 40403)


async def test_primitive_canonicalisation(client: httpx.AsyncClient) -> None:
    a = (await register(client, "p1", '"string"')).json()["id"]
    b = (await register(client, "p2", '{"type": "string"}')).json()["id"]
    c = (await register(client, "p3", '{"type":"string","logicalType":"uuid"}')).json()["id"]
    assert a == b and c != a


async def test_get_versions_and_response_shapes(client: httpx.AsyncClient) -> None:
    await register(client, "s", USER_V1)
    await register(client, "s", USER_V2)
    r = await client.get("/subjects/s/versions/latest")
    assert r.json() == {"subject": "s", "version": 2, "id": 2, "schema": USER_V2}
    assert (await client.get("/subjects/s/versions/-1")).json()["version"] == 2
    assert (await client.get("/subjects/s/versions/1")).json()["id"] == 1
    r = await client.get("/subjects/s/versions/1/schema")
    assert r.json() == json.loads(USER_V1)
    r = await client.get("/schemas/ids/2")
    assert r.json() == {"schema": USER_V2}
    assert (await client.get("/schemas/ids/2")).json() == {"schema": USER_V2}  # cached path
    assert (await client.get("/schemas/ids/2/schema")).json() == json.loads(USER_V2)
    assert (await client.get("/schemas/ids/1/subjects")).json() == ["s"]
    assert (await client.get("/schemas/ids/1/versions")).json() == [{"subject": "s", "version": 1}]
    error(await client.get("/schemas/ids/99"), 404, 40403)
    error(await client.get("/schemas/ids/99/subjects"), 404, 40403)
    error(await client.get("/subjects/s/versions/3"), 404, 40402)
    error(await client.get("/subjects/nope/versions/1"), 404, 40401)
    error(await client.get("/subjects/nope/versions"), 404, 40401)
    for bad in ("0", "abc", "2147483648", "-2"):
        message = error(await client.get(f"/subjects/s/versions/{bad}"), 422, 42202)
        assert "latest" in message


async def test_lookup(client: httpx.AsyncClient) -> None:
    await register(client, "s", USER_V1)
    r = await client.post("/subjects/s", json={"schema": USER_V1})
    assert r.json() == {"subject": "s", "version": 1, "id": 1, "schema": USER_V1}
    error(await client.post("/subjects/s", json={"schema": USER_V2}), 404, 40403)
    error(await client.post("/subjects/none", json={"schema": USER_V1}), 404, 40401)
    error(await client.post("/subjects/s", json={"schema": "{bad"}), 422, 42201)
    await client.delete("/subjects/s")
    error(await client.post("/subjects/s", json={"schema": USER_V1}), 404, 40401)
    r = await client.post("/subjects/s?deleted=true", json={"schema": USER_V1})
    assert r.json()["version"] == 1


async def test_list_schemas_and_subjects(client: httpx.AsyncClient) -> None:
    await register(client, "a-value", USER_V1)
    await register(client, "a-value", USER_V2)
    await register(client, "b-value", '"int"')
    await register(client, "c-key", '"long"')
    await client.delete("/subjects/c-key")
    assert (await client.get("/subjects")).json() == ["a-value", "b-value"]
    assert (await client.get("/subjects?deleted=true")).json() == ["a-value", "b-value", "c-key"]
    assert (await client.get("/subjects?deletedOnly=true")).json() == ["c-key"]
    assert (await client.get("/subjects?deleted_only=True")).json() == ["c-key"]
    assert (await client.get("/subjects?subjectPrefix=a")).json() == ["a-value"]
    assert (await client.get("/subjects?offset=1&limit=1")).json() == ["b-value"]
    schemas = (await client.get("/schemas")).json()
    assert [(s["subject"], s["version"]) for s in schemas] == [
        ("a-value", 1),
        ("a-value", 2),
        ("b-value", 1),
    ]
    assert all(set(s) == {"subject", "version", "id", "schema"} for s in schemas)
    latest = (await client.get("/schemas?latestOnly=true")).json()
    assert [(s["subject"], s["version"]) for s in latest] == [("a-value", 2), ("b-value", 1)]
    assert len((await client.get("/schemas?deleted=true")).json()) == 4
    assert len((await client.get("/schemas?subjectPrefix=b")).json()) == 1
    assert len((await client.get("/schemas?offset=1&limit=1")).json()) == 1


async def test_soft_and_permanent_delete_of_versions(client: httpx.AsyncClient) -> None:
    await register(client, "s", USER_V1)
    await register(client, "s", USER_V2)
    error(await client.delete("/subjects/s/versions/1?permanent=true"), 404, 40407)
    assert (await client.delete("/subjects/s/versions/1")).json() == 1
    error(await client.delete("/subjects/s/versions/1"), 404, 40406)
    error(await client.get("/subjects/s/versions/1"), 404, 40402)
    assert (await client.get("/subjects/s/versions/1?deleted=true")).json()["id"] == 1
    assert (await client.get("/subjects/s/versions")).json() == [2]
    assert (await client.get("/subjects/s/versions?deleted=true")).json() == [1, 2]
    assert (await client.get("/subjects/s/versions?deletedOnly=true")).json() == [1]
    # Soft-deleted schemas stay readable by id: consumers may still hold such data.
    assert (await client.get("/schemas/ids/1")).status_code == 200
    assert (await client.get("/schemas/ids/1/subjects")).json() == []
    assert (await client.get("/schemas/ids/1/subjects?deleted=true")).json() == ["s"]
    assert (await client.delete("/subjects/s/versions/1?permanent=true")).json() == 1
    error(await client.get("/subjects/s/versions/1?deleted=true"), 404, 40402)
    error(await client.delete("/subjects/s/versions/7"), 404, 40402)
    error(await client.delete("/subjects/nope/versions/1"), 404, 40401)
    assert (await client.delete("/subjects/s/versions/latest")).json() == 2
    error(await client.get("/subjects/s/versions"), 404, 40401)


async def test_soft_and_permanent_delete_of_subjects(client: httpx.AsyncClient) -> None:
    await register(client, "s", USER_V1)
    await register(client, "s", USER_V2)
    error(await client.delete("/subjects/s?permanent=true"), 404, 40405)
    assert (await client.delete("/subjects/s")).json() == [1, 2]
    error(await client.delete("/subjects/s"), 404, 40404)
    assert "s" not in (await client.get("/subjects")).json()
    # Soft-deleted versions are ignored by compatibility: an incompatible schema is accepted.
    assert (await register(client, "s", USER_BAD)).status_code == 200
    assert (await client.get("/subjects/s/versions")).json() == [3]
    await client.delete("/subjects/s")
    assert (await client.delete("/subjects/s?permanent=true")).json() == [1, 2, 3]
    error(await client.delete("/subjects/s"), 404, 40401)
    error(await client.delete("/subjects/s?permanent=true"), 404, 40401)
    # Re-registering after a soft delete gives a new version with the same id.
    await register(client, "t", USER_V1)
    await client.delete("/subjects/t/versions/1")
    assert (await register(client, "t", USER_V1)).json() == {"id": 1}
    assert (await client.get("/subjects/t/versions")).json() == [2]


async def test_ids_only_grow_after_permanent_delete(client: httpx.AsyncClient) -> None:
    await register(client, "s", USER_V1)
    await register(client, "s", USER_V2)
    await client.delete("/subjects/s")
    await client.delete("/subjects/s?permanent=true")
    error(await client.get("/schemas/ids/2/subjects"), 404, 40403)
    r = await register(client, "s", '"bytes"')
    assert r.json()["id"] == 3


async def test_references(client: httpx.AsyncClient) -> None:
    address = json.dumps(
        {
            "type": "record",
            "name": "Address",
            "namespace": "ex",
            "fields": [{"name": "street", "type": "string"}],
        }
    )
    person = json.dumps(
        {
            "type": "record",
            "name": "Person",
            "namespace": "ex",
            "fields": [{"name": "home", "type": "Address"}],
        }
    )
    addr_id = (await register(client, "address", address)).json()["id"]
    refs = [{"name": "ex.Address", "subject": "address", "version": 1}]
    error(await register(client, "person", person), 422, 42201)  # unresolved without refs
    r = await register(client, "person", person, references=refs)
    person_id = r.json()["id"]
    assert person_id != addr_id
    assert (await client.get(f"/schemas/ids/{person_id}")).json() == {
        "schema": person,
        "references": refs,
    }
    v = (await client.get("/subjects/person/versions/1")).json()
    assert v["references"] == refs
    assert (await client.get("/subjects/address/versions/1/referencedby")).json() == [person_id]
    r = await client.post("/subjects/person", json={"schema": person, "references": refs})
    assert r.json()["id"] == person_id
    bad_ref = [{"name": "ex.Address", "subject": "address", "version": 9}]
    error(await register(client, "person2", person, references=bad_ref), 422, 42201)
    # A referenced version cannot be deleted while referrers live.
    message = error(await client.delete("/subjects/address/versions/1"), 422, 42206)
    assert "subject=address,version=1" in message
    error(await client.delete("/subjects/address"), 422, 42206)
    await client.delete("/subjects/person")
    # A soft-deleted referrer no longer blocks a soft delete, but blocks a permanent one.
    assert (await client.delete("/subjects/address/versions/1")).json() == 1
    error(await client.delete("/subjects/address/versions/1?permanent=true"), 422, 42206)
    await client.delete("/subjects/person?permanent=true")
    assert (await client.delete("/subjects/address/versions/1?permanent=true")).json() == 1


async def test_config(client: httpx.AsyncClient) -> None:
    assert (await client.get("/config")).json() == {"compatibilityLevel": "BACKWARD"}
    r = await client.put("/config", json={"compatibility": "full"})
    assert r.json() == {"compatibility": "FULL"}
    assert (await client.get("/config")).json() == {"compatibilityLevel": "FULL"}
    error(await client.put("/config", json={"compatibility": "SIDEWAYS"}), 422, 42203)
    error(await client.get("/config/s"), 404, 40408)
    assert (await client.get("/config/s?defaultToGlobal=true")).json() == {
        "compatibilityLevel": "FULL"
    }
    assert (await client.put("/config/s", json={"compatibility": "NONE"})).json() == {
        "compatibility": "NONE"
    }
    assert (await client.get("/config/s")).json() == {"compatibilityLevel": "NONE"}
    assert (await client.delete("/config/s")).json() == {"compatibilityLevel": "NONE"}
    error(await client.delete("/config/s"), 404, 40401)
    assert (await client.delete("/config")).json() == {"compatibilityLevel": "FULL"}
    assert (await client.get("/config")).json() == {"compatibilityLevel": "BACKWARD"}


async def test_subject_level_config_governs_registration(client: httpx.AsyncClient) -> None:
    await register(client, "s", USER_V1)
    error(await register(client, "s", USER_BAD), 409, 40901)
    await client.put("/config/s", json={"compatibility": "NONE"})
    assert (await register(client, "s", USER_BAD)).status_code == 200
    await client.put("/config/t", json={"compatibility": "FORWARD"})
    await register(client, "t", USER_V1)
    # FORWARD: old reads new; adding a required field is fine, removing one is not.
    assert (await register(client, "t", USER_BAD)).status_code == 200
    error(await register(client, "t", avro([{"name": "age", "type": "int"}])), 409, 40901)


async def test_transitive_registration(client: httpx.AsyncClient) -> None:
    v1 = avro([{"name": "a", "type": "int"}, {"name": "b", "type": "int"}])
    v2 = avro([{"name": "b", "type": "int"}])
    v3 = avro([{"name": "a", "type": "string", "default": "x"}, {"name": "b", "type": "int"}])
    await client.put("/config/s", json={"compatibility": "BACKWARD_TRANSITIVE"})
    await register(client, "s", v1)
    await register(client, "s", v2)
    message = error(await register(client, "s", v3), 409, 40901)
    assert "oldSchemaVersion: 1" in message and "/fields/0/type" in message
    await client.put("/config/s", json={"compatibility": "BACKWARD"})
    assert (await register(client, "s", v3)).status_code == 200


def _fields(*specs: str) -> str:
    """A record from `name:type` specs; `name:type=default` gives the field a default."""
    fields: list[dict[str, Any]] = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        ftype, eq, default = rest.partition("=")
        field: dict[str, Any] = {"name": name, "type": ftype}
        if eq:
            field["default"] = json.loads(default)
        fields.append(field)
    return avro(fields)


# Per level: the live history, a schema the level refuses (409) and one it accepts. The
# transitive cases pass the latest version and fail only an older one.
LEVEL_CASES = [
    ("NONE", ["a:int"], None, _fields("a:string")),
    ("BACKWARD", ["a:int"], _fields("a:int", "b:int"), _fields("a:int", "b:int=0")),
    ("FORWARD", ["a:int"], _fields("b:int"), _fields("a:int", "b:int")),
    ("FULL", ["a:int"], _fields("a:int", "b:int"), _fields("a:int", "b:int=0")),
    (
        "BACKWARD_TRANSITIVE",
        ["a:int", "b:int=0"],
        _fields('a:string="x"', "b:int=0"),
        _fields("b:int=0", "c:int=0"),
    ),
    ("FORWARD_TRANSITIVE", ["a:int", "a:int=0"], _fields("b:int"), _fields("a:int", "b:int")),
    ("FULL_TRANSITIVE", ["a:int", "a:int=0"], _fields("b:int=0"), _fields("a:int", "b:int=0")),
]


@pytest.mark.parametrize(
    ("level", "history", "refused", "accepted"), LEVEL_CASES, ids=[c[0] for c in LEVEL_CASES]
)
async def test_each_level_set_on_a_subject_governs_registration(
    client: httpx.AsyncClient, level: str, history: list[str], refused: str | None, accepted: str
) -> None:
    await client.put("/config/s", json={"compatibility": "NONE"})
    for spec in history:
        assert (await register(client, "s", _fields(*spec.split(",")))).status_code == 200
    r = await client.put("/config/s", json={"compatibility": level})
    assert r.json() == {"compatibility": level}
    assert (await client.get("/config/s")).json() == {"compatibilityLevel": level}
    if refused is not None:
        message = error(await register(client, "s", refused), 409, 40901)
        assert f"{{compatibility: '{level}'}}" in message
    else:
        # NONE: even a schema that reads nothing of the old data is accepted.
        assert (await register(client, "s", _fields("a:boolean"))).status_code == 200
    assert (await register(client, "s", accepted)).status_code == 200


async def test_compatibility_endpoint(client: httpx.AsyncClient) -> None:
    r = await client.post("/compatibility/subjects/new/versions/latest", json={"schema": USER_V1})
    assert r.json() == {"is_compatible": True}
    await register(client, "s", USER_V1)
    r = await client.post("/compatibility/subjects/s/versions/latest", json={"schema": USER_V2})
    assert r.json() == {"is_compatible": True}
    r = await client.post(
        "/compatibility/subjects/s/versions/1?verbose=true", json={"schema": USER_V2}
    )
    assert r.json() == {"is_compatible": True}
    r = await client.post("/compatibility/subjects/s/versions/latest", json={"schema": USER_BAD})
    assert r.json() == {"is_compatible": False}
    r = await client.post(
        "/compatibility/subjects/s/versions?verbose=true", json={"schema": USER_BAD}
    )
    body = r.json()
    assert body["is_compatible"] is False
    assert any(
        "READER_FIELD_MISSING_DEFAULT_VALUE" in m and "/fields/1" in m for m in body["messages"]
    )
    error(
        await client.post("/compatibility/subjects/s/versions/5", json={"schema": USER_V2}),
        404,
        40402,
    )
    error(
        await client.post("/compatibility/subjects/s/versions/x", json={"schema": USER_V2}),
        422,
        42202,
    )
    error(
        await client.post("/compatibility/subjects/s/versions/latest", json={"schema": "{"}),
        422,
        42201,
    )


async def test_invalid_requests(client: httpx.AsyncClient) -> None:
    message = error(
        await register(client, "s", "syntax = 'proto3';", schemaType="PROTOBUF"), 422, 42201
    )
    assert "AVRO" in message and "PROTOBUF" in message
    error(
        await register(
            client,
            "s",
            json.dumps(
                {
                    "type": "record",
                    "name": "R",
                    "fields": [{"name": "a", "type": ["null", "int"], "default": 1}],
                }
            ),
        ),
        422,
        42201,
    )
    error(await client.post("/subjects/s/versions", json={}), 422, 42201)
    big = avro([{"name": f"f{i}", "type": "string", "doc": "x" * 100} for i in range(1000)])
    error(await register(client, "s", big), 422, 42209)
    error(await client.get("/nowhere"), 404, 404)
    error(await client.put("/schemas/types"), 405, 405)
    error(await client.get("/associations/resources/-/topic?resourceType=topic"), 404, 40410)
    error(await client.put("/config/bad%01subject", json={"compatibility": "NONE"}), 422, 42208)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/subjects/s/versions"),
        ("POST", "/subjects/s"),
        ("POST", "/compatibility/subjects/s/versions/latest"),
        ("PUT", "/config"),
        ("PUT", "/config/s"),
        ("PUT", "/mode"),
    ],
)
async def test_malformed_json_body_is_a_client_error(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    # Confluent (rest-utils' JsonParseExceptionMapper) answers 400 with error_code 400.
    r = await client.request(
        method, path, content=b"{not json", headers={"Content-Type": "application/json"}
    )
    message = error(r, 400, 400)
    assert "JSON" in message


async def test_percent_encoded_subjects(client: httpx.AsyncClient) -> None:
    subject = "team/orders:value"
    encoded = "team%2Forders%3Avalue"
    assert (
        await client.post(f"/subjects/{encoded}/versions", json={"schema": '"int"'})
    ).status_code == 200
    assert (await client.get("/subjects")).json() == [subject]
    assert (await client.get(f"/subjects/{encoded}/versions/latest")).json()["subject"] == subject


async def test_modes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/mode")).json() == {"mode": "READWRITE"}
    error(await client.get("/mode/s"), 404, 40409)
    assert (await client.get("/mode/s?defaultToGlobal=true")).json() == {"mode": "READWRITE"}
    error(await client.put("/mode", json={"mode": "SLEEPY"}), 422, 42204)
    await register(client, "s", USER_V1)
    assert (await client.put("/mode/s", json={"mode": "READONLY"})).json() == {"mode": "READONLY"}
    error(await register(client, "s", USER_V2), 422, 42205)
    error(await client.delete("/subjects/s"), 422, 42205)
    assert (await register(client, "other", USER_V2)).status_code == 200
    assert (await client.delete("/mode/s")).json() == {"mode": "READONLY"}
    error(await client.delete("/mode/s"), 404, 40401)
    # READONLY_OVERRIDE globally beats a subject's own READWRITE.
    await client.put("/mode/s", json={"mode": "READWRITE"})
    await client.put("/mode", json={"mode": "READONLY_OVERRIDE"})
    error(await register(client, "s", USER_V2), 422, 42205)
    await client.put("/mode", json={"mode": "READWRITE"})
    assert (await register(client, "s", USER_V2)).status_code == 200


async def test_import_mode_keeps_ids(client: httpx.AsyncClient) -> None:
    await register(client, "existing", USER_V1)
    error(await client.put("/mode", json={"mode": "IMPORT"}), 422, 42205)
    assert (await client.put("/mode?force=true", json={"mode": "IMPORT"})).json() == {
        "mode": "IMPORT"
    }
    # Without an id, IMPORT refuses plain registration; with one, it keeps it (and skips checks).
    error(await register(client, "imp", '"string"'), 422, 42205)
    assert (await register(client, "imp", '"string"', id=100, version=3)).json() == {"id": 100}
    assert (await client.get("/subjects/imp/versions")).json() == [3]
    assert (await register(client, "imp", USER_BAD, id=101)).json() == {"id": 101}
    error(await register(client, "imp2", '"long"', id=100), 422, 42207)
    await client.put("/mode", json={"mode": "READWRITE"})
    error(await register(client, "x", '"double"', id=500), 422, 42205)
    # New ids continue above every imported id.
    assert (await register(client, "x", '"double"')).json() == {"id": 102}


async def test_auth_on_api(app: Any) -> None:
    from tests.schema_registry.conftest import ADMIN_TOKEN, READ_TOKEN, WRITE_TOKEN

    def c(
        auth: httpx.Auth | None = None, headers: dict[str, str] | None = None
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://r", auth=auth, headers=headers
        )

    async with c() as anon:
        error(await anon.get("/subjects"), 401, 40101)
        assert (await anon.get("/")).status_code == 200
    async with c(headers={"Authorization": "Bearer wrong-token-123"}) as bad:
        error(await bad.get("/subjects"), 401, 40101)
    async with c(auth=httpx.BasicAuth("anyone", READ_TOKEN)) as reader:
        assert (await reader.get("/subjects")).status_code == 200
        error(await register(reader, "s", '"int"'), 403, 40301)
        error(await reader.put("/config", json={"compatibility": "NONE"}), 403, 40301)
        # Lookup and compatibility tests are reads.
        r = await reader.post("/compatibility/subjects/s/versions/latest", json={"schema": '"int"'})
        assert r.status_code == 200
    async with c(headers={"Authorization": f"Bearer {WRITE_TOKEN}"}) as writer:
        assert (await register(writer, "s", '"int"')).status_code == 200
    async with c(auth=httpx.BasicAuth("whoever", ADMIN_TOKEN)) as admin:
        assert (await admin.delete("/subjects/s")).status_code == 200
        # The id fast path checks scopes too.
        assert (await admin.get("/schemas/ids/1")).status_code == 200
    async with c(headers={"Authorization": "Basic !!!"}) as garbage:
        error(await garbage.get("/schemas/ids/1"), 401, 40101)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/config", {"compatibility": "NONE"}),
        ("DELETE", "/config", None),
        ("PUT", "/mode", {"mode": "READONLY"}),
    ],
)
async def test_global_config_and_mode_writes_need_the_admin_scope(
    app: Any, method: str, path: str, body: dict[str, str] | None
) -> None:
    from tests.schema_registry.conftest import ADMIN_TOKEN, WRITE_TOKEN

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://r",
        headers={"Authorization": f"Bearer {WRITE_TOKEN}"},
    ) as writer:
        message = error(await writer.request(method, path, json=body), 403, 40301)
        assert "admin" in message
        # The setting is unchanged, and the writer keeps its subject-level rights.
        assert (await writer.get("/config")).json() == {"compatibilityLevel": "BACKWARD"}
        assert (await writer.get("/mode")).json() == {"mode": "READWRITE"}
        assert (await writer.put("/config/s", json={"compatibility": "NONE"})).status_code == 200
        assert (await writer.put("/mode/s", json={"mode": "READWRITE"})).status_code == 200
        assert (await register(writer, "s", '"int"')).status_code == 200
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://r",
        auth=httpx.BasicAuth("anyone", ADMIN_TOKEN),
    ) as admin:
        assert (await admin.request(method, path, json=body)).status_code == 200


async def test_permanent_delete_evicts_the_id_cache(client: httpx.AsyncClient) -> None:
    await register(client, "s", USER_V1)
    assert (await client.get("/schemas/ids/1")).status_code == 200  # now cached
    await client.delete("/subjects/s")
    assert (await client.get("/schemas/ids/1")).status_code == 200  # soft: still served
    await client.delete("/subjects/s?permanent=true")
    error(await client.get("/schemas/ids/1"), 404, 40403)


class _ControlledTime:
    """The `time` module as schema_registry.app sees it, with `monotonic()` read from
    `now[0]` (advanced by the test); every other attribute is the real module's."""

    def __init__(self, now: list[float]) -> None:
        self._now = now

    def monotonic(self) -> float:
        return self._now[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_another_process_stops_serving_a_permanently_deleted_id(
    app: Any, storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two registry processes on one storage: the one that did not run the delete serves
    the id from memory only until its cache entry expires."""
    import schema_registry.app as registry_app
    from tests.schema_registry.conftest import ADMIN_TOKEN, TOKENS

    # A controlled clock instead of a short TTL and a sleep: the registry module reads
    # `time.monotonic()` (the id and auth caches); only its own `time` is replaced, so the
    # event loop and the storage keep the real clock. The entry keeps the real TTL.
    clock = [time.monotonic()]
    monkeypatch.setattr(registry_app, "time", _ControlledTime(clock))
    ttl = registry_app._ID_CACHE_TTL_S
    other = create_app(
        RegistrySettings(storage=storage_url, storage_pool_size=2), StaticTokenAuthenticator(TOKENS)
    )
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://a", headers=headers
            ) as first,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=other), base_url="http://b", headers=headers
            ) as second,
        ):
            schema_id = (await register(first, "s", USER_V1)).json()["id"]
            assert (await second.get(f"/schemas/ids/{schema_id}")).status_code == 200  # cached
            await first.delete("/subjects/s")
            await first.delete("/subjects/s?permanent=true")
            error(await first.get(f"/schemas/ids/{schema_id}"), 404, 40403)
            assert (await second.get(f"/schemas/ids/{schema_id}")).status_code == 200  # memory
            clock[0] += ttl - 1  # still within the TTL counted from when it was stored
            assert (await second.get(f"/schemas/ids/{schema_id}")).status_code == 200
            clock[0] += 2  # past it
            error(await second.get(f"/schemas/ids/{schema_id}"), 404, 40403)
    finally:
        other.close()
