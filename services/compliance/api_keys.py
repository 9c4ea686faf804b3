"""API key management: create, list, rotate (with a grace period), revoke.

Keys are `bak_<key_id>_<secret>`; only the peppered hash of the secret is stored and the
full key is returned once, by Create or Rotate. Every operation is confined to the
caller's tenant: another tenant's key id is answered exactly like an unknown one.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from services.platform.auth import API_KEY_PREFIX, Scope, hash_api_key_secret, new_api_key
from services.platform.errors import (
    AnalyticsError,
    FieldViolation,
    StatusCode,
    invalid_request,
    not_found,
)
from services.storage.metadata_store import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, ApiKeyRecord

DEFAULT_GRACE_SECONDS = 86_400
# Scopes a key may carry. `admin` never: an API key belongs to one tenant.
GRANTABLE_SCOPES = frozenset(v for k, v in vars(Scope).items() if k.isupper() and v != Scope.ADMIN)


class ApiKeyStore(Protocol):
    def add_api_key(self, key: ApiKeyRecord) -> None: ...
    def find_api_key(self, key_id: str) -> ApiKeyRecord | None: ...
    def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]: ...
    def revoke_api_key(self, tenant_id: str, key_id: str, revoked_at: datetime) -> bool: ...
    def rotate_api_key(
        self, tenant_id: str, key_id: str, new_secret_hash: str, previous_valid_until: datetime
    ) -> ApiKeyRecord | None: ...


@dataclass(frozen=True, slots=True)
class IssuedKey:
    record: ApiKeyRecord
    secret: str  # the full `bak_...` key; shown once


class ApiKeyManager:
    def __init__(
        self,
        store: ApiKeyStore,
        pepper: str,
        forget_cached: Callable[[str], None] = lambda key_id: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._pepper = pepper
        # Drops the authenticator's cached verifications, so a revocation or the end of
        # a grace period is not delayed by the cache in this process.
        self._forget_cached = forget_cached
        self._clock = clock

    def create(
        self,
        tenant_id: str,
        display_name: str,
        scopes: list[str],
        caller_scopes: frozenset[str],
    ) -> IssuedKey:
        wanted = frozenset(scopes)
        unknown = sorted(wanted - GRANTABLE_SCOPES)
        if unknown:
            raise invalid_request(
                [FieldViolation("scopes", f"unknown or not grantable to a key: {unknown}")]
            )
        # No escalation: a key never gets a scope its creator lacks.
        if Scope.ADMIN not in caller_scopes and not wanted <= caller_scopes:
            raise AnalyticsError(
                StatusCode.PERMISSION_DENIED,
                "SCOPE_MISSING",
                f"cannot grant scopes the caller lacks: {sorted(wanted - caller_scopes)}",
            )
        key_id, full_key, secret_hash = new_api_key(self._pepper)
        record = ApiKeyRecord(
            key_id, tenant_id, secret_hash, wanted, self._clock(), display_name=display_name
        )
        self._store.add_api_key(record)
        return IssuedKey(record, full_key)

    def page(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[ApiKeyRecord], str]:
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        offset = _decode_offset(tenant_id, page_token) if page_token else 0
        keys = self._store.list_api_keys(tenant_id)
        page = keys[offset : offset + size]
        more = offset + size < len(keys)
        return page, _encode_offset(tenant_id, offset + size) if more else ""

    def rotate(self, tenant_id: str, key_id: str, grace_seconds: int) -> IssuedKey:
        secret = secrets.token_urlsafe(32)
        grace = timedelta(seconds=grace_seconds or DEFAULT_GRACE_SECONDS)
        record = self._store.rotate_api_key(
            tenant_id, key_id, hash_api_key_secret(secret, self._pepper), self._clock() + grace
        )
        if record is None:
            raise not_found(f"active API key {key_id!r}")
        self._forget_cached(key_id)
        return IssuedKey(record, f"{API_KEY_PREFIX}{key_id}_{secret}")

    def revoke(self, tenant_id: str, key_id: str) -> ApiKeyRecord:
        if not self._store.revoke_api_key(tenant_id, key_id, self._clock()):
            raise not_found(f"API key {key_id!r}")
        self._forget_cached(key_id)
        record = self._store.find_api_key(key_id)
        assert record is not None
        return record


def _encode_offset(tenant_id: str, offset: int) -> str:
    body = json.dumps({"t": tenant_id, "o": offset})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode_offset(tenant_id: str, token: str) -> int:
    try:
        body = json.loads(base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()))
        if body["t"] != tenant_id or not isinstance(body["o"], int) or body["o"] < 0:
            raise ValueError("token of another listing")
        return int(body["o"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise AnalyticsError(
            StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token is not valid here"
        ) from exc
