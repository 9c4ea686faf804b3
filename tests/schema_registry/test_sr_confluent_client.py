"""confluent-kafka's own client, serializer and deserializer against a live registry."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from confluent_kafka.schema_registry import Schema, SchemaReference, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from schema_registry.app import RegistryApp
from tests.schema_registry.conftest import ADMIN_TOKEN, READ_TOKEN
from tests.schema_registry.live_server import serve

pytestmark = pytest.mark.integration

TOPIC = "orders"
CTX = SerializationContext(TOPIC, MessageField.VALUE)
ORDER_V1 = json.dumps(
    {
        "type": "record",
        "name": "Order",
        "namespace": "bilten.shop",
        "fields": [
            {"name": "id", "type": "long"},
            {
                "name": "amount",
                "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2},
            },
            {
                "name": "status",
                "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]},
            },
        ],
    }
)
ORDER_V2 = json.dumps(
    {
        "type": "record",
        "name": "Order",
        "namespace": "bilten.shop",
        "fields": [
            *json.loads(ORDER_V1)["fields"],
            {"name": "coupon", "type": ["null", "string"], "default": None},
        ],
    }
)
ORDER_V3_BAD = json.dumps(
    {
        "type": "record",
        "name": "Order",
        "namespace": "bilten.shop",
        "fields": [
            {"name": "id", "type": "string"},
            {
                "name": "amount",
                "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2},
            },
        ],
    }
)


@pytest.fixture
def url(app: RegistryApp) -> Iterator[str]:
    with serve(app) as base:
        yield base


def sr(url: str, token: str = ADMIN_TOKEN) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": url, "basic.auth.user.info": f"any-user:{token}"})


def test_serialize_deserialize_and_wire_format(url: str) -> None:
    from decimal import Decimal

    client = sr(url)
    serializer = AvroSerializer(client, ORDER_V1)
    payload = serializer({"id": 7, "amount": Decimal("12.50"), "status": "PAID"}, CTX)
    assert payload is not None
    # Confluent framing: magic byte 0, then the schema id as 4 big-endian bytes.
    assert payload[0] == 0
    schema_id = int.from_bytes(payload[1:5], "big")
    registered = client.get_latest_version(f"{TOPIC}-value")
    assert registered.schema_id == schema_id
    assert registered.version == 1
    # A fresh client (empty caches) decodes by fetching the writer schema by id.
    decoded = AvroDeserializer(sr(url))(payload, CTX)
    assert decoded == {"id": 7, "amount": Decimal("12.50"), "status": "PAID"}


def test_schema_evolution_old_data_new_reader(url: str) -> None:
    from decimal import Decimal

    client = sr(url)
    old_bytes = AvroSerializer(client, ORDER_V1)(
        {"id": 1, "amount": Decimal("1.00"), "status": "NEW"}, CTX
    )
    # v2 adds an optional field: accepted under the default BACKWARD level.
    v2_id = client.register_schema(f"{TOPIC}-value", Schema(ORDER_V2, "AVRO"))
    assert client.get_versions(f"{TOPIC}-value") == [1, 2]
    new_bytes = AvroSerializer(client, ORDER_V2)(
        {"id": 2, "amount": Decimal("2.00"), "status": "PAID", "coupon": "X"}, CTX
    )
    assert new_bytes is not None and int.from_bytes(new_bytes[1:5], "big") == v2_id
    # A consumer with the v2 reader schema reads v1 data: the default fills the new field.
    reader = AvroDeserializer(sr(url), ORDER_V2)
    assert reader(old_bytes, CTX) == {
        "id": 1,
        "amount": Decimal("1.00"),
        "status": "NEW",
        "coupon": None,
    }
    assert reader(new_bytes, CTX)["coupon"] == "X"
    # An incompatible v3 is refused with 409 / 40901.
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(f"{TOPIC}-value", Schema(ORDER_V3_BAD, "AVRO"))
    assert refused.value.http_status_code == 409
    assert refused.value.error_code == 40901
    assert client.test_compatibility(f"{TOPIC}-value", Schema(ORDER_V3_BAD, "AVRO")) is False
    assert client.test_compatibility(f"{TOPIC}-value", Schema(ORDER_V2, "AVRO")) is True


def test_client_api_surface(url: str) -> None:
    client = sr(url)
    subject = "payments-value"
    sid = client.register_schema(subject, Schema(ORDER_V1, "AVRO"))
    assert client.register_schema("copy-value", Schema(ORDER_V1, "AVRO")) == sid
    found = client.lookup_schema(subject, Schema(ORDER_V1, "AVRO"))
    assert (found.schema_id, found.version, found.subject) == (sid, 1, subject)
    assert json.loads(client.get_schema(sid).schema_str) == json.loads(ORDER_V1)
    assert client.get_schema_types() == ["AVRO"]
    assert sorted(client.get_subjects()) == ["copy-value", subject]
    assert client.get_subjects_by_schema_id(sid) == ["copy-value", subject]
    versions = client.get_schema_versions(sid)
    assert {(v.subject, v.version) for v in versions} == {("copy-value", 1), (subject, 1)}
    assert client.get_version(subject, 1).schema_id == sid
    assert client.get_compatibility() == "BACKWARD"
    assert client.set_compatibility(subject, "FULL") == {"compatibility": "FULL"}
    assert client.get_compatibility(subject) == "FULL"
    assert client.get_config(subject).compatibility_level.value == "FULL"
    assert client.delete_config(subject).compatibility_level.value == "FULL"
    assert client.get_global_mode() == "READWRITE"
    assert client.update_mode(subject, "READONLY") == "READONLY"
    assert client.get_mode(subject) == "READONLY"
    assert client.delete_mode(subject) == "READONLY"
    assert client.delete_subject("copy-value") == [1]
    assert client.delete_subject("copy-value", permanent=True) == [1]
    assert client.get_subjects(deleted=True) == [subject]
    # References through the client.
    status = json.dumps(
        {"type": "enum", "name": "Currency", "namespace": "bilten", "symbols": ["EUR", "USD"]}
    )
    client.register_schema("currency", Schema(status, "AVRO"))
    price = json.dumps(
        {
            "type": "record",
            "name": "Price",
            "namespace": "bilten",
            "fields": [{"name": "currency", "type": "Currency"}],
        }
    )
    ref = SchemaReference("bilten.Currency", "currency", 1)
    price_id = client.register_schema("price", Schema(price, "AVRO", [ref]))
    assert client.get_referenced_by("currency", 1) == [price_id]
    fetched = client.get_schema(price_id)
    assert [(r.name, r.subject, r.version) for r in fetched.references] == [
        ("bilten.Currency", "currency", 1)
    ]


def test_auth_with_confluent_clients(url: str) -> None:
    bearer = SchemaRegistryClient(
        {
            "url": url,
            "bearer.auth.credentials.source": "STATIC_TOKEN",
            "bearer.auth.token": ADMIN_TOKEN,
            "bearer.auth.logical.cluster": "lsrc-local",
            "bearer.auth.identity.pool.id": "pool-local",
        }
    )
    assert bearer.register_schema("auth-value", Schema('"string"', "AVRO")) >= 1
    reader = sr(url, READ_TOKEN)
    assert reader.get_latest_version("auth-value").version == 1
    with pytest.raises(SchemaRegistryError) as forbidden:
        reader.register_schema("auth-value", Schema('"bytes"', "AVRO"))
    assert (forbidden.value.http_status_code, forbidden.value.error_code) == (403, 40301)
    with pytest.raises(SchemaRegistryError) as unauthorized:
        sr(url, "not-a-valid-token").get_subjects()
    assert (unauthorized.value.http_status_code, unauthorized.value.error_code) == (401, 40101)


def test_serializer_without_auto_register_uses_lookup_and_latest(url: str) -> None:
    client = sr(url)
    client.register_schema(f"{TOPIC}-value", Schema(ORDER_V1, "AVRO"))
    lookup = AvroSerializer(client, ORDER_V1, conf={"auto.register.schemas": False})
    from decimal import Decimal

    record = {"id": 3, "amount": Decimal("3.00"), "status": "NEW"}
    payload = lookup(record, CTX)
    assert payload is not None and payload[0] == 0
    latest = AvroSerializer(
        sr(url), None, conf={"auto.register.schemas": False, "use.latest.version": True}
    )
    assert latest(record, CTX) == payload
    with pytest.raises(Exception, match=r"40403|not found|Schema not found"):
        AvroSerializer(sr(url), ORDER_V2, conf={"auto.register.schemas": False})(
            {**record, "coupon": None}, CTX
        )
