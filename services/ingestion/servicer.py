"""gRPC adapter of the ingestion service: proto in, pipeline, proto out. No rules here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Protocol

import grpc
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import tracked_event_pb2
from google.protobuf import timestamp_pb2

from services.events.model import TrackedEventType
from services.ingestion import convert
from services.ingestion.pipeline import IngestionPipeline, IngestOutcome, IngestStatus
from services.platform.errors import FieldViolation, invalid_request, not_found
from services.platform.grpc_edge import current_item_violations, principal
from services.platform.validation import violations
from services.storage.metadata_store import QuarantineEntry
from services.streaming.status import PipelineStatusSource

MAX_NOT_ACCEPTED_RESULTS = 1000


class QuarantineReader(Protocol):
    async def list_quarantined(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[QuarantineEntry], str]: ...

    async def get_quarantined(
        self, tenant_id: str, ids: Sequence[str]
    ) -> dict[str, QuarantineEntry]: ...

    async def delete_quarantined(self, tenant_id: str, ids: Sequence[str]) -> None: ...


def _peer(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
    metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    forwarded = metadata.get("x-forwarded-for", "")
    if forwarded:
        ip = forwarded.split(",")[0].strip()
    else:
        peer = context.peer() or ""
        # "ipv4:1.2.3.4:5678" or "ipv6:[::1]:5678"
        kind, _, rest = peer.partition(":")
        ip = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    return ip, metadata.get("user-agent", "") if forwarded else ""


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


_EVENT_LOG_KINDS = {"embedded": pb.EVENT_LOG_KIND_EMBEDDED, "kafka": pb.EVENT_LOG_KIND_KAFKA}


class IngestionServicer(pb_grpc.IngestionServiceServicer):
    def __init__(
        self,
        pipeline: IngestionPipeline,
        quarantine: QuarantineReader,
        pipeline_status: PipelineStatusSource | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._quarantine = quarantine
        self._pipeline_status = pipeline_status

    async def _ingest_batch(
        self,
        events: Sequence[tracked_event_pb2.TrackedEvent],
        context: grpc.aio.ServicerContext[Any, Any],
        item_violations: dict[int, list[FieldViolation]],
        check_shape: bool = False,
    ) -> list[IngestOutcome]:
        """`check_shape`: the edge left the items' shape rules to this call
        (grpc_edge.ITEMS_VALIDATED_BY_SERVICER); they are checked during the conversion.
        Violations the edge did report for an item (same rules, same result) win."""
        ip, user_agent = _peer(context)
        caller = principal()
        if check_shape:
            shape_violations: dict[int, list[FieldViolation]] = {}
            incoming = convert.incoming_events(
                events, ip, user_agent, shape_violations=shape_violations, items_field="events"
            )
            if item_violations:
                shape_violations.update(item_violations)
            item_violations = shape_violations
        else:
            incoming = convert.incoming_events(events, ip, user_agent)
        return await self._pipeline.ingest(
            caller.tenant_id, caller.subject, incoming, "events", item_violations
        )

    async def _ingest_one(
        self,
        event: tracked_event_pb2.TrackedEvent,
        context: grpc.aio.ServicerContext[Any, Any],
        implied_type: TrackedEventType,
    ) -> pb.IngestResult:
        ip, user_agent = _peer(context)
        caller = principal()
        # Shape violations of the event arrive per item (see access.PER_ITEM_VALIDATION),
        # so a bad event is quarantined before the call fails with INVALID_ARGUMENT.
        (outcome,) = await self._pipeline.ingest(
            caller.tenant_id,
            caller.subject,
            convert.incoming_events((event,), ip, user_agent),
            "event",
            current_item_violations.get(),
            implied_type,
        )
        if outcome.status is IngestStatus.REJECTED:
            reason = outcome.rejection_reason.value if outcome.rejection_reason else ""
            error = invalid_request(
                [FieldViolation(outcome.field_path, outcome.message)],
                f"event rejected ({reason}): {outcome.message}",
            )
            error.metadata["quarantined_event_id"] = outcome.quarantined_event_id
            error.metadata["rejection_reason"] = reason
            raise error
        return convert.ingest_result(outcome)

    async def Track(self, request: pb.TrackRequest, context: Any) -> pb.TrackResponse:
        result = await self._ingest_one(request.event, context, TrackedEventType.TRACK)
        return pb.TrackResponse(result=result)

    async def TrackPage(self, request: pb.TrackPageRequest, context: Any) -> pb.TrackPageResponse:
        result = await self._ingest_one(request.event, context, TrackedEventType.PAGE_VIEW)
        return pb.TrackPageResponse(result=result)

    async def TrackConversion(
        self, request: pb.TrackConversionRequest, context: Any
    ) -> pb.TrackConversionResponse:
        result = await self._ingest_one(request.event, context, TrackedEventType.CONVERSION)
        return pb.TrackConversionResponse(result=result)

    async def TrackCustom(
        self, request: pb.TrackCustomRequest, context: Any
    ) -> pb.TrackCustomResponse:
        result = await self._ingest_one(request.event, context, TrackedEventType.CUSTOM)
        return pb.TrackCustomResponse(result=result)

    async def IngestEvents(
        self, request: pb.IngestEventsRequest, context: Any
    ) -> pb.IngestEventsResponse:
        outcomes = await self._ingest_batch(
            request.events, context, current_item_violations.get(), check_shape=True
        )
        # Counted in Python and set once: `+= 1` on a proto field is a call per event.
        accepted = duplicates = 0
        for outcome in outcomes:
            if outcome.status is IngestStatus.ACCEPTED:
                accepted += 1
            elif outcome.status is IngestStatus.DUPLICATE:
                duplicates += 1
        response = pb.IngestEventsResponse(
            accepted_count=accepted,
            duplicate_count=duplicates,
            rejected_count=len(outcomes) - accepted - duplicates,
        )
        convert.add_ingest_results(response.results, outcomes)
        return response

    async def UploadEvents(
        self, request_iterator: AsyncIterator[pb.UploadEventsRequest], context: Any
    ) -> pb.UploadEventsResponse:
        response = pb.UploadEventsResponse()
        async for chunk in request_iterator:
            outcomes = await self._ingest_batch(
                chunk.events, context, current_item_violations.get(), check_shape=True
            )
            for outcome in outcomes:
                if outcome.status is IngestStatus.ACCEPTED:
                    response.accepted_count += 1
                    continue
                if outcome.status is IngestStatus.DUPLICATE:
                    response.duplicate_count += 1
                else:
                    response.rejected_count += 1
                if len(response.not_accepted_results) < MAX_NOT_ACCEPTED_RESULTS:
                    response.not_accepted_results.append(convert.ingest_result(outcome))
                else:
                    response.not_accepted_truncated = True
        return response

    async def ListQuarantinedEvents(
        self, request: pb.ListQuarantinedEventsRequest, context: Any
    ) -> pb.ListQuarantinedEventsResponse:
        entries, next_token = await self._quarantine.list_quarantined(
            principal().tenant_id, request.page_size or 100, request.page_token
        )
        return pb.ListQuarantinedEventsResponse(
            quarantined_events=[
                pb.QuarantinedEvent(
                    quarantined_event_id=e.quarantined_event_id,
                    receive_time=_timestamp(e.received_at),
                    rejection_reason=pb.RejectionReason.Value("REJECTION_REASON_" + e.reason),
                    field_path=e.field_path,
                    message=e.message,
                    event_json=e.event_json,
                )
                for e in entries
            ],
            next_page_token=next_token,
        )

    async def ReplayQuarantinedEvents(
        self, request: pb.ReplayQuarantinedEventsRequest, context: Any
    ) -> pb.ReplayQuarantinedEventsResponse:
        caller = principal()
        ids = list(request.quarantined_event_ids)
        found = await self._quarantine.get_quarantined(caller.tenant_id, ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise not_found(f"quarantined event {missing[0]!r}")
        events = []
        for quarantine_id in ids:
            try:
                events.append(convert.event_from_json(found[quarantine_id].event_json))
            except Exception as exc:  # stored JSON that no longer parses
                raise invalid_request(
                    [FieldViolation("quarantined_event_ids", f"{quarantine_id}: {exc}")]
                ) from exc
        per_item: dict[int, list[FieldViolation]] = {}
        for index, event in enumerate(events):
            shape = violations(event)
            if shape:
                per_item[index] = [
                    FieldViolation(f"events[{index}].{v.field}", v.description) for v in shape
                ]
        outcomes = await self._ingest_batch(events, context, per_item)
        # The replayed copies that were rejected again got new quarantine entries; the
        # old entries are now superseded in every case.
        await self._quarantine.delete_quarantined(caller.tenant_id, ids)
        return pb.ReplayQuarantinedEventsResponse(results=convert.ingest_results(outcomes))

    async def GetPipelineStatus(
        self, request: pb.GetPipelineStatusRequest, context: Any
    ) -> pb.GetPipelineStatusResponse:
        if self._pipeline_status is None:
            return pb.GetPipelineStatusResponse(event_log=pb.EVENT_LOG_KIND_EMBEDDED)
        status = await self._pipeline_status.status()
        return pb.GetPipelineStatusResponse(
            event_log=_EVENT_LOG_KINDS[status.event_log],
            observe_time=_timestamp(status.observed_at),
            pending_event_count=status.pending_events,
            topic=status.topic,
            consumer_group=status.consumer_group,
            partitions=[
                pb.EventLogPartitionStatus(
                    partition=p.partition,
                    end_offset=p.end_offset,
                    committed_offset=p.committed_offset,
                    lag=p.lag,
                )
                for p in status.partitions
            ],
            total_lag=status.total_lag,
        )
