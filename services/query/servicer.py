"""gRPC adapter of the query service."""

from __future__ import annotations

from bilten.analytics.query.v1 import query_service_pb2 as pb
from bilten.analytics.query.v1 import query_service_pb2_grpc as pb_grpc
from services.platform.unbuilt import answer_unbuilt
from services.storage.event_store import EventStore


@answer_unbuilt(pb.DESCRIPTOR.services_by_name["QueryService"], "issue #5, analytics")
class QueryServicer(pb_grpc.QueryServiceServicer):
    def __init__(self, store: EventStore) -> None:
        self._store = store
