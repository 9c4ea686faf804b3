"""The one bootstrap of every gRPC server: grpc.aio, the edge interceptor, health and
reflection. Services plug in through `Registration`s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from services.platform.audit import AuditSink
from services.platform.auth import Authenticator
from services.platform.grpc_edge import EdgeInterceptor

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Registration:
    """One gRPC service to serve: its full name, servicer, and generated `add_…` function."""

    service_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


async def start_grpc_server(
    registrations: list[Registration],
    authenticator: Authenticator,
    host: str,
    port: int,
    audit: AuditSink | None = None,
) -> tuple[grpc.aio.Server, int, AsyncHealthServicer]:
    """Starts serving; returns the server, the bound port and its health servicer.
    With `audit`, every call is recorded in the audit log (services/platform/audit.py)."""
    server = grpc.aio.server(
        interceptors=[EdgeInterceptor(authenticator, audit)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)
    names = [r.service_name for r in registrations]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    await server.start()
    for name in [*names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer
