"""gRPC adapter of the aggregation service."""

from __future__ import annotations

from bilten.analytics.aggregation.v1 import aggregation_service_pb2 as pb
from bilten.analytics.aggregation.v1 import aggregation_service_pb2_grpc as pb_grpc
from services.platform.unbuilt import answer_unbuilt
from services.storage.event_store import EventStore


@answer_unbuilt(pb.DESCRIPTOR.services_by_name["AggregationService"], "issue #5, analytics")
class AggregationServicer(pb_grpc.AggregationServiceServicer):
    def __init__(self, store: EventStore) -> None:
        self._store = store
