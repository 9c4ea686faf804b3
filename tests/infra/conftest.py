"""Fixtures for the infrastructure tests (dev/kafka.sh, dev/redis.sh).

These tests need real servers and never start them themselves: CI (or a developer) runs
`dev/kafka.sh start` / `dev/redis.sh start` first and exports
  BILTEN_TEST_KAFKA_BOOTSTRAP=127.0.0.1:9092
  BILTEN_TEST_REDIS_URL=redis://127.0.0.1:56379/0
Without them the tests skip, saying which variable is missing.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # `kafka` is registered in pyproject.toml; `redis` is not (yet).
    config.addinivalue_line("markers", "redis: needs a real Redis server")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    bootstrap = os.environ.get("BILTEN_TEST_KAFKA_BOOTSTRAP", "").strip()
    if not bootstrap:
        pytest.skip(
            "BILTEN_TEST_KAFKA_BOOTSTRAP is unset: start a broker with `dev/kafka.sh start` "
            "and export BILTEN_TEST_KAFKA_BOOTSTRAP=127.0.0.1:9092"
        )
    return bootstrap


@pytest.fixture()
def kafka_admin(kafka_bootstrap: str):  # type: ignore[no-untyped-def]
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture()
def new_topic(kafka_admin) -> Iterator:  # type: ignore[no-untyped-def]
    """Factory: create a uniquely named topic (and delete it after the test)."""
    from confluent_kafka.admin import NewTopic

    created: list[str] = []

    def make(partitions: int = 3, prefix: str = "infra-test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        futures = kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=30,
            request_timeout=30,
        )
        futures[name].result(timeout=60)
        created.append(name)
        # CreateTopics returns once the controller committed the topic; the broker applies
        # that metadata asynchronously, so wait until it serves every partition's leader.
        deadline = time.monotonic() + 30
        while True:
            t = kafka_admin.list_topics(topic=name, timeout=10).topics.get(name)
            if (
                t is not None
                and t.error is None
                and len(t.partitions) == partitions
                and all(p.leader >= 0 for p in t.partitions.values())
            ):
                return name
            assert time.monotonic() < deadline, f"topic {name} not served after 30 s: {t}"
            time.sleep(0.1)

    yield make
    if created:
        futures = kafka_admin.delete_topics(created, operation_timeout=30)
        for fut in futures.values():
            with contextlib.suppress(Exception):  # best effort: the broker may be down
                fut.result(timeout=60)
