"""Pluggable authentication for the registry.

Confluent clients can send two kinds of credentials, and both carry a token here:

* ``Authorization: Basic base64(user:token)`` (``basic.auth.user.info=anything:<token>``);
  the user name is free text and ignored, the password is the token;
* ``Authorization: Bearer <token>`` (``bearer.auth.token``).

An :class:`Authenticator` turns a token into a :class:`Principal` with scopes. The platform
plugs its JWT/API-key authenticator in through :func:`schema_registry.app.create_app`;
:class:`StaticTokenAuthenticator` is the built-in table-of-tokens implementation used for the
one-machine mode and tests.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

READ_SCOPE: Final = "schemas:read"
WRITE_SCOPE: Final = "schemas:write"
ADMIN_SCOPE: Final = "admin"

# What each kind of request needs: any one of the listed scopes.
READ_SCOPES: Final = frozenset({READ_SCOPE, ADMIN_SCOPE})
WRITE_SCOPES: Final = frozenset({WRITE_SCOPE, ADMIN_SCOPE})
# Registry-wide writes (global compatibility and mode) need the admin scope itself.
ADMIN_SCOPES: Final = frozenset({ADMIN_SCOPE})


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scopes: frozenset[str]
    # Tenants of the platform may only write subjects under their own prefix
    # (`events.<tenant_id>.`); None means unrestricted (platform admins, tokens of the
    # static table). Reads stay global: schema ids are global, and Kafka deserializers
    # of any consumer must resolve them.
    subject_prefix: str | None = None

    def may(self, needed: frozenset[str]) -> bool:
        return not self.scopes.isdisjoint(needed)

    def may_write_subject(self, subject: str | None) -> bool:
        """Subject-level write check; `None` is a global write (config, mode)."""
        if self.subject_prefix is None:
            return True
        return subject is not None and subject.startswith(self.subject_prefix)


@runtime_checkable
class Authenticator(Protocol):
    def authenticate(self, token: str) -> Principal | None:
        """The principal a token stands for, or None when the token is not valid.

        Called on the event loop for every request that misses the per-process credential
        cache, so it must not block for long; results are cached for a few seconds.
        """


class StaticTokenAuthenticator:
    """A fixed table ``token -> scopes``; comparisons are constant-time."""

    def __init__(self, tokens: Mapping[str, Iterable[str]]) -> None:
        self._tokens = {token: frozenset(scopes) for token, scopes in tokens.items()}

    def authenticate(self, token: str) -> Principal | None:
        for known, scopes in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return Principal(name=f"token:{known[:4]}…", scopes=scopes)
        return None


class AllowAllAuthenticator:
    """Every request is an admin: only for ``auth_enabled=False`` development setups."""

    def authenticate(self, token: str) -> Principal | None:
        del token
        return Principal(name="anonymous", scopes=frozenset({ADMIN_SCOPE}))


def token_from_authorization(header: str | None) -> str | None:
    """The token in an ``Authorization`` header (Basic password or Bearer), if any."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None
