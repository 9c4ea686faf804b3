"""Typed settings of the registry process (env prefix ``BILTEN_SCHEMA_REGISTRY_``).

Examples::

    BILTEN_SCHEMA_REGISTRY_PORT=8081
    BILTEN_SCHEMA_REGISTRY_STORAGE=sqlite:///var/lib/bilten/schema-registry.db
    BILTEN_SCHEMA_REGISTRY_STORAGE=postgresql://registry@db:5432/registry
    BILTEN_SCHEMA_REGISTRY_AUTH_TOKENS='{"s3cret": ["admin"], "r3ad": ["schemas:read"]}'
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schema_registry.auth import ADMIN_SCOPE, READ_SCOPE, WRITE_SCOPE

_KNOWN_SCOPES = frozenset({READ_SCOPE, WRITE_SCOPE, ADMIN_SCOPE})


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BILTEN_SCHEMA_REGISTRY_", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    storage: str = Field(
        default="sqlite:///.bilten/schema-registry.db",
        description="sqlite:///PATH (one machine) or postgresql://... (several processes)",
    )
    workers: int = Field(
        default=1, ge=1, description="uvicorn worker processes sharing the same storage"
    )
    storage_pool_size: int = Field(default=8, ge=1, description="DB connections per process")
    max_schema_bytes: int = Field(
        default=1 << 20, ge=1, description="larger schemas are refused with 42209"
    )
    auth_enabled: bool = Field(
        default=True, description="False lets every request through as admin (development)"
    )
    auth_tokens: dict[str, list[str]] = Field(
        default_factory=dict,
        description="static token table {token: [scopes]} for StaticTokenAuthenticator",
    )
    authenticator: str | None = Field(
        default=None,
        description="'module:factory' returning an Authenticator; needed when workers > 1 "
        "and the platform authenticator is used, since worker processes import it themselves",
    )
    log_level: str = "warning"

    @field_validator("storage")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("storage must be sqlite:///PATH or postgresql://...")
        return value

    @field_validator("auth_tokens")
    @classmethod
    def _known_scopes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for token, scopes in value.items():
            unknown = set(scopes) - _KNOWN_SCOPES
            if unknown:
                raise ValueError(f"unknown scopes {sorted(unknown)} for a token")
            if len(token) < 8:
                raise ValueError("tokens must be at least 8 characters long")
        return value

    @model_validator(mode="after")
    def _sqlite_memory_single_worker(self) -> RegistrySettings:
        if self.workers > 1 and self.storage in ("sqlite://", "sqlite:///:memory:"):
            raise ValueError("an in-memory SQLite database cannot be shared by several workers")
        return self
