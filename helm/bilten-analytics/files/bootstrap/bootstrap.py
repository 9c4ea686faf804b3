"""The chart's bootstrap Job: Kafka topics, the event schema in the registry, the Pinot table.

Runs in the platform image (`python bootstrap.py`) after every install and upgrade, with the
same PlatformSettings environment (BILTEN_*) as the services, and applies the platform's own
definitions, so that the Job and the services never disagree:

- topics: services.streaming.topics.ensure_topics over the settings' layout (events topic +
  dead-letter topic; refuses an events topic whose partition count differs);
- schemas: services.streaming.avro_envelope.register_envelope_schema (`<topic>-value`);
- pinot: services.pinot.apply.apply (schema + REALTIME table, created or updated).

Every step is idempotent and waits for its dependency (Kafka, registry, Pinot controller) up to
BILTEN_BOOTSTRAP_TIMEOUT_SECONDS. BILTEN_BOOTSTRAP_STEPS names the steps to run (the chart
leaves out a step whose endpoint is not configured). The registry call uses a short-lived
platform-admin JWT signed with the platform's JWT secret; Pinot's decoder gets
BILTEN_SCHEMA_REGISTRY_TOKEN when set, else a read-only JWT valid for
BILTEN_BOOTSTRAP_PINOT_TOKEN_DAYS (the Job re-issues it on every upgrade).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.platform.auth import Scope, TokenIssuer
from services.platform.settings import PlatformSettings

T = TypeVar("T")
Step = Literal["topics", "schemas", "pinot"]


class BootstrapSettings(BaseSettings):
    """`BILTEN_BOOTSTRAP_*` (the rest comes from PlatformSettings)."""

    model_config = SettingsConfigDict(env_prefix="BILTEN_BOOTSTRAP_", frozen=True)

    steps: list[Step] = Field(
        default_factory=lambda: ["topics", "schemas", "pinot"], description="Steps to run."
    )
    timeout_seconds: float = Field(600.0, gt=0, description="Wait per dependency, seconds.")
    pinot_token_days: int = Field(
        365, ge=1, le=3650, description="Validity of the registry token handed to Pinot."
    )


def log(message: str) -> None:
    print(f"bootstrap: {message}", flush=True)


def retry(what: str, timeout: float, attempt: Callable[[], T]) -> T:
    """Calls `attempt` until it returns; backs off up to 15 s between failures."""
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        try:
            return attempt()
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise RuntimeError(f"{what}: gave up after {timeout:.0f} s: {exc}") from exc
            log(f"{what}: {exc!r}; retrying in {delay:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def create_topics(settings: PlatformSettings, timeout: float) -> None:
    from confluent_kafka.admin import AdminClient

    from services.streaming.topics import ensure_topics
    from services.streaming.wiring import topic_layout

    admin = AdminClient(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, **settings.kafka_client_config}
    )
    done = retry("kafka", timeout, lambda: ensure_topics(admin, topic_layout(settings)))
    for topic, what in sorted(done.items()):
        log(f"topic {topic}: {what}")


def register_schemas(settings: PlatformSettings, issuer: TokenIssuer, timeout: float) -> None:
    from services.streaming.avro_envelope import register_envelope_schema, subject_for

    token = issuer.issue("bilten-bootstrap", "", frozenset({Scope.ADMIN}), 900)
    topic = settings.kafka_events_topic
    schema_id = retry(
        "schema registry",
        timeout,
        lambda: register_envelope_schema(settings.registry_url, token, topic),
    )
    log(f"schema {subject_for(topic)}: id {schema_id}")


def apply_pinot(
    settings: PlatformSettings, issuer: TokenIssuer, token_days: int, timeout: float
) -> None:
    from services.pinot.apply import apply, table_settings

    token = settings.schema_registry_token or issuer.issue(
        "pinot", "_platform", frozenset({Scope.SCHEMAS_READ}), token_days * 86_400
    )
    table = table_settings(settings, token)
    done = retry("pinot controller", timeout, lambda: apply(settings.pinot_controller_url, table))
    log(f"pinot table {settings.pinot_table}: {done}")


def main() -> int:
    steps = BootstrapSettings()
    settings = PlatformSettings()
    if not settings.jwt_secret:
        raise SystemExit("bootstrap: BILTEN_JWT_SECRET is empty (it comes from the chart's Secret)")
    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience)
    timeout = steps.timeout_seconds
    for step in ("topics", "schemas", "pinot"):
        if step not in steps.steps:
            log(f"{step}: skipped (not configured)")
        elif step == "topics":
            create_topics(settings, timeout)
        elif step == "schemas":
            register_schemas(settings, issuer, timeout)
        else:
            apply_pinot(settings, issuer, steps.pinot_token_days, timeout)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
