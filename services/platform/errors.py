"""The one error model of the services, free of gRPC.

Domain code raises `AnalyticsError`; the edge interceptor renders it as a
`google.rpc.Status` with one `ErrorInfo` (reason from `bilten.analytics.type.v1.
ErrorReason`, domain `analytics.bilten.io`) plus `BadRequest` / `RetryInfo` details, and
Envoy renders that as an HTTP status with a JSON body.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

ERROR_DOMAIN = "analytics.bilten.io"


class StatusCode(enum.Enum):
    """The gRPC codes the services use (names match `grpc.StatusCode`)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: a dotted path with indexes (`events[3].event_name`) and why."""

    field: str
    description: str


@dataclass
class AnalyticsError(Exception):
    """An error with everything a client needs to react to it."""

    code: StatusCode
    reason: str  # an ErrorReason value name without the `ERROR_REASON_` prefix
    message: str
    field_violations: list[FieldViolation] = field(default_factory=list)
    retry_after_seconds: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


class CredentialError(AnalyticsError):
    """UNAUTHENTICATED, with the precise reason."""

    @classmethod
    def missing(cls) -> CredentialError:
        return cls(
            StatusCode.UNAUTHENTICATED,
            "CREDENTIAL_MISSING",
            "no credential: send `authorization: Bearer <token or API key>` or `x-api-key`",
        )

    @classmethod
    def invalid(cls, message: str) -> CredentialError:
        return cls(StatusCode.UNAUTHENTICATED, "CREDENTIAL_INVALID", message)

    @classmethod
    def expired(cls, message: str) -> CredentialError:
        return cls(StatusCode.UNAUTHENTICATED, "CREDENTIAL_EXPIRED", message)

    @classmethod
    def revoked(cls) -> CredentialError:
        return cls(StatusCode.UNAUTHENTICATED, "CREDENTIAL_REVOKED", "API key has been revoked")


def scope_missing(scope: str) -> AnalyticsError:
    return AnalyticsError(
        StatusCode.PERMISSION_DENIED,
        "SCOPE_MISSING",
        f"the credential lacks scope {scope!r}",
        metadata={"required_scope": scope},
    )


def tenant_mismatch() -> AnalyticsError:
    return AnalyticsError(
        StatusCode.PERMISSION_DENIED,
        "TENANT_MISMATCH",
        "tenant_id names another tenant than the credential's; only platform admins may",
    )


def invalid_request(violations: list[FieldViolation], message: str = "") -> AnalyticsError:
    text = message or "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
    return AnalyticsError(StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", text, violations)


def not_found(what: str) -> AnalyticsError:
    return AnalyticsError(StatusCode.NOT_FOUND, "NOT_FOUND", f"{what} not found")


def not_implemented(rpc: str, issue: str) -> AnalyticsError:
    return AnalyticsError(
        StatusCode.UNIMPLEMENTED,
        "NOT_IMPLEMENTED",
        f"{rpc} is part of the v1 contract but not built yet ({issue})",
    )


def rate_limited(retry_after_seconds: float) -> AnalyticsError:
    return AnalyticsError(
        StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        f"rate limit exceeded; retry in {retry_after_seconds:.2f} s",
        retry_after_seconds=retry_after_seconds,
    )


def event_log_unavailable(message: str, retry_after_seconds: float = 1.0) -> AnalyticsError:
    return AnalyticsError(
        StatusCode.UNAVAILABLE,
        "EVENT_LOG_UNAVAILABLE",
        message,
        retry_after_seconds=retry_after_seconds,
    )


def dependency_unavailable(message: str, retry_after_seconds: float = 2.0) -> AnalyticsError:
    return AnalyticsError(
        StatusCode.UNAVAILABLE,
        "DEPENDENCY_UNAVAILABLE",
        message,
        retry_after_seconds=retry_after_seconds,
    )
