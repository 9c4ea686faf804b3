"""Who is calling: JWTs for people and services, API keys (write keys) for event senders.

The tenant always comes from the credential. A token carries `tid` (the tenant) and
`scope` (space-separated scopes); the scope `admin` marks a platform admin, who may read
across tenants. API keys are `bak_<key_id>_<secret>`; only a peppered SHA-256 of the
secret is stored, and the comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import jwt

from services.platform.errors import CredentialError


class Scope:
    """Scope names. Each RPC requires exactly one (see `services.platform.rpc_scopes`)."""

    EVENTS_WRITE = "events:write"
    EVENTS_READ = "events:read"
    ANALYTICS_READ = "analytics:read"
    REPORTS_WRITE = "reports:write"
    COMPLIANCE_READ = "compliance:read"
    COMPLIANCE_WRITE = "compliance:write"
    KEYS_MANAGE = "keys:manage"
    PREDICTIONS_READ = "predictions:read"
    MODELS_MANAGE = "models:manage"
    SCHEMAS_READ = "schemas:read"
    SCHEMAS_WRITE = "schemas:write"
    # Platform admin: every scope, in every tenant.
    ADMIN = "admin"


ORGANIZER_ADMIN_SCOPES = frozenset(
    {
        Scope.EVENTS_WRITE,
        Scope.EVENTS_READ,
        Scope.ANALYTICS_READ,
        Scope.REPORTS_WRITE,
        Scope.COMPLIANCE_READ,
        Scope.COMPLIANCE_WRITE,
        Scope.KEYS_MANAGE,
        Scope.PREDICTIONS_READ,
        Scope.MODELS_MANAGE,
        Scope.SCHEMAS_READ,
        Scope.SCHEMAS_WRITE,
    }
)
WRITE_KEY_SCOPES = frozenset({Scope.EVENTS_WRITE})


class Role:
    """Roles a person or service is given; each is a fixed set of scopes (ROLE_SCOPES).

    Tokens carry scopes, not roles, so the edge checks one thing; a role is how an
    issuer picks the scopes (docs/compliance.md has the table).
    """

    PLATFORM_ADMIN = "platform_admin"
    ORGANIZER_ADMIN = "organizer_admin"
    ANALYST = "analyst"
    EVENT_SENDER = "event_sender"
    COMPLIANCE_OFFICER = "compliance_officer"


ROLE_SCOPES: dict[str, frozenset[str]] = {
    Role.PLATFORM_ADMIN: frozenset({Scope.ADMIN}),
    Role.ORGANIZER_ADMIN: ORGANIZER_ADMIN_SCOPES,
    # Reads metrics, reports and predictions; cannot touch consent, erasure, keys or models.
    Role.ANALYST: frozenset(
        {
            Scope.EVENTS_READ,
            Scope.ANALYTICS_READ,
            Scope.REPORTS_WRITE,
            Scope.PREDICTIONS_READ,
            Scope.SCHEMAS_READ,
        }
    ),
    Role.EVENT_SENDER: WRITE_KEY_SCOPES,
    # Consent, erasure, export, retention and the audit log; no analytics, no keys.
    Role.COMPLIANCE_OFFICER: frozenset({Scope.COMPLIANCE_READ, Scope.COMPLIANCE_WRITE}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    subject: str  # user or service id, or the API key id
    tenant_id: str  # "" only for platform admins without a home tenant
    scopes: frozenset[str]
    credential_kind: str  # "jwt" | "api_key"
    # Single-use tokens (claim `once`) only: their `jti`, burnt at first presentation.
    single_use: bool = False
    token_id: str = ""

    @property
    def is_platform_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes or self.is_platform_admin


class StoredApiKey(Protocol):
    """What authentication needs of a stored key (the metadata store's record)."""

    @property
    def tenant_id(self) -> str: ...
    @property
    def secret_hash(self) -> str: ...
    @property
    def scopes(self) -> frozenset[str]: ...
    @property
    def revoked(self) -> bool: ...
    @property
    def previous_secret_hash(self) -> str: ...
    @property
    def previous_valid_until(self) -> datetime | None: ...


class ApiKeyLookup(Protocol):
    def find_api_key(self, key_id: str) -> StoredApiKey | None: ...


class UsedTokenIds(Protocol):
    """Where single-use token ids are burnt (the metadata store)."""

    def burn_token_id(self, jti: str, expires_at: datetime, now: datetime) -> bool: ...


API_KEY_PREFIX = "bak_"


def hash_api_key_secret(secret: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def new_api_key(pepper: str) -> tuple[str, str, str]:
    """Returns (key_id, full key to show once, secret hash to store)."""
    key_id = uuid.uuid4().hex[:16]
    secret = secrets.token_urlsafe(32)
    return key_id, f"{API_KEY_PREFIX}{key_id}_{secret}", hash_api_key_secret(secret, pepper)


class TokenIssuer:
    """Signs and verifies HS256 JWTs."""

    def __init__(self, secret: str, issuer: str, audience: str) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience

    def issue(
        self,
        subject: str,
        tenant_id: str,
        scopes: frozenset[str],
        ttl_seconds: int = 3600,
        single_use: bool = False,
    ) -> str:
        """A signed token; `single_use` adds the claim `once`, and the authenticator
        then accepts its `jti` one time only (required for erasure)."""
        now = int(time.time())
        claims: dict[str, object] = {
            "sub": subject,
            "tid": tenant_id,
            "scope": " ".join(sorted(scopes)),
            "iss": self._issuer,
            "aud": self._audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        if single_use:
            claims["once"] = True
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise CredentialError.expired("token has expired") from exc
        except jwt.PyJWTError as exc:
            raise CredentialError.invalid(f"invalid token: {exc}") from exc
        scopes = frozenset(str(claims.get("scope", "")).split())
        tenant_id = str(claims.get("tid", ""))
        if not tenant_id and Scope.ADMIN not in scopes:
            raise CredentialError.invalid("token has no tenant (tid) claim")
        if claims.get("once") is True:
            jti = str(claims.get("jti", ""))
            if not jti:
                raise CredentialError.invalid("single-use token has no jti claim")
            return Principal(str(claims["sub"]), tenant_id, scopes, "jwt", True, jti)
        return Principal(str(claims["sub"]), tenant_id, scopes, "jwt")

    def expiry(self, token: str) -> float:
        """`exp` of a token already verified (for how long its jti must be remembered)."""
        claims = jwt.decode(token, options={"verify_signature": False})
        return float(claims["exp"])


class Authenticator:
    """Turns a bearer credential (JWT or API key) into a Principal.

    Verified API keys are cached briefly so the hot ingestion path does not hit the
    metadata store per call; a revocation takes effect within `cache_seconds`.
    """

    def __init__(
        self,
        tokens: TokenIssuer,
        api_keys: ApiKeyLookup,
        pepper: str,
        cache_seconds: float = 30.0,
        used_token_ids: UsedTokenIds | None = None,
    ) -> None:
        self._tokens = tokens
        self._api_keys = api_keys
        self._pepper = pepper
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._used_token_ids = used_token_ids

    def authenticate(self, credential: str) -> Principal:
        if not credential:
            raise CredentialError.missing()
        if credential.startswith(API_KEY_PREFIX):
            return self._authenticate_api_key(credential)
        caller = self._tokens.verify(credential)
        if caller.single_use:
            # Without a store to burn ids in, a single-use token cannot be honoured.
            now = datetime.now(UTC)
            expires = datetime.fromtimestamp(self._tokens.expiry(credential), UTC)
            if self._used_token_ids is None or not self._used_token_ids.burn_token_id(
                caller.token_id, expires, now
            ):
                raise CredentialError.invalid("single-use token was already used")
        return caller

    def forget_api_key(self, key_id: str) -> None:
        """Drops cached verifications of a key, so a revocation or rotation made in this
        process takes effect at once rather than within `cache_seconds`."""
        for credential in [c for c, (_, p) in self._cache.items() if p.subject == key_id]:
            self._cache.pop(credential, None)

    def _authenticate_api_key(self, credential: str) -> Principal:
        now = time.monotonic()
        cached = self._cache.get(credential)
        if cached is not None and cached[0] > now:
            return cached[1]
        body = credential[len(API_KEY_PREFIX) :]
        key_id, sep, secret = body.partition("_")
        if not sep or not key_id or not secret:
            raise CredentialError.invalid("malformed API key")
        stored = self._api_keys.find_api_key(key_id)
        if stored is None:
            raise CredentialError.invalid("unknown API key")
        presented = hash_api_key_secret(secret, self._pepper)
        valid_until = now + self._cache_seconds
        if not hmac.compare_digest(stored.secret_hash, presented):
            # The secret a rotation replaced works until its grace period ends.
            grace_end = stored.previous_valid_until
            if (
                not stored.previous_secret_hash
                or grace_end is None
                or not hmac.compare_digest(stored.previous_secret_hash, presented)
            ):
                raise CredentialError.invalid("unknown API key")
            remaining = (grace_end - datetime.now(UTC)).total_seconds()
            if remaining <= 0:
                raise CredentialError.expired("API key secret was rotated; its grace ended")
            valid_until = min(valid_until, now + remaining)
        if stored.revoked:
            raise CredentialError.revoked()
        principal = Principal(key_id, stored.tenant_id, stored.scopes, "api_key")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[credential] = (valid_until, principal)
        return principal
