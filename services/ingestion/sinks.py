"""Adapters from ingestion's protocols onto the storage layer.

They translate storage failures into the platform's error model: a full or closed
event log is UNAVAILABLE with retry advice, never a silent drop or an INTERNAL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.events.model import TrackedEvent
from services.platform.errors import event_log_unavailable
from services.storage.group_commit import EventLogClosedError, EventLogFullError, GroupCommitter
from services.storage.metadata_store import MetadataStore, QuarantineEntry


class CommittingEventLog:
    """The embedded event log: group commit straight into the event store."""

    def __init__(self, committer: GroupCommitter) -> None:
        self._committer = committer

    async def append(self, events: Sequence[TrackedEvent]) -> None:
        try:
            await self._committer.append(events)
        except EventLogFullError as exc:
            raise event_log_unavailable(
                f"event log is full ({exc}); retry later", exc.retry_after_seconds
            ) from exc
        except EventLogClosedError as exc:
            raise event_log_unavailable("event log is shutting down; retry", 1.0) from exc


class MetadataQuarantine:
    """Quarantine in the metadata store; store calls run off the event loop."""

    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    async def quarantine(self, entries: Sequence[QuarantineEntry]) -> None:
        await asyncio.to_thread(self._store.add_quarantined, entries)

    async def list_quarantined(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[QuarantineEntry], str]:
        return await asyncio.to_thread(
            self._store.list_quarantined, tenant_id, page_size, page_token
        )

    async def get_quarantined(
        self, tenant_id: str, ids: Sequence[str]
    ) -> dict[str, QuarantineEntry]:
        return await asyncio.to_thread(self._store.get_quarantined, tenant_id, ids)

    async def delete_quarantined(self, tenant_id: str, ids: Sequence[str]) -> None:
        await asyncio.to_thread(self._store.delete_quarantined, tenant_id, ids)
