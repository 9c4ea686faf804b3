"""Compliance domain modules without a server: consent rules, IP allowlist, retention
enforcement on real stores, the metadata store's v1 → v2 upgrade."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.compliance.consent import ConsentMode, ConsentRegistry, Purpose
from services.compliance.erasure import ErasureService
from services.compliance.network import IpAllowlist, peer_ip
from services.compliance.retention import RetentionPolicies
from services.events.model import TrackedEvent, TrackedEventType
from services.platform.auth import Authenticator, TokenIssuer
from services.platform.errors import AnalyticsError, CredentialError
from services.storage.event_store import DuckDBEventStore
from services.storage.metadata_store import MetadataStore, RetentionDays, SQLiteMetadataStore
from tests.storage.metadata_backends import MetadataBackend, metadata_backend

__all__ = ["metadata_backend"]  # the fixture, imported for pytest

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(metadata_backend: MetadataBackend) -> Iterator[MetadataStore]:
    """Each test on SQLite and on PostgreSQL (when BILTEN_TEST_POSTGRES_DSN is set)."""
    opened = metadata_backend.open()
    try:
        yield opened
    finally:
        opened.close()


def test_consent_rules(store: MetadataStore) -> None:
    registry = ConsentRegistry(store)
    assert registry.allows_analytics("t", "u1", "")  # assumed by default
    assert registry.allows_analytics("t", "", "")  # no subject: nothing to consent
    registry.record("t", "anon-1", Purpose.ANALYTICS, False, "banner", "v1")
    # Either id of the event having withdrawn is enough to refuse it.
    assert not registry.allows_analytics("t", "u1", "anon-1")
    assert registry.allows_analytics("other-tenant", "u1", "anon-1")
    registry.record("t", "u2", Purpose.MARKETING, False, "banner", "v1")
    assert registry.allows_analytics("t", "u2", "")
    registry.set_mode("t", ConsentMode.REQUIRED)
    assert not registry.allows_analytics("t", "u3", "")
    registry.record("t", "u3", Purpose.ANALYTICS, True, "banner", "v1")
    assert registry.allows_analytics("t", "u3", "")
    # A new process sees the same decisions and modes (rebuilt from the store).
    again = ConsentRegistry(store)
    assert again.mode("t") is ConsentMode.REQUIRED
    assert again.allows_analytics("t", "u3", "")
    assert not again.allows_analytics("t", "", "anon-1")
    assert again.forget("t", "anon-1") == 1
    assert again.state("t", "anon-1").history == []


def test_ip_allowlist() -> None:
    assert peer_ip("ipv4:10.2.3.4:5555") == "10.2.3.4"
    assert peer_ip("ipv6:[::1]:5555") == "::1"
    IpAllowlist([]).check("ipv4:8.8.8.8:1", "")  # empty: no restriction
    allow = IpAllowlist(["10.0.0.0/8", "::1/128"])
    allow.check("ipv4:10.9.9.9:1", "")
    allow.check("ipv6:[::1]:1", "")
    with pytest.raises(AnalyticsError):
        allow.check("ipv4:192.168.1.1:1", "10.0.0.1")  # header not trusted
    trusting = IpAllowlist(["10.0.0.0/8"], trust_forwarded_for=True)
    trusting.check("ipv4:192.168.1.1:1", "10.0.0.1, 192.168.1.1")
    with pytest.raises(AnalyticsError):
        trusting.check("ipv4:10.0.0.5:1", "203.0.113.9")


def _event(tenant: str, n: int, age: timedelta) -> TrackedEvent:
    at = datetime.now(UTC) - age
    return TrackedEvent(
        tenant_id=tenant,
        event_id=f"{tenant}-{n}",
        event_type=TrackedEventType.TRACK,
        event_name="seen",
        occurred_at=at,
        received_at=at,
        user_id=f"u{n}",
    )


def test_retention_enforcement_dry_run_then_apply(tmp_path: Path, store: MetadataStore) -> None:
    with DuckDBEventStore(tmp_path / "events.duckdb") as events:
        events.append(
            [
                _event("a", 1, timedelta(days=10)),
                _event("a", 2, timedelta(days=1)),
                _event("b", 3, timedelta(days=10)),
            ]
        )
        policies = RetentionPolicies(store)
        policies.put("b", RetentionDays(raw_days=30), NOW)
        now = datetime.now(UTC)
        dry = policies.enforce(events, ["a", "b"], now, dry_run=True)
        assert [(r.tenant_id, r.raw_rows) for r in dry] == [("a", 1), ("b", 0)]
        assert events.count("a") == 2  # nothing deleted by a dry run
        done = policies.enforce(events, ["a", "b"], now, dry_run=False)
        assert [(r.tenant_id, r.raw_rows) for r in done] == [("a", 1), ("b", 0)]
        assert (events.count("a"), events.count("b")) == (1, 1)


def test_v1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE tenants (tenant_id TEXT PRIMARY KEY, name TEXT NOT NULL,
          created_at TEXT NOT NULL);
        CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL,
          secret_hash TEXT NOT NULL UNIQUE, scopes TEXT NOT NULL, created_at TEXT NOT NULL,
          revoked_at TEXT);
        INSERT INTO tenants VALUES ('t', 'T', '2024-05-01T12:00:00.000000Z');
        INSERT INTO api_keys VALUES ('k1', 't', 'h1', 'events:write',
          '2024-05-01T12:00:00.000000Z', NULL);
        PRAGMA user_version = 1;
        """
    )
    conn.close()
    with SQLiteMetadataStore(path) as upgraded:
        key = upgraded.find_api_key("k1")
        assert key is not None and key.display_name == "" and key.previous_secret_hash == ""
        assert upgraded.rotate_api_key("t", "k1", "h2", NOW) is not None
        rotated = upgraded.find_api_key("k1")
        assert rotated is not None
        assert (rotated.secret_hash, rotated.previous_secret_hash) == ("h2", "h1")
        assert rotated.previous_valid_until == NOW


class _FlakyRows:
    def __init__(self) -> None:
        self.calls = 0

    def erase_subject(self, tenant_id: str, subject_id: str) -> tuple[int, int]:
        self.calls += 1
        if self.calls == 1:
            raise OSError("disk gone")
        return 3, 1


def test_erasure_failure_is_recorded_and_a_retry_finishes(store: MetadataStore) -> None:
    rows = _FlakyRows()
    service = ErasureService(store, rows, ConsentRegistry(store), ["Kafka topic events"])
    failed = service.create("t", "req-1", "kim")
    assert failed.state == "FAILED" and "disk gone" in failed.error_message
    done = service.create("t", "req-1", "kim")
    assert done.erasure_request_id == failed.erasure_request_id and done.state == "DONE"
    assert any("3 rows deleted" in line for line in done.certificate)
    # The certificate never claims stores it could not reach.
    assert any("NOT ERASED: Kafka topic events" in line for line in done.certificate)
    assert service.create("t", "req-1", "kim") == done  # DONE: not run again
    assert rows.calls == 2
    with pytest.raises(ValueError):
        service.create("t", "req-1", "someone-else")


def test_single_use_tokens_need_a_store_and_burn_once(store: MetadataStore) -> None:
    issuer = TokenIssuer("k" * 40, "iss", "aud")
    token = issuer.issue("o", "t", frozenset({"compliance:write"}), single_use=True)
    with pytest.raises(CredentialError):
        Authenticator(issuer, store, "pepper").authenticate(token)  # cannot burn: refuse
    auth = Authenticator(issuer, store, "pepper", used_token_ids=store)
    assert auth.authenticate(token).single_use
    with pytest.raises(CredentialError):
        auth.authenticate(token)
