"""The real Kafka broker of dev/kafka.sh: topics, idempotent produce, consume, transactions,
durability across a stop/start and across a SIGKILL.

Needs BILTEN_TEST_KAFKA_BOOTSTRAP (e.g. `dev/kafka.sh start` then
`export BILTEN_TEST_KAFKA_BOOTSTRAP=127.0.0.1:9092`); skips without it.
The restart tests stop and start the broker through dev/kafka.sh, so they only run when that
script manages the broker at BILTEN_TEST_KAFKA_BOOTSTRAP (same BILTEN_KAFKA_* environment),
and not at all with BILTEN_TEST_KAFKA_NO_RESTART=1 (e.g. while other suites share the broker).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

confluent_kafka = pytest.importorskip("confluent_kafka")
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition  # noqa: E402

pytestmark = pytest.mark.kafka

N_MESSAGES = 10_000
KAFKA_SH = Path(__file__).resolve().parents[2] / "dev" / "kafka.sh"


# ----------------------------------------------------------------------------- helpers


def idempotent_producer(bootstrap: str, **extra: object) -> Producer:
    conf: dict[str, object] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
    }
    conf.update(extra)
    return Producer(conf)


def make_consumer(bootstrap: str, group: str | None = None, **extra: object) -> Consumer:
    conf: dict[str, object] = {
        "bootstrap.servers": bootstrap,
        "group.id": group or f"infra-test-{uuid.uuid4().hex[:12]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
    }
    conf.update(extra)
    return Consumer(conf)


def value_of(i: int, tag: str = "m") -> bytes:
    # 200-byte values whose content depends on i, so a mix-up is detected.
    head = f"{tag}-{i:06d}|".encode()
    return head + bytes((i * 7 + j) % 251 for j in range(200 - len(head)))


def produce_acked(producer: Producer, topic: str, items: Iterable[tuple[bytes, bytes]]) -> dict:
    """Produce, flush, and return {(key, value): (partition, offset)} of acknowledged messages;
    fails on any delivery error."""
    acked: dict[tuple[bytes, bytes], tuple[int, int]] = {}
    errors: list[str] = []

    def on_delivery(err, msg) -> None:  # type: ignore[no-untyped-def]
        if err is not None:
            errors.append(str(err))
        else:
            acked[(msg.key(), msg.value())] = (msg.partition(), msg.offset())

    for key, value in items:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(60)
    assert remaining == 0, f"{remaining} messages still in flight after flush"
    assert not errors, f"delivery errors: {errors[:5]}"
    return acked


def consume_exactly(
    consumer: Consumer,
    expected: int,
    timeout: float = 90.0,
    settle: float = 2.0,
) -> list:
    """Consume until `expected` messages arrived, then keep polling `settle` seconds so any
    extra (duplicate, aborted) message shows up too."""
    out: list = []
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    while time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=500, timeout=0.5):
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, f"consumer error: {err}"
                continue
            out.append(msg)
        if len(out) >= expected:
            if settle_until is None:
                settle_until = time.monotonic() + settle
            elif time.monotonic() >= settle_until:
                break
    return out


def kafka_sh(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(KAFKA_SH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(autouse=True)
def _broker_lock(request: pytest.FixtureRequest, kafka_bootstrap: str) -> Iterator[None]:
    """Tests that restart the broker run alone: they hold an exclusive file lock, the others
    a shared one (this matters under pytest-xdist; other suites on the same broker are not
    covered, see BILTEN_TEST_KAFKA_NO_RESTART)."""
    exclusive = "managed_broker" in request.fixturenames
    name = "bilten-kafka-tests-" + kafka_bootstrap.replace(":", "_").replace("/", "_") + ".lock"
    with open(Path(tempfile.gettempdir()) / name, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


@pytest.fixture()
def managed_broker(kafka_bootstrap: str) -> Iterator[dict[str, str]]:
    """The dev/kafka.sh status of the broker at BILTEN_TEST_KAFKA_BOOTSTRAP; skips if that
    broker is not the one dev/kafka.sh manages. Makes sure it is running again afterwards."""
    if os.environ.get("BILTEN_TEST_KAFKA_NO_RESTART") == "1":
        pytest.skip("BILTEN_TEST_KAFKA_NO_RESTART=1: broker restart tests disabled")
    status = kafka_sh("status", timeout=30)
    fields = dict(part.split("=", 1) for part in status.stdout.split() if "=" in part)
    if status.returncode != 0 or fields.get("bootstrap") != kafka_bootstrap:
        pytest.skip(
            f"the broker at {kafka_bootstrap} is not run by dev/kafka.sh with this environment "
            f"(dev/kafka.sh status: {status.stdout.strip() or status.stderr.strip()})"
        )
    yield fields
    if kafka_sh("status", timeout=30).returncode != 0:
        kafka_sh("start")


def process_alive(pid: int) -> bool:
    """True while any thread of pid is alive: a killed JVM's group leader can be a zombie
    while its other threads (holding the sockets) still exit, and PID 1 may reap late."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def restart_via_script() -> None:
    stop = kafka_sh("stop")
    assert stop.returncode == 0, stop.stderr
    assert kafka_sh("status", timeout=30).returncode == 3
    start = kafka_sh("start")
    assert start.returncode == 0, start.stderr


# ----------------------------------------------------------------------------- tests


def test_topic_with_three_partitions(kafka_admin, new_topic: Callable[..., str]) -> None:
    topic = new_topic(3)
    md = kafka_admin.list_topics(topic=topic, timeout=10)
    assert topic in md.topics
    assert md.topics[topic].error is None
    assert sorted(md.topics[topic].partitions) == [0, 1, 2]
    for p in md.topics[topic].partitions.values():
        assert p.leader >= 0 and p.replicas == [p.leader]


def test_auto_create_is_disabled(kafka_bootstrap: str, kafka_admin) -> None:
    name = f"infra-test-nonexistent-{uuid.uuid4().hex[:8]}"
    consumer = make_consumer(kafka_bootstrap, **{"allow.auto.create.topics": True})
    try:
        consumer.list_topics(topic=name, timeout=10)
    finally:
        consumer.close()
    time.sleep(1)
    assert name not in kafka_admin.list_topics(timeout=10).topics


def test_idempotent_produce_and_consume_10k(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(3)
    sent = [(f"key-{i % 997}".encode(), value_of(i)) for i in range(N_MESSAGES)]
    producer = idempotent_producer(kafka_bootstrap)
    acked = produce_acked(producer, topic, sent)
    assert len(acked) == N_MESSAGES
    assert {p for p, _ in acked.values()} == {0, 1, 2}

    consumer = make_consumer(kafka_bootstrap)
    consumer.subscribe([topic])
    try:
        got = consume_exactly(consumer, N_MESSAGES)
        # watermarks: exactly N records in the log, no duplicates from retries
        total = 0
        for p in range(3):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        assert total == N_MESSAGES
    finally:
        consumer.close()

    assert len(got) == N_MESSAGES, f"consumed {len(got)} of {N_MESSAGES}"
    received = {(m.key(), m.value()): (m.partition(), m.offset()) for m in got}
    assert len(received) == N_MESSAGES, "duplicates consumed"
    assert received == acked  # same content, same partition and offset as acknowledged
    # per partition: contiguous offsets from 0, in production order, one key -> one partition
    by_partition: dict[int, list] = {}
    for m in got:
        by_partition.setdefault(m.partition(), []).append(m)
    key_partition: dict[bytes, int] = {}
    for p, msgs in by_partition.items():
        assert [m.offset() for m in msgs] == list(range(len(msgs)))
        seq = [int(m.value().split(b"|")[0].split(b"-")[1]) for m in msgs]
        assert seq == sorted(seq), f"partition {p} out of order"
        for m in msgs:
            assert key_partition.setdefault(m.key(), p) == p


def test_transactions_read_committed(kafka_bootstrap: str, new_topic: Callable[..., str]) -> None:
    topic = new_topic(3)
    producer = Producer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "transactional.id": f"infra-test-tx-{uuid.uuid4().hex[:12]}",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )
    producer.init_transactions(30)

    def txn(tag: str, n: int, commit: bool) -> None:
        producer.begin_transaction()
        for i in range(n):
            producer.produce(topic, key=f"{tag}-{i % 10}".encode(), value=value_of(i, tag))
            producer.poll(0)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.flush(30)  # the aborted records really reach the log
            producer.abort_transaction(30)

    txn("c1", 300, commit=True)
    txn("ab", 200, commit=False)
    txn("c2", 300, commit=True)

    committed = {value_of(i, t) for t in ("c1", "c2") for i in range(300)}
    aborted = {value_of(i, "ab") for i in range(200)}

    rc = make_consumer(kafka_bootstrap, **{"isolation.level": "read_committed"})
    rc.subscribe([topic])
    try:
        got_rc = [m.value() for m in consume_exactly(rc, len(committed), settle=3.0)]
    finally:
        rc.close()
    assert len(got_rc) == len(committed)
    assert set(got_rc) == committed

    ru = make_consumer(kafka_bootstrap, **{"isolation.level": "read_uncommitted"})
    ru.subscribe([topic])
    try:
        got_ru = [m.value() for m in consume_exactly(ru, len(committed) + len(aborted))]
    finally:
        ru.close()
    assert len(got_ru) == len(committed) + len(aborted)
    assert set(got_ru) == committed | aborted


def test_acknowledged_messages_survive_stop_start(
    kafka_bootstrap: str, new_topic: Callable[..., str], managed_broker: dict[str, str]
) -> None:
    topic = new_topic(3)
    group = f"infra-test-durable-{uuid.uuid4().hex[:8]}"
    first = [(f"k{i % 31}".encode(), value_of(i, "before")) for i in range(5_000)]
    acked = produce_acked(idempotent_producer(kafka_bootstrap), topic, first)
    assert len(acked) == len(first)

    # a group reads part of it and commits its offsets
    consumer = make_consumer(kafka_bootstrap, group)
    consumer.subscribe([topic])
    try:
        part = consume_exactly(consumer, 1_000, settle=0.0)
        assert len(part) >= 1_000
        consumer.commit(asynchronous=False)
        committed = {
            tp.partition: tp.offset
            for tp in consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
        }
    finally:
        consumer.close()

    restart_via_script()

    # every acknowledged message is back, at the same partition and offset
    fresh = make_consumer(kafka_bootstrap)
    fresh.subscribe([topic])
    try:
        got = consume_exactly(fresh, len(acked))
    finally:
        fresh.close()
    assert {(m.key(), m.value()): (m.partition(), m.offset()) for m in got} == acked
    assert len(got) == len(acked)

    # the group's committed offsets survived too
    resumed = make_consumer(kafka_bootstrap, group)
    try:
        after = {
            tp.partition: tp.offset
            for tp in resumed.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
        }
        assert after == committed
        resumed.subscribe([topic])
        rest = consume_exactly(resumed, len(acked) - sum(max(o, 0) for o in committed.values()))
        assert all(m.offset() >= committed[m.partition()] for m in rest)
        assert len(rest) == len(acked) - sum(max(o, 0) for o in committed.values())
    finally:
        resumed.close()

    # and the restarted broker takes new writes
    more = produce_acked(
        idempotent_producer(kafka_bootstrap), topic, [(b"after", value_of(1, "after"))]
    )
    assert len(more) == 1


def test_acknowledged_messages_survive_sigkill(
    kafka_bootstrap: str, new_topic: Callable[..., str], managed_broker: dict[str, str]
) -> None:
    topic = new_topic(3)
    items = [(f"k{i % 17}".encode(), value_of(i, "kill")) for i in range(3_000)]
    acked = produce_acked(idempotent_producer(kafka_bootstrap), topic, items)
    assert len(acked) == len(items)

    pid = int(managed_broker["pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(pid)
    assert kafka_sh("status", timeout=30).returncode == 3
    start = kafka_sh("start")
    assert start.returncode == 0, start.stderr

    consumer = make_consumer(kafka_bootstrap)
    consumer.subscribe([topic])
    try:
        got = consume_exactly(consumer, len(acked))
    finally:
        consumer.close()
    assert {(m.key(), m.value()): (m.partition(), m.offset()) for m in got} == acked
    assert len(got) == len(acked)
