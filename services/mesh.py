"""Composition root: builds stores, pipeline and servicers for the services asked for.

`up` asks for all five in one process; `serve <service>` for one (the cluster shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from bilten.analytics.aggregation.v1 import aggregation_service_pb2_grpc as aggregation_grpc
from bilten.analytics.compliance.v1 import compliance_service_pb2_grpc as compliance_grpc
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as ingestion_grpc
from bilten.analytics.prediction.v1 import prediction_service_pb2_grpc as prediction_grpc
from bilten.analytics.query.v1 import query_service_pb2_grpc as query_grpc

from schema_registry.server import EmbeddedRegistry
from schema_registry.settings import RegistrySettings
from services.aggregation.runtime import AggregationRuntime
from services.aggregation.servicer import AggregationServicer
from services.compliance.api_keys import ApiKeyManager
from services.compliance.consent import ConsentMode, ConsentRegistry
from services.compliance.erasure import ErasureService
from services.compliance.erasure_hosts import ErasedSubjects, ErasureApplier, host_id
from services.compliance.network import IpAllowlist
from services.compliance.retention import RetentionJob, RetentionPolicies
from services.compliance.servicer import ComplianceDomain, ComplianceServicer
from services.ingestion.dedup import DedupWindow
from services.ingestion.definitions import RegistryEventDefinitions
from services.ingestion.enrichment import Enricher
from services.ingestion.pipeline import EventLog, IngestionPipeline, PipelineLimits
from services.ingestion.rate_limit import rate_limiter_for
from services.ingestion.servicer import IngestionServicer
from services.ingestion.sinks import CommittingEventLog, MetadataQuarantine
from services.live.alerts import RedisAlertBus, alert_bus_for
from services.live.observers import follow_live_feed
from services.platform.audit import AuditLog
from services.platform.auth import (
    ORGANIZER_ADMIN_SCOPES,
    WRITE_KEY_SCOPES,
    Authenticator,
    Scope,
    TokenIssuer,
    new_api_key,
)
from services.platform.key_revocations import RedisKeyRevocations
from services.platform.schema_registry_auth import (
    PLATFORM_DEFINITIONS_TENANT,
    PlatformRegistryAuthenticator,
)
from services.platform.secrets_file import Secrets, load_secrets
from services.platform.server import Registration, start_grpc_server
from services.platform.settings import PlatformSettings
from services.platform.telemetry import observe_gauge
from services.prediction.service import PredictionService
from services.prediction.servicer import PredictionServicer
from services.query.metric_backend import MetricBackend, for_settings
from services.query.rollups import RollupMaintainer
from services.query.servicer import QueryServicer
from services.storage.event_store import DuckDBEventStore
from services.storage.group_commit import GroupCommitter
from services.storage.metadata_store import (
    ApiKeyRecord,
    MetadataStore,
    Tenant,
    open_metadata_store,
)
from services.storage.postgres_metadata_store import PostgresMetadataStore
from services.streaming.live import LiveFeed
from services.streaming.status import EmbeddedPipelineStatus, PipelineStatusSource
from services.streaming.wiring import KafkaStreaming

SERVICE_NAMES = ("ingestion", "query", "aggregation", "compliance", "prediction")
# With the Kafka event log, these run the stream processor in their process: it owns the
# event store they read (DuckDB lets one process open the file). Prediction reads the
# store too (features, series, hourly totals), so a prediction pod fills its own.
PROCESSOR_HOSTS = ("processor", "query", "aggregation", "prediction")
CREDENTIALS_FILE = "credentials.json"


@dataclass
class Mesh:
    settings: PlatformSettings
    secrets: Secrets
    metadata: MetadataStore
    event_store: DuckDBEventStore
    event_log: GroupCommitter
    tokens: TokenIssuer
    authenticator: Authenticator
    pipeline: IngestionPipeline
    server: grpc.aio.Server | None = None
    port: int = 0
    streaming: KafkaStreaming | None = None  # set when settings.event_log == "kafka"
    consent: ConsentRegistry | None = None
    audit: AuditLog | None = None
    # Live hubs, rollups and result cache (services/aggregation/runtime.py).
    aggregation: AggregationRuntime | None = None
    # Where metric reads are answered: the event store or Pinot (settings.query_backend).
    metric_backend: MetricBackend | None = None
    retention_job: RetentionJob | None = None  # set by start() where it runs
    erasure_applier: ErasureApplier | None = None  # set by start() on a processor host
    prediction: PredictionService | None = None  # set by start() where prediction is served
    # Prediction alerts across processes when settings.redis_url is set (services/live/alerts.py).
    alert_bus: RedisAlertBus | None = None
    # API key revocations pushed to every process when settings.redis_url is set
    # (services/platform/key_revocations.py); else other processes' caches expire.
    key_revocations: RedisKeyRevocations | None = None
    _closers: list[Any] = field(default_factory=list)

    @classmethod
    def open(cls, settings: PlatformSettings) -> Mesh:
        data_dir = Path(settings.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        secrets = load_secrets(settings)
        # SQLite in data_dir, or PostgreSQL shared by every pod (settings.metadata_store_url).
        metadata = open_metadata_store(settings.metadata_store_url, data_dir)
        event_store = DuckDBEventStore(data_dir / "events.duckdb")
        event_log = GroupCommitter(event_store, max_pending_events=settings.max_pending_events)
        tokens = TokenIssuer(secrets.jwt_secret, settings.jwt_issuer, settings.jwt_audience)
        # The metadata store burns the ids of single-use tokens (erasure needs one).
        authenticator = Authenticator(
            tokens, metadata, secrets.api_key_pepper, used_token_ids=metadata
        )
        # On a shared store other pods record consent too: ingestion follows the store.
        consent = ConsentRegistry(
            metadata,
            ConsentMode(settings.consent_default_mode),
            feed=metadata if settings.metadata_store_url else None,
        )
        # Ingestion reads event definitions from the registry with its own service token:
        # read-only, confined to the platform pseudo-tenant for writes.
        registry_token = tokens.issue(
            "ingestion",
            PLATFORM_DEFINITIONS_TENANT,
            frozenset({Scope.SCHEMAS_READ}),
            ttl_seconds=365 * 86_400,
        )
        definitions = RegistryEventDefinitions(
            settings.registry_url, registry_token, settings.definition_cache_seconds
        )
        streaming = None
        append_to: EventLog = CommittingEventLog(event_log)
        if settings.event_log == "kafka":
            # Ingestion appends to Kafka; the processor fills the store (docs/streaming.md).
            # Its registry token is a platform one: the envelope subject is global.
            streaming = KafkaStreaming.open(
                settings,
                tokens.issue("streaming", "", frozenset({Scope.ADMIN}), ttl_seconds=365 * 86_400),
            )
            append_to = streaming.event_log
        # Rollup reads and pruning follow each tenant's own retention (compliance).
        aggregation = AggregationRuntime(settings, event_store, retention_records=metadata)
        # query_backend=pinot: GetMetrics and the aggregation's raw-window metric reads ask
        # Pinot; every other read stays on the store the processor fills (docs/streaming.md).
        metric_backend = for_settings(settings, event_store)
        aggregation.reads.read_raw_from(metric_backend)
        dedup = DedupWindow(
            settings.dedup_window_seconds, tenant_windows=settings.dedup_window_by_tenant
        )
        since = datetime.now(UTC) - timedelta(seconds=dedup.keep_seconds)
        dedup.warm(list(event_store.event_ids_since(since)), time.time())
        # Shared by the replicas through Redis when settings.redis_url is set.
        rate_limiter = rate_limiter_for(settings)
        pipeline = IngestionPipeline(
            PipelineLimits(
                dedup_window_seconds=settings.dedup_window_seconds,
                max_future_skew_seconds=settings.max_future_skew_seconds,
                raw_retention_days=settings.raw_retention_days,
            ),
            Enricher(secrets.ip_hash_key),
            dedup,
            rate_limiter,
            append_to,
            MetadataQuarantine(metadata),
            definitions,
            consent=consent,
            # Embedded: events are durable once appended here. With Kafka the processor
            # reports them after its store commit instead (never both: no double count).
            on_accepted=aggregation.observe_events if streaming is None else None,
        )
        observe_gauge(
            "bilten_dedup_window_ids", "Event ids held in the dedup window", lambda: len(dedup)
        )
        return cls(
            settings,
            secrets,
            metadata,
            event_store,
            event_log,
            tokens,
            authenticator,
            pipeline,
            streaming=streaming,
            consent=consent,
            audit=AuditLog(metadata),
            aggregation=aggregation,
            metric_backend=metric_backend,
            alert_bus=alert_bus_for(
                settings.redis_url, aggregation.alerts, settings.redis_password
            ),
            key_revocations=RedisKeyRevocations.from_url(
                settings.redis_url, authenticator.forget_api_key, password=settings.redis_password
            )
            if settings.redis_url
            else None,
            _closers=[rate_limiter.aclose],  # the Redis connections, if any
        )

    @property
    def live_feed(self) -> LiveFeed | None:
        """Committed events as they arrive (services/streaming/live.py); None unless this
        process runs the stream processor."""
        if self.streaming is None or self.streaming.processor is None:
            return None
        return self.streaming.live_feed

    def pipeline_status(self) -> PipelineStatusSource:
        if self.streaming is not None:
            return self.streaming.status
        return EmbeddedPipelineStatus(lambda: self.event_log.pending_events)

    def registrations(self, services: tuple[str, ...] = SERVICE_NAMES) -> list[Registration]:
        quarantine = MetadataQuarantine(self.metadata)
        available = {
            "ingestion": Registration(
                "bilten.analytics.ingestion.v1.IngestionService",
                IngestionServicer(self.pipeline, quarantine, self.pipeline_status()),
                ingestion_grpc.add_IngestionServiceServicer_to_server,
            ),
            "query": Registration(
                "bilten.analytics.query.v1.QueryService",
                QueryServicer(
                    self.event_store,
                    # Scheduled reports keep their own tables in this pod's SQLite file.
                    reports_path=Path(self.settings.data_dir) / "metadata.sqlite3",
                    metric_backend=self.metric_backend,
                    # Older ranges from the rollups (raw only until the aggregation
                    # runtime is started in this process).
                    reads=self.aggregation.reads if self.aggregation else None,
                ),
                query_grpc.add_QueryServiceServicer_to_server,
            ),
            "aggregation": Registration(
                "bilten.analytics.aggregation.v1.AggregationService",
                AggregationServicer(
                    self.event_store,
                    reads=self.aggregation.reads if self.aggregation else None,
                    cache=self.aggregation.cache if self.aggregation else None,
                    live=self.aggregation.live if self.aggregation else None,
                    alerts=self.aggregation.alerts if self.aggregation else None,
                ),
                aggregation_grpc.add_AggregationServiceServicer_to_server,
            ),
            "compliance": Registration(
                "bilten.analytics.compliance.v1.ComplianceService",
                ComplianceServicer(self.compliance_domain()),
                compliance_grpc.add_ComplianceServiceServicer_to_server,
            ),
            "prediction": Registration(
                "bilten.analytics.prediction.v1.PredictionService",
                PredictionServicer(
                    self.event_store,
                    Path(self.settings.data_dir),
                    # Anomaly alerts go to StreamAlerts through the aggregation's hub, over
                    # Redis to every process's hub when a Redis URL is set.
                    service=PredictionService(
                        self.event_store,
                        Path(self.settings.data_dir),
                        sink=self.alert_bus
                        or (self.aggregation.alerts if self.aggregation else None),
                    ),
                ),
                prediction_grpc.add_PredictionServiceServicer_to_server,
            ),
        }
        return [available[name] for name in services]

    def compliance_domain(self) -> ComplianceDomain:
        assert self.consent is not None and self.audit is not None
        settings = self.settings
        elsewhere = []
        if settings.event_log == "kafka":
            elsewhere = [
                f"Kafka topic {settings.kafka_events_topic}",
                f"Pinot table {settings.pinot_table}",
            ]
        return ComplianceDomain(
            consent=self.consent,
            erasure=ErasureService(
                self.metadata,
                self.event_store,
                self.consent,
                elsewhere,
                after_erase=self._drop_cached_results,
                keys=self.streaming.subject_keys if self.streaming is not None else None,
                # Cluster shape: the processor hosts apply it to their stores themselves.
                hosts=self._shared_erasures(),
                hosts_bound=timedelta(seconds=settings.erasure_apply_interval_seconds),
                orders=self.event_store,
                rollups=self._rollup_maintainer,
            ),
            events=self.event_store,
            retention=RetentionPolicies(self.metadata),
            audit=self.audit,
            api_keys=ApiKeyManager(
                self.metadata, self.secrets.api_key_pepper, self._forget_api_key
            ),
            allowlist=IpAllowlist(settings.sensitive_ip_allowlist, settings.trust_forwarded_for),
        )

    async def _start_retention_job(self, services: tuple[str, ...]) -> None:
        """Scheduled raw retention where this process writes the event store: the
        embedded process serving ingestion, or a stream processor host with Kafka."""
        interval = self.settings.retention_enforce_interval_seconds
        writes_store = (
            any(name in PROCESSOR_HOSTS for name in services)
            if self.streaming is not None
            else "ingestion" in services
        )
        if not interval or not writes_store or self.audit is None:
            return
        maintainer = self.aggregation.maintainer if self.aggregation is not None else None
        job = RetentionJob(
            RetentionPolicies(self.metadata),
            self.event_store,
            self.audit,
            timedelta(seconds=interval),
            before_delete=maintainer.flush if maintainer is not None else None,
        )
        await job.start()
        self.retention_job = job
        self._closers.append(job.aclose)

    def _shared_erasures(self) -> PostgresMetadataStore | None:
        """The metadata store every processor host applies erasures from: with Kafka each
        host holds its own event store copy (services/compliance/erasure_hosts.py)."""
        if self.streaming is not None and isinstance(self.metadata, PostgresMetadataStore):
            return self.metadata
        return None

    async def _start_erasure_applier(self) -> ErasedSubjects | None:
        """On a processor host of the cluster shape: the erased subjects loaded and the
        pending erasures applied before the processor consumes, then the schedule."""
        feed = self._shared_erasures()
        if feed is None:
            return None
        settings = self.settings
        applier = ErasureApplier(
            feed,
            self.event_store,
            host_id(settings.processor_instance_id, settings.data_dir),
            ErasedSubjects(),
            timedelta(seconds=settings.erasure_apply_interval_seconds),
            # Older events have left the topic: they cannot be consumed again.
            lookback=timedelta(days=settings.raw_retention_days + 1),
            keys=self.streaming.subject_keys if self.streaming is not None else None,
            after_erase=self._drop_cached_results,
            orders=self.event_store,
            rollups=self._rollup_maintainer,
        )
        await asyncio.to_thread(applier.load)
        await asyncio.to_thread(applier.apply_pending)
        applier.start()
        self.erasure_applier = applier
        self._closers.append(applier.aclose)
        return applier.erased

    def _forget_api_key(self, key_id: str) -> None:
        """A key was revoked or rotated here: this process's cache drops it at once, and
        the others' too when Redis carries the announcement."""
        self.authenticator.forget_api_key(key_id)
        if self.key_revocations is not None:
            self.key_revocations.announce(key_id)

    def _rollup_maintainer(self) -> RollupMaintainer | None:
        """The erasure hook's target: this process's rollups, if it runs the aggregation
        runtime (set when that starts, hence asked at each erasure)."""
        return self.aggregation.maintainer if self.aggregation is not None else None

    def _drop_cached_results(self, tenant_id: str) -> None:
        if self.aggregation is not None:
            self.aggregation.cache.invalidate([tenant_id])

    async def start(self, services: tuple[str, ...] = SERVICE_NAMES) -> int:
        if self.aggregation is not None and "aggregation" in services:
            # Before the server and the processor: rollups rebuilt, live numbers seeded.
            await self.aggregation.start(self.streaming.live_feed if self.streaming else None)
        if self.streaming is not None:
            await self.streaming.start()
            if any(name in PROCESSOR_HOSTS for name in services):
                erased = await self._start_erasure_applier()
                await self.streaming.start_processor(self.event_store, erased)
        await self._start_retention_job(services)
        if self.key_revocations is not None:
            # Every process authenticates callers, so every one listens.
            await self.key_revocations.start()
            self._closers.append(self.key_revocations.aclose)
        if self.alert_bus is not None:
            if "aggregation" in services:
                await self.alert_bus.start()  # relays other processes' alerts to StreamAlerts
            self._closers.append(self.alert_bus.aclose)
        registrations = self.registrations(tuple(name for name in services if name != "processor"))
        for registration in registrations:
            if isinstance(registration.servicer, PredictionServicer):
                # The anomaly monitor and the retraining schedule run where prediction
                # is served, from the start rather than from the first prediction call.
                registration.servicer.start_background()
                self._closers.append(registration.servicer.service.aclose)
                # Streaming detection on the committed batches the live dashboards see:
                # through the aggregation runtime where it runs in this process, else
                # straight from this process's stream processor (a prediction pod).
                self.prediction = registration.servicer.service
                live_check = registration.servicer.service.live
                fed = self.aggregation is not None and self.aggregation.add_observer(live_check)
                if not fed and self.live_feed is not None:
                    task = asyncio.ensure_future(follow_live_feed(self.live_feed, live_check))
                    self._closers.append(functools.partial(_cancel, task))
            elif isinstance(registration.servicer, QueryServicer):
                # The report scheduler: started with the server, stopped (after the
                # report it is running) before the stores close.
                registration.servicer.start_background()
                self._closers.append(registration.servicer.aclose)
        self.server, self.port, _ = await start_grpc_server(
            registrations,
            self.authenticator,
            self.settings.grpc_host,
            self.settings.grpc_port,
            audit=self.audit,
        )
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        if self.aggregation is not None:
            await self.aggregation.end_streams()  # live streams would hold `grace` up
        if self.server is not None:
            await self.server.stop(grace)
        for close in self._closers:
            await close()
        if self.streaming is not None:
            await self.streaming.close()
        await self.event_log.close()
        if self.aggregation is not None:
            await self.aggregation.close()  # last rollup flush, after the last append
        self.event_store.close()
        self.metadata.close()

    def platform_token(self, ttl_seconds: int = 3600) -> str:
        """A short-lived platform-admin token for the platform's own set-up calls."""
        return self.tokens.issue("bilten-platform", "", frozenset({Scope.ADMIN}), ttl_seconds)

    def registry(self) -> EmbeddedRegistry:
        """The schema registry on the embedded metadata: SQLite next to the other stores,
        the platform's credentials."""
        data_dir = Path(self.settings.data_dir).resolve()
        return EmbeddedRegistry(
            RegistrySettings(
                host=self.settings.grpc_host,
                port=self.settings.schema_registry_port,
                storage=f"sqlite:///{data_dir / 'schema-registry.sqlite3'}",
            ),
            PlatformRegistryAuthenticator(self.authenticator),
        )

    def ensure_dev_credentials(self) -> dict[str, str]:
        """First start: a dev tenant, an organizer-admin token and a write key.

        Later starts reuse the tenant and write key and issue a fresh token, because
        tokens expire and only the key's hash is stored.
        """
        path = Path(self.settings.data_dir) / CREDENTIALS_FILE
        stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        tenant_id = stored.get("tenant_id") or f"tenant_{uuid.uuid4().hex[:12]}"
        if self.metadata.get_tenant(tenant_id) is None:
            self.metadata.create_tenant(Tenant(tenant_id, "Dev organizer", datetime.now(UTC)))
        write_key = stored.get("write_key", "")
        if not write_key or self.authenticator_rejects(write_key):
            key_id, write_key, secret_hash = new_api_key(self.secrets.api_key_pepper)
            self.metadata.add_api_key(
                ApiKeyRecord(key_id, tenant_id, secret_hash, WRITE_KEY_SCOPES, datetime.now(UTC))
            )
        credentials = {
            "tenant_id": tenant_id,
            "admin_token": self.tokens.issue(
                "dev-admin", tenant_id, ORGANIZER_ADMIN_SCOPES, ttl_seconds=30 * 86_400
            ),
            "platform_admin_token": self.tokens.issue(
                "dev-platform-admin", "", frozenset({Scope.ADMIN}), ttl_seconds=30 * 86_400
            ),
            "write_key": write_key,
            "grpc_target": f"{self.settings.grpc_host}:{self.port or self.settings.grpc_port}",
            "rest_url": f"http://127.0.0.1:{self.settings.http_port}",
        }
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(credentials, f, indent=2)
        os.replace(tmp, path)
        return credentials

    def authenticator_rejects(self, credential: str) -> bool:
        try:
            self.authenticator.authenticate(credential)
        except Exception:
            return True
        return False


async def wait_forever(stop: asyncio.Event) -> None:
    await stop.wait()


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
