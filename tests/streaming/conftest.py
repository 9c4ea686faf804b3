"""Fixtures of the streaming tests: the real Kafka broker, our schema registry on a free
port, unique topics, events, and private brokers for the tests that stop one.

Tests marked `kafka` need BILTEN_TEST_KAFKA_BOOTSTRAP (`make test` sets it; by hand:
`bash dev/kafka.sh start && eval "$(bash dev/kafka.sh env)"`) and skip without it. Every
test uses its own topics and consumer group, so the suite runs under `-n 2` next to other
suites on the same broker; the shared broker is never stopped: tests that stop a broker
start a private one (`private_broker`) with dev/kafka.sh on free ports and their own dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from schema_registry.app import create_app
from schema_registry.auth import StaticTokenAuthenticator
from schema_registry.settings import RegistrySettings
from services.events.model import Enrichment, EventSource, TrackedEvent, TrackedEventType
from services.streaming.topics import TopicLayout, build_layout, ensure_topics
from tests.conftest import free_port
from tests.schema_registry.live_server import serve

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "dev" / "kafka.sh"
REGISTRY_TOKEN = "streaming-test-admin-token"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    bootstrap = os.environ.get("BILTEN_TEST_KAFKA_BOOTSTRAP", "").strip()
    if not bootstrap:
        pytest.skip(
            "BILTEN_TEST_KAFKA_BOOTSTRAP is unset: `bash dev/kafka.sh start` and "
            'eval "$(bash dev/kafka.sh env)" (make test does this)'
        )
    return bootstrap


@pytest.fixture(scope="session")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Our Confluent-compatible registry over real HTTP, auth on (a static admin token)."""
    path = tmp_path_factory.mktemp("registry") / "registry.db"
    app = create_app(
        RegistrySettings(storage=f"sqlite:///{path}"),
        StaticTokenAuthenticator({REGISTRY_TOKEN: ["admin"]}),
    )
    try:
        with serve(app) as url:
            yield url
    finally:
        app.close()


@pytest.fixture()
def topic_name() -> str:
    return f"test.streaming.{uuid.uuid4().hex[:12]}"


def make_layout(topic: str, partitions: int = 3) -> TopicLayout:
    return build_layout(topic, partitions=partitions)


@pytest.fixture()
def topics(kafka_bootstrap: str) -> Iterator[Callable[..., TopicLayout]]:
    """Factory: a unique events topic (+ its .dlq) created on the shared broker, deleted after."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def make(partitions: int = 3) -> TopicLayout:
        layout = make_layout(f"test.streaming.{uuid.uuid4().hex[:12]}", partitions)
        ensure_topics(admin, layout)
        created.extend(spec.name for spec in layout.all)
        return layout

    yield make
    if created:
        for future in admin.delete_topics(created, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                future.result(timeout=30)


def event(
    i: int,
    *,
    tenant: str = "tenant_a",
    prefix: str = "e",
    now: datetime | None = None,
    conversion: bool | None = None,
) -> TrackedEvent:
    """A varied, valid tracked event with a unique id per (prefix, i)."""
    now = now or datetime.now(UTC)
    is_conversion = (i % 5 == 0) if conversion is None else conversion
    return TrackedEvent(
        tenant_id=tenant,
        event_id=f"{prefix}-{i}",
        event_type=TrackedEventType.CONVERSION if is_conversion else TrackedEventType.PAGE_VIEW,
        event_name="ticket_purchased" if is_conversion else "page_view",
        occurred_at=now - timedelta(seconds=i % 3600),
        received_at=now,
        source=EventSource.WEB,
        session_id=f"s{i % 50}",
        user_id=f"user-{i % 97}" if i % 7 else "",
        anonymous_id=f"anon-{i % 13}" if i % 2 else "",
        page_url=f"https://bilten.example/events/{i % 11}",
        page_title="Konzert, Tickets ✓ für Groß & Klein" if i % 3 == 0 else "",
        ticketed_event_id=f"concert-{i % 4}",
        order_id=f"order-{i}" if is_conversion and i % 2 else "",
        revenue=Decimal("49.990001") if is_conversion else Decimal(0),
        currency="EUR" if is_conversion else "",
        quantity=2 if is_conversion else 0,
        properties_json='{"seat": "A12", "tier": "vip"}' if i % 4 == 0 else "{}",
        enrichment=Enrichment(
            ip_hash="ab12cd34ef56ab78",
            country_code=("DE", "FR", "")[i % 3],
            browser_family="Firefox",
            browser_version="120",
            os_family="Linux",
            device_type="desktop",
        ),
    )


def consume_all(
    bootstrap: str, topic: str, expected: int, timeout: float = 60.0, settle: float = 1.0
) -> list[Any]:
    """Every record of `topic` (read_committed): waits for `expected`, then `settle` more."""
    from confluent_kafka import Consumer, KafkaError

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.2):
                if message.error() is not None:
                    assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                    continue
                out.append(message)
            if len(out) >= expected:
                settle_until = settle_until or time.monotonic() + settle
                if time.monotonic() >= settle_until:
                    break
    finally:
        consumer.close()
    return out


# --- a private broker (for the tests that stop one) ---------------------------------


@dataclass
class PrivateBroker:
    bootstrap: str
    env: dict[str, str]
    directory: Path

    def run(self, command: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(KAFKA_SH), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        done = self.run("start")
        assert done.returncode == 0, done.stderr[-3000:]

    def stop(self) -> None:
        done = self.run("stop")
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture()
def private_broker(kafka_bootstrap: str) -> Iterator[PrivateBroker]:
    """A broker of our own (dev/kafka.sh, free ports, own dir, 512 MB heap), stopped and
    deleted afterwards. Needs the shared broker's env only to skip consistently."""
    directory = Path(tempfile.mkdtemp(prefix="bilten-streaming-kafka-"))
    port, controller = free_port(), free_port()
    env = {
        **os.environ,
        "BILTEN_KAFKA_PORT": str(port),
        "BILTEN_KAFKA_CONTROLLER_PORT": str(controller),
        "BILTEN_KAFKA_DIR": str(directory),
        "BILTEN_KAFKA_HEAP": "512m",
    }
    broker = PrivateBroker(f"127.0.0.1:{port}", env, directory)
    broker.start()
    try:
        yield broker
    finally:
        broker.run("stop")
        shutil.rmtree(directory, ignore_errors=True)
