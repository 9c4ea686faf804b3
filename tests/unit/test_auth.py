"""Unit tier: tokens and API keys."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import jwt
import pytest

from services.platform.auth import (
    Authenticator,
    Scope,
    TokenIssuer,
    hash_api_key_secret,
    new_api_key,
)
from services.platform.errors import CredentialError
from services.storage.metadata_store import ApiKeyRecord

pytestmark = pytest.mark.unit

PEPPER = "pepper-for-tests"
NOW = datetime(2026, 11, 27, tzinfo=UTC)


class KeyTable:
    """A real (in-memory) implementation of the ApiKeyLookup protocol."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKeyRecord] = {}
        self.lookups = 0

    def find_api_key(self, key_id: str) -> ApiKeyRecord | None:
        self.lookups += 1
        return self.keys.get(key_id)


def _auth() -> tuple[Authenticator, TokenIssuer, KeyTable]:
    issuer = TokenIssuer(
        "s3cret-s3cret-s3cret-s3cret-s3cret!", "bilten-analytics", "bilten-analytics"
    )
    table = KeyTable()
    return Authenticator(issuer, table, PEPPER), issuer, table


def test_token_round_trip_carries_tenant_and_scopes() -> None:
    auth, issuer, _ = _auth()
    token = issuer.issue("alice", "t1", frozenset({Scope.ANALYTICS_READ}))
    caller = auth.authenticate(token)
    assert caller.tenant_id == "t1"
    assert caller.has_scope(Scope.ANALYTICS_READ)
    assert not caller.has_scope(Scope.EVENTS_WRITE)
    assert not caller.is_platform_admin


def test_platform_admin_has_every_scope() -> None:
    auth, issuer, _ = _auth()
    caller = auth.authenticate(issuer.issue("root", "", frozenset({Scope.ADMIN})))
    assert caller.is_platform_admin and caller.has_scope(Scope.KEYS_MANAGE)


def test_expired_token_is_refused_with_expired_reason() -> None:
    auth, issuer, _ = _auth()
    token = issuer.issue("alice", "t1", frozenset({Scope.ANALYTICS_READ}), ttl_seconds=-10)
    with pytest.raises(CredentialError) as caught:
        auth.authenticate(token)
    assert caught.value.reason == "CREDENTIAL_EXPIRED"


@pytest.mark.parametrize(
    "token",
    [
        jwt.encode(
            {"sub": "x", "tid": "t1", "exp": time.time() + 3600},
            "other-key-other-key-other-key-other!",
        ),
        jwt.encode(
            {
                "sub": "x",
                "tid": "t1",
                "iss": "bilten-analytics",
                "aud": "someone-else",
                "iat": time.time(),
                "exp": time.time() + 3600,
            },
            "s3cret-s3cret-s3cret-s3cret-s3cret!",
        ),
        "not-a-jwt",
    ],
)
def test_forged_or_foreign_tokens_are_invalid(token: str) -> None:
    auth, _, _ = _auth()
    with pytest.raises(CredentialError) as caught:
        auth.authenticate(token)
    assert caught.value.reason == "CREDENTIAL_INVALID"


def test_alg_none_token_is_refused() -> None:
    auth, _, _ = _auth()
    claims = {"sub": "x", "tid": "t1", "iss": "bilten-analytics", "aud": "bilten-analytics"}
    claims |= {"iat": int(time.time()), "exp": int(time.time()) + 60, "scope": "admin"}
    token = jwt.encode(claims, key=None, algorithm="none")
    with pytest.raises(CredentialError):
        auth.authenticate(token)


def test_api_key_is_stored_as_hash_and_verified() -> None:
    auth, _, table = _auth()
    key_id, full_key, secret_hash = new_api_key(PEPPER)
    assert full_key.split("_", 2)[2] not in secret_hash
    table.keys[key_id] = ApiKeyRecord(key_id, "t9", secret_hash, frozenset({"events:write"}), NOW)
    caller = auth.authenticate(full_key)
    assert (caller.tenant_id, caller.credential_kind) == ("t9", "api_key")
    # A wrong secret for the same id fails.
    with pytest.raises(CredentialError):
        auth.authenticate(f"bak_{key_id}_wrong")


def test_revoked_api_key_is_refused() -> None:
    auth, _, table = _auth()
    key_id, full_key, secret_hash = new_api_key(PEPPER)
    table.keys[key_id] = ApiKeyRecord(key_id, "t9", secret_hash, frozenset(), NOW, revoked_at=NOW)
    with pytest.raises(CredentialError) as caught:
        auth.authenticate(full_key)
    assert caught.value.reason == "CREDENTIAL_REVOKED"


def test_missing_credential() -> None:
    auth, _, _ = _auth()
    with pytest.raises(CredentialError) as caught:
        auth.authenticate("")
    assert caught.value.reason == "CREDENTIAL_MISSING"


def test_verified_api_keys_are_cached() -> None:
    auth, _, table = _auth()
    key_id, full_key, secret_hash = new_api_key(PEPPER)
    table.keys[key_id] = ApiKeyRecord(key_id, "t9", secret_hash, frozenset(), NOW)
    for _ in range(5):
        auth.authenticate(full_key)
    assert table.lookups == 1
    assert hash_api_key_secret("a", PEPPER) != hash_api_key_secret("a", "other")
