"""The platform's credentials for the schema registry.

Confluent clients send the same JWTs and API keys the gRPC services accept (as a Bearer
token, or as the password of HTTP basic auth). Platform admins may write any subject;
a tenant may write only its own event definitions, `events.<tenant_id>.<event_name>`.
"""

from __future__ import annotations

from schema_registry.auth import ADMIN_SCOPE, Principal
from services.platform.auth import Authenticator, Scope
from services.platform.errors import AnalyticsError

TENANT_SUBJECT_PREFIX = "events."
PLATFORM_DEFINITIONS_TENANT = "_platform"


def definition_subject(tenant_id: str, event_name: str) -> str:
    """The registry subject holding a tenant's definition of a custom event."""
    return f"{TENANT_SUBJECT_PREFIX}{tenant_id}.{event_name}"


class PlatformRegistryAuthenticator:
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def authenticate(self, token: str) -> Principal | None:
        try:
            caller = self._authenticator.authenticate(token)
        except AnalyticsError:
            return None
        if caller.is_platform_admin:
            return Principal(caller.subject, frozenset({ADMIN_SCOPE}))
        scopes = frozenset(
            s for s in caller.scopes if s in (Scope.SCHEMAS_READ, Scope.SCHEMAS_WRITE)
        )
        return Principal(
            caller.subject,
            scopes,
            subject_prefix=f"{TENANT_SUBJECT_PREFIX}{caller.tenant_id}.",
        )
