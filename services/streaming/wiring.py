"""Composition of the Kafka shape from the platform settings, for `services.mesh`.

- every Kafka process: the topic layout (created at start if missing), the envelope's
  registry id, the producer (`KafkaEventLog`) and the lag reader for `GetPipelineStatus`;
- the process that owns the event store (`up --event-log kafka`, `serve processor`):
  the stream processor and the live feed it publishes to;
- with `crypto_shredding`: the subject key store (the data dir's `subject_keys.sqlite3`,
  or tables in the PostgreSQL metadata database when `metadata_store_url` is set, so the
  pods share it), sealing PII in the producer, opening it in the processor and destroyed
  by erasure (`Mesh.compliance_domain`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from services.compliance.erasure_hosts import ErasedSubjects
from services.compliance.pii_cipher import PiiCipher
from services.compliance.subject_keys import BaseSubjectKeyStore, open_subject_key_store
from services.platform.secrets_file import load_secrets
from services.platform.settings import PlatformSettings
from services.storage.event_store import DuckDBEventStore
from services.streaming.kafka_log import KafkaEventLog
from services.streaming.live import LiveFeed
from services.streaming.pii import PiiOpener, PiiSealer
from services.streaming.processor import ProcessorConfig, StreamProcessor
from services.streaming.schemas import EnvelopeSchemaId, PersonalFieldsById, WriterSchemas
from services.streaming.status import KafkaPipelineStatus, observe_processor
from services.streaming.topics import TopicLayout, build_layout

log = structlog.get_logger("bilten.streaming")


def topic_layout(settings: PlatformSettings) -> TopicLayout:
    return build_layout(
        settings.kafka_events_topic,
        partitions=settings.kafka_events_partitions,
        replication_factor=settings.kafka_replication_factor,
        retention_days=settings.raw_retention_days,
    )


def processor_config(settings: PlatformSettings) -> ProcessorConfig:
    layout = topic_layout(settings)
    return ProcessorConfig(
        bootstrap=settings.kafka_bootstrap_servers,
        topic=layout.events.name,
        dead_letter_topic=layout.dead_letter.name,
        group_id=settings.processor_group_id,
        workers=settings.processor_workers,
        max_batch_events=settings.processor_max_batch_events,
        max_batch_seconds=settings.processor_max_batch_seconds,
        session_timeout_ms=settings.processor_session_timeout_ms,
        instance_id=settings.processor_instance_id,
        client_config=dict(settings.kafka_client_config),
        # Topic duplicates are dropped within the longest window any tenant has: the
        # per-tenant windows shorter than the platform's apply at ingestion only.
        dedup_window_seconds=settings.longest_dedup_window_seconds,
    )


@dataclass
class KafkaStreaming:
    settings: PlatformSettings
    registry_token: str
    event_log: KafkaEventLog
    status: KafkaPipelineStatus
    live_feed: LiveFeed = field(default_factory=LiveFeed)
    processor: StreamProcessor | None = None
    subject_keys: BaseSubjectKeyStore | None = None  # crypto-shredding on

    @classmethod
    def open(cls, settings: PlatformSettings, registry_token: str) -> KafkaStreaming:
        layout = topic_layout(settings)
        token = settings.schema_registry_token or registry_token
        subject_keys = None
        sealer = None
        if settings.crypto_shredding:
            # Shared by every pod (PostgreSQL) when the metadata is: sealing, opening and
            # destroying must see one set of keys.
            subject_keys = open_subject_key_store(
                settings.metadata_store_url,
                settings.data_dir,
                load_secrets(settings).subject_key_encryption_key,
            )
            sealer = PiiSealer(
                PiiCipher(subject_keys), PersonalFieldsById(settings.registry_url, token)
            )
        event_log = KafkaEventLog(
            bootstrap=settings.kafka_bootstrap_servers,
            layout=layout,
            schema_id=EnvelopeSchemaId(settings.registry_url, token, layout.events.name),
            append_timeout_seconds=settings.kafka_append_timeout_seconds,
            max_pending_events=settings.max_pending_events,
            client_config=dict(settings.kafka_client_config),
            pii=sealer,
        )
        status = KafkaPipelineStatus(
            settings.kafka_bootstrap_servers,
            layout.events.name,
            settings.processor_group_id,
            dict(settings.kafka_client_config),
            pending=lambda: event_log.pending_events,
        )
        return cls(settings, token, event_log, status, subject_keys=subject_keys)

    async def start(self) -> None:
        """Topics and the envelope id; a broker or registry that is not up yet is logged
        and retried by the first appends (they answer UNAVAILABLE meanwhile)."""
        await self.event_log.start()

    async def start_processor(
        self, store: DuckDBEventStore, erased: ErasedSubjects | None = None
    ) -> StreamProcessor:
        """Runs the processor over `store` (the process must own the store's file);
        `erased`: the subjects whose earlier events it must not store again
        (services/compliance/erasure_hosts.py)."""
        # The processor seeks to the store's offsets, so the topics must exist first.
        await self.event_log.start()
        processor = StreamProcessor(
            processor_config(self.settings),
            store,
            WriterSchemas(self.settings.registry_url, self.registry_token),
            self.live_feed,
            pii=None if self.subject_keys is None else PiiOpener(PiiCipher(self.subject_keys)),
            erased=erased,
        )
        await asyncio.to_thread(processor.start)
        observe_processor(processor.lag, lambda: processor.stats, processor.config.topic)
        self.processor = processor
        return processor

    async def close(self) -> None:
        """Processor first (it commits what it holds into the still-open store), then
        the producer (it waits for the acknowledgements still due)."""
        if self.processor is not None:
            await asyncio.to_thread(self.processor.stop)
        await self.event_log.close()
        if self.subject_keys is not None:
            self.subject_keys.close()
