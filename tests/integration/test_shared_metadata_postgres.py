"""The cluster shape's metadata: a compliance mesh and an ingestion mesh (two "pods", each
with its own data dir) on one PostgreSQL metadata database. A key created through one
authenticates in the other; a consent withdrawal or a mode change recorded by compliance
is enforced by ingestion for every event sent after the call returned."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from bilten.analytics.compliance.v1 import compliance_service_pb2 as pb
from bilten.analytics.compliance.v1 import compliance_service_pb2_grpc as c_grpc
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as ipb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as i_grpc

from services.compliance.consent import ConsentMode
from services.mesh import Mesh
from services.platform.auth import ROLE_SCOPES, Role, Scope
from services.platform.settings import PlatformSettings
from services.storage.metadata_store import Tenant
from services.storage.postgres_metadata_store import PostgresMetadataStore
from tests.conftest import free_port, tracked_event
from tests.storage.metadata_backends import fresh_postgres_schema, requires_postgres

pytestmark = [pytest.mark.integration, pytest.mark.postgres, requires_postgres()]

TENANT = "tenant_shared"
# Both pods get the platform's keys from the chart's Secret; here, from settings.
SECRETS = {
    "jwt_secret": "j" * 48,
    "api_key_pepper": "p" * 48,
    "ip_hash_key": "i" * 48,
}


@dataclass
class Pod:
    mesh: Mesh
    channel: grpc.aio.Channel


@dataclass
class Cluster:
    compliance: Pod
    ingestion: Pod

    def officer(self) -> tuple[tuple[str, str], ...]:
        token = self.compliance.mesh.tokens.issue(
            "olga", TENANT, ROLE_SCOPES[Role.COMPLIANCE_OFFICER], ttl_seconds=600
        )
        return (("authorization", f"Bearer {token}"),)

    def admin(self) -> tuple[tuple[str, str], ...]:
        token = self.compliance.mesh.tokens.issue(
            "adam", TENANT, ROLE_SCOPES[Role.ORGANIZER_ADMIN], ttl_seconds=600
        )
        return (("authorization", f"Bearer {token}"),)


async def _pod(data_dir: Path, url: str, service: str) -> Pod:
    settings = PlatformSettings(
        data_dir=data_dir,
        metadata_store_url=url,
        grpc_port=0,
        metrics_port=0,
        schema_registry_port=free_port(),
        definition_cache_seconds=0,
        create_dev_credentials=False,
        **SECRETS,  # type: ignore[arg-type]
    )
    mesh = Mesh.open(settings)
    await mesh.start((service,))
    return Pod(mesh, grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}"))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    with fresh_postgres_schema("meta_mesh") as url:
        compliance = await _pod(tmp_path / "compliance", url, "compliance")
        ingestion = await _pod(tmp_path / "ingestion", url, "ingestion")
        try:
            assert isinstance(compliance.mesh.metadata, PostgresMetadataStore)
            compliance.mesh.metadata.create_tenant(Tenant(TENANT, "Shared", datetime.now(UTC)))
            yield Cluster(compliance, ingestion)
        finally:
            for pod in (ingestion, compliance):
                await pod.channel.close(None)
                await pod.mesh.stop()


async def _send(cluster: Cluster, key: str, *user_ids: str) -> list[ipb.IngestResult]:
    stub = i_grpc.IngestionServiceStub(cluster.ingestion.channel)
    response = await stub.IngestEvents(
        ipb.IngestEventsRequest(events=[tracked_event("page_seen", user_id=u) for u in user_ids]),
        metadata=(("authorization", f"Bearer {key}"),),
    )
    return list(response.results)


async def _consent(cluster: Cluster, subject: str, granted: bool) -> None:
    await c_grpc.ComplianceServiceStub(cluster.compliance.channel).RecordConsent(
        pb.RecordConsentRequest(
            subject_id=subject,
            purpose=pb.CONSENT_PURPOSE_ANALYTICS,
            granted=granted,
            source="cookie_banner",
            policy_version="2026-01",
        ),
        metadata=cluster.officer(),
    )


def _statuses(results: list[ipb.IngestResult]) -> list[int]:
    return [r.status for r in results]


async def test_a_key_created_in_compliance_authenticates_in_ingestion(cluster: Cluster) -> None:
    created = await c_grpc.ComplianceServiceStub(cluster.compliance.channel).CreateApiKey(
        pb.CreateApiKeyRequest(display_name="web sdk", scopes=[Scope.EVENTS_WRITE]),
        metadata=cluster.admin(),
    )
    assert _statuses(await _send(cluster, created.secret, "alice")) == [ipb.INGEST_STATUS_ACCEPTED]
    assert cluster.ingestion.mesh.event_store.count(TENANT) == 1


async def test_consent_recorded_in_compliance_is_enforced_by_ingestion(cluster: Cluster) -> None:
    created = await c_grpc.ComplianceServiceStub(cluster.compliance.channel).CreateApiKey(
        pb.CreateApiKeyRequest(display_name="web sdk", scopes=[Scope.EVENTS_WRITE]),
        metadata=cluster.admin(),
    )
    key = created.secret
    accepted, rejected = ipb.INGEST_STATUS_ACCEPTED, ipb.INGEST_STATUS_REJECTED
    assert _statuses(await _send(cluster, key, "carol", "dave")) == [accepted, accepted]
    # The withdrawal returns; the very next batch, in the other pod, refuses carol.
    await _consent(cluster, "carol", granted=False)
    results = await _send(cluster, key, "carol", "dave")
    assert _statuses(results) == [rejected, accepted]
    assert results[0].rejection_reason == ipb.REJECTION_REASON_CONSENT_MISSING
    await _consent(cluster, "carol", granted=True)
    assert _statuses(await _send(cluster, key, "carol")) == [accepted]
    # A tenant's mode change made by compliance reaches ingestion the same way.
    assert cluster.compliance.mesh.consent is not None
    cluster.compliance.mesh.consent.set_mode(TENANT, ConsentMode.REQUIRED)
    assert _statuses(await _send(cluster, key, "erin", "carol")) == [rejected, accepted]
    assert cluster.ingestion.mesh.event_store.count(TENANT) == 5
