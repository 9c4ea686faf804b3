"""The mesh in process over real gRPC for the compliance tests (no schema registry: these
tests send built-in event types only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from bilten.analytics.compliance.v1 import compliance_service_pb2_grpc as c_grpc
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as i_grpc

from services.mesh import Mesh
from services.platform.auth import ROLE_SCOPES
from services.platform.settings import PlatformSettings
from services.storage.metadata_store import Tenant
from tests.conftest import free_port

OTHER_TENANT = "tenant_hostile"


class Env:
    def __init__(self, mesh: Mesh, channel: grpc.aio.Channel) -> None:
        self.mesh = mesh
        self.channel = channel
        self.credentials = mesh.ensure_dev_credentials()
        self.tenant = self.credentials["tenant_id"]
        self.compliance = c_grpc.ComplianceServiceStub(channel)
        self.ingestion = i_grpc.IngestionServiceStub(channel)

    def token(
        self,
        role: str,
        tenant: str | None = None,
        *,
        single_use: bool = False,
        ttl: int = 600,
        subject: str = "",
    ) -> str:
        return self.mesh.tokens.issue(
            subject or f"{role}-person",
            self.tenant if tenant is None else tenant,
            ROLE_SCOPES[role],
            ttl_seconds=ttl,
            single_use=single_use,
        )

    @staticmethod
    def md(credential: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {credential}"), *extra)


async def start_env(data_dir: Path, **overrides: object) -> tuple[Mesh, grpc.aio.Channel]:
    settings = PlatformSettings(
        data_dir=data_dir,
        grpc_port=0,
        metrics_port=0,
        schema_registry_port=free_port(),
        definition_cache_seconds=0,
        **overrides,  # type: ignore[arg-type]
    )
    mesh = Mesh.open(settings)
    await mesh.start()
    mesh.metadata.create_tenant(Tenant(OTHER_TENANT, "Hostile organizer", datetime.now(UTC)))
    return mesh, grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}")


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    mesh, channel = await start_env(tmp_path / "data")
    yield Env(mesh, channel)
    await channel.close()
    await mesh.stop()
