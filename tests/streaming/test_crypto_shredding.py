"""Crypto-shredding end to end on the real broker: events of two subjects through the
Kafka event log (PII sealed), the processor into a store, an erasure of subject A through
the compliance domain, then the raw topic, the ciphertexts and a fresh processor re-reading
the topic from offset 0."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from services.compliance.consent import ConsentRegistry
from services.compliance.erasure import ErasureService
from services.compliance.pii_cipher import PiiCipher
from services.compliance.subject_keys import SubjectKeyStore
from services.storage.event_store import DuckDBEventStore
from services.storage.metadata_store import SQLiteMetadataStore
from services.streaming import avro_envelope as envelope
from services.streaming.codec import decode_bodies
from services.streaming.kafka_log import KafkaEventLog
from services.streaming.pii import PiiOpener, PiiSealer
from services.streaming.processor import ProcessorConfig, StreamProcessor
from services.streaming.schemas import EnvelopeSchemaId, WriterSchemas
from services.streaming.topics import TopicLayout
from tests.streaming.conftest import REGISTRY_TOKEN, consume_all, event

SECRET = "crypto-shredding-test-kek-0123456789"
PERSONAL_SCHEMA_ID = 7


def _processor(
    bootstrap: str,
    layout: TopicLayout,
    registry_url: str,
    store: DuckDBEventStore,
    keys: SubjectKeyStore,
) -> StreamProcessor:
    return StreamProcessor(
        ProcessorConfig(
            bootstrap=bootstrap,
            topic=layout.events.name,
            dead_letter_topic=layout.dead_letter.name,
            group_id=f"test-processor-{uuid.uuid4().hex[:8]}",
            session_timeout_ms=6000,
            max_batch_seconds=0.1,
        ),
        store,
        WriterSchemas(registry_url, REGISTRY_TOKEN),
        pii=PiiOpener(PiiCipher(keys)),
    )


def _wait_count(store: DuckDBEventStore, expected: int, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while store.read("SELECT count(*) FROM tracked_events").column(0)[0].as_py() < expected:
        assert time.monotonic() < deadline, f"store never reached {expected} events"
        time.sleep(0.1)


def _rows(store: DuckDBEventStore) -> dict[str, dict[str, object]]:
    table = store.read(
        "SELECT event_id, user_id, anonymous_id, ip_hash, browser_family, device_type,"
        " properties_json FROM tracked_events"
    )
    return {row["event_id"]: row for row in table.to_pylist()}


@pytest.mark.kafka
async def test_erasure_shreds_the_subjects_copies_in_the_topic(
    kafka_bootstrap: str,
    registry_url: str,
    topics: Callable[..., TopicLayout],
    tmp_path: Path,
) -> None:
    layout = topics(partitions=3)
    topic = layout.events.name
    run = uuid.uuid4().hex[:8]
    alice, alice_anon = f"alice-{run}@example.org", f"alice-device-{run}"
    bob, bob_anon = f"bob-{run}@example.org", f"bob-device-{run}"
    tenant = "tenant_a"

    def subject_event(i: int, user: str, anon: str, prefix: str) -> object:
        base = event(i, tenant=tenant, prefix=prefix)
        return replace(
            base,
            user_id=user,
            anonymous_id=anon,
            schema_id=PERSONAL_SCHEMA_ID,
            properties_json=json.dumps({"email": user, "seat": f"A{i}"}),
            enrichment=replace(base.enrichment, ip_hash=f"iphash-{prefix}-{run}"),
        )

    alice_events = [
        subject_event(i, alice, alice_anon if i % 2 else "", "alice") for i in range(40)
    ]
    bob_events = [subject_event(i, bob, bob_anon if i % 2 else "", "bob") for i in range(30)]
    total = len(alice_events) + len(bob_events)
    plaintexts = [
        alice.encode(),
        alice_anon.encode(),
        bob.encode(),
        bob_anon.encode(),
        f"iphash-alice-{run}".encode(),
        f"iphash-bob-{run}".encode(),
    ]

    keys = SubjectKeyStore(tmp_path / "subject_keys.sqlite3", SECRET)
    cipher = PiiCipher(keys)
    personal = {PERSONAL_SCHEMA_ID: frozenset({"email"})}
    log = KafkaEventLog(
        bootstrap=kafka_bootstrap,
        layout=layout,
        schema_id=EnvelopeSchemaId(registry_url, REGISTRY_TOKEN, topic),
        create_topics=False,
        pii=PiiSealer(cipher, lambda schema_id: personal.get(schema_id, frozenset())),
    )
    assert await log.start()
    try:
        # Interleaved, in several appends (small ones run the sealing in a thread too).
        mixed = [e for pair in zip(alice_events, bob_events, strict=False) for e in pair]
        mixed += alice_events[len(bob_events) :]
        for start in range(0, len(mixed), 25):
            await log.append(mixed[start : start + 25])
    finally:
        await log.close()

    def raw_topic() -> list[bytes]:
        messages = consume_all(kafka_bootstrap, topic, total, settle=0.5)
        assert len(messages) == total
        return [bytes(m.value()) + bytes(m.key()) for m in messages]

    # (a) the raw records never hold either subject's ids or IP hash in clear.
    before = raw_topic()
    for needle in plaintexts:
        assert not any(needle in raw for raw in before), needle

    # The processor opens them into the store: plaintext there, as without shredding.
    first_store = DuckDBEventStore(tmp_path / "events.duckdb")
    first = _processor(kafka_bootstrap, layout, registry_url, first_store, keys)
    first.start()
    try:
        _wait_count(first_store, total)
    finally:
        first.stop()
    stored = _rows(first_store)
    assert stored["alice-1"]["user_id"] == alice and stored["alice-1"]["anonymous_id"] == alice_anon
    assert stored["alice-1"]["ip_hash"] == f"iphash-alice-{run}"
    assert stored["alice-1"]["browser_family"] == "Firefox"
    assert json.loads(str(stored["alice-1"]["properties_json"])) == {"email": alice, "seat": "A1"}
    assert first.stats.sealed_events == total and first.stats.anonymised_events == 0

    # Erase subject A through the compliance domain.
    metadata = SQLiteMetadataStore(tmp_path / "metadata.sqlite3")
    erasure = ErasureService(
        metadata, first_store, ConsentRegistry(metadata), [f"Kafka topic {topic}"], keys=keys
    )
    done = erasure.create(tenant, "req-a", alice)
    assert done.state == "DONE", done.error_message
    assert any("data key destroyed" in line for line in done.certificate)
    assert any(
        f"Kafka topic {topic}: the subject's events sealed since" in line
        for line in done.certificate
    )
    remaining = _rows(first_store)
    assert all(not row_id.startswith("alice-") for row_id in remaining)
    assert len(remaining) == len(bob_events)
    first_store.close()

    # (a) again, and (b): A's records no longer open, B's do.
    after = raw_topic()
    for needle in plaintexts:
        assert not any(needle in raw for raw in after), needle
    messages = consume_all(kafka_bootstrap, topic, total, settle=0.5)
    decoded = decode_bodies([m.value() for m in messages], envelope.HEADER_SIZE)
    assert decoded.rejected == []
    ids = decoded.table.column("event_id").to_pylist()
    seals = decoded.sealed.to_pylist()
    opened_alice = opened_bob = 0
    for event_id, seal in zip(ids, seals, strict=True):
        assert seal["pii_key_ids"] and seal["subject_token"]
        ciphertexts = {
            "user_id": seal["pii_user_id"],
            "anonymous_id": seal["pii_anonymous_id"],
            "ip_hash": seal["pii_ip_hash"],
            "user_agent": seal["pii_user_agent"],
            "properties": seal["pii_properties"],
        }
        opened = cipher.open(tenant, event_id, seal["pii_key_ids"], ciphertexts)
        if event_id.startswith("alice-"):
            assert opened is None, event_id
        else:
            assert opened is not None and opened["user_id"] == bob
            opened_bob += 1
        opened_alice += event_id.startswith("alice-")
    assert (opened_alice, opened_bob) == (len(alice_events), len(bob_events))
    # Distinct subject tokens still count two actors (aggregates without identities).
    assert len({s["subject_token"] for s in seals}) == 2

    # (c) a fresh processor from offset 0 into a new store: A anonymised, B intact, all counted.
    second_store = DuckDBEventStore(tmp_path / "replayed.duckdb")
    second = _processor(kafka_bootstrap, layout, registry_url, second_store, keys)
    second.start()
    try:
        _wait_count(second_store, total)
    finally:
        second.stop()
    replayed = _rows(second_store)
    assert len(replayed) == total
    assert second.stats.anonymised_events == len(alice_events)
    assert second.stats.dead_lettered == 0
    for event_id, row in replayed.items():
        if event_id.startswith("alice-"):
            assert row["user_id"] == row["anonymous_id"] == row["ip_hash"] == "", row
            assert row["browser_family"] == row["device_type"] == ""
            assert json.loads(str(row["properties_json"])) == {"seat": f"A{event_id.split('-')[1]}"}
        else:
            assert row["user_id"] == bob and row["ip_hash"] == f"iphash-bob-{run}"
            assert json.loads(str(row["properties_json"]))["email"] == bob
    text = str(second_store.read("SELECT * FROM tracked_events").to_pylist())
    assert alice not in text and alice_anon not in text and f"iphash-alice-{run}" not in text
    second_store.close()
    keys.close()


def test_the_sealed_envelope_is_a_backward_compatible_evolution(registry_url: str) -> None:
    """v1 (without the sealed fields) registered first, then the current envelope under
    the same subject: the registry's BACKWARD rule accepts it."""
    topic = f"test.streaming.compat.{uuid.uuid4().hex[:8]}"
    v1 = dict(envelope.ENVELOPE_SCHEMA)
    v1["fields"] = [
        f
        for f in envelope.ENVELOPE_SCHEMA["fields"]
        if f["name"] not in envelope.SEALED_FIELD_NAMES
    ]
    client = SchemaRegistryClient(envelope.registry_client_conf(registry_url, REGISTRY_TOKEN))
    subject = envelope.subject_for(topic)
    assert client.get_compatibility(subject_name=None) in ("BACKWARD", "BACKWARD_TRANSITIVE")
    first = client.register_schema(subject, Schema(json.dumps(v1), "AVRO"))
    second = envelope.register_envelope_schema(registry_url, REGISTRY_TOKEN, topic)
    assert first != second
    assert [v for v in client.get_versions(subject)] == [1, 2]


@pytest.mark.kafka
@pytest.mark.integration
async def test_one_process_kafka_shape_seals_and_erasure_over_grpc_shreds(
    kafka_bootstrap: str, registry_url: str, tmp_path: Path
) -> None:
    """`up --event-log kafka` with BILTEN_CRYPTO_SHREDDING=true, without Envoy: gRPC
    ingestion → sealed Kafka records → processor → store; CreateErasureRequest destroys
    the key and certifies the topic's copies as undecipherable."""
    import asyncio
    import time

    import grpc
    from bilten.analytics.compliance.v1 import compliance_service_pb2 as cpb
    from bilten.analytics.compliance.v1 import compliance_service_pb2_grpc as c_grpc
    from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as ipb
    from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as i_grpc

    from services.mesh import Mesh
    from services.platform.auth import ROLE_SCOPES, Role
    from services.platform.settings import PlatformSettings
    from tests.conftest import tracked_event

    topic = f"test.shredding.{time.time_ns()}"
    run = uuid.uuid4().hex[:8]
    gina, hugo = f"gina-{run}", f"hugo-{run}"
    settings = PlatformSettings(
        data_dir=tmp_path,
        grpc_port=0,
        metrics_port=0,
        event_log="kafka",
        crypto_shredding=True,
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_events_topic=topic,
        kafka_events_partitions=2,
        schema_registry_url=registry_url,
        schema_registry_token=REGISTRY_TOKEN,
        processor_group_id=f"test-shredding-{time.time_ns()}",
        processor_session_timeout_ms=6000,
    )
    mesh = Mesh.open(settings)
    assert mesh.streaming is not None and mesh.streaming.subject_keys is not None
    port = await mesh.start(("ingestion", "query", "compliance"))
    credentials = mesh.ensure_dev_credentials()
    tenant = credentials["tenant_id"]
    write = (("authorization", f"Bearer {credentials['write_key']}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            events = [
                tracked_event("page_view", user_id=gina if i % 2 else hugo, event_id=f"e{i}")
                for i in range(20)
            ]
            response = await i_grpc.IngestionServiceStub(channel).IngestEvents(
                ipb.IngestEventsRequest(events=events), metadata=write
            )
            assert response.accepted_count == 20
            deadline = time.monotonic() + 60
            while mesh.event_store.count(tenant) < 20:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            users = mesh.event_store.read("SELECT DISTINCT user_id FROM tracked_events")
            assert sorted(users.column(0).to_pylist()) == sorted([gina, hugo])
            raw = [bytes(m.value()) for m in consume_all(kafka_bootstrap, topic, 20, settle=0.5)]
            assert len(raw) == 20 and not any(gina.encode() in r or hugo.encode() in r for r in raw)

            token = mesh.tokens.issue(
                "officer",
                tenant,
                ROLE_SCOPES[Role.COMPLIANCE_OFFICER],
                ttl_seconds=600,
                single_use=True,
            )
            created = await c_grpc.ComplianceServiceStub(channel).CreateErasureRequest(
                cpb.CreateErasureRequestRequest(request_id="erase-gina", subject_id=gina),
                metadata=(("authorization", f"Bearer {token}"),),
            )
            request = created.erasure_request
            assert request.state == cpb.ERASURE_STATE_DONE, request.error_message
            lines = "\n".join(request.certificate_lines)
            assert "10 rows deleted" in lines and "data key destroyed" in lines
            assert f"Kafka topic {topic}: the subject's events sealed since" in lines
            assert mesh.streaming.subject_keys.get(tenant, gina) is None
            assert mesh.streaming.subject_keys.get(tenant, hugo) is not None
    finally:
        await mesh.stop()


def test_personal_marks_survive_the_registry(registry_url: str) -> None:
    """A definition's `"personal": true` attributes come back from our registry by id,
    which is how the Kafka log finds the properties to seal."""
    from services.streaming.schemas import PersonalFieldsById

    definition = {
        "type": "record",
        "name": "signup",
        "fields": [
            {"name": "email", "type": "string", "personal": True},
            {"name": "plan", "type": "string", "default": "free"},
        ],
    }
    client = SchemaRegistryClient(envelope.registry_client_conf(registry_url, REGISTRY_TOKEN))
    schema_id = client.register_schema(
        f"events.tenant_a.signup_{uuid.uuid4().hex[:8]}", Schema(json.dumps(definition), "AVRO")
    )
    lookup = PersonalFieldsById(registry_url, REGISTRY_TOKEN)
    assert lookup(schema_id) == frozenset({"email"})
    assert lookup(0) == frozenset()
