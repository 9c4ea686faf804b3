"""The WebSocket server: one gRPC stream per connection, JSON frames out.

Frames (text, JSON): `{"type": "metric_update" | "alert_triggered", "data": <the
response message as Envoy's transcoder renders it: camelCase, defaults included>}`;
on failure `{"type": "error", "error": {"code": <gRPC status name>, "message": ...}}`,
then a close with `routes.close_code` (e.g. 4401 for a bad credential, 4503 when the
server shuts down). Incoming frames are ignored; pings keep proxies from timing out.

Slow clients: a reader task drains the gRPC stream into a mailbox, so the gRPC side
never backs up; metric streams keep only the newest state (their missed updates are
added to `droppedUpdateCount`), alert streams keep the last 256 alerts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import grpc
import structlog
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from services.live.mailbox import Mailbox
from services.websocket_bridge import routes

log = structlog.get_logger(__name__)

_ALERT_BUFFER = 256


def _data(message: Message) -> dict[str, Any]:
    return MessageToDict(message, always_print_fields_with_no_presence=True)


class WebSocketBridge:
    def __init__(self, grpc_target: str) -> None:
        self._target = grpc_target
        self._channel: grpc.aio.Channel | None = None
        self._server: Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listens; returns the bound port (`port=0` picks a free one)."""
        self._channel = grpc.aio.insecure_channel(self._target)
        self._server = await serve(
            self._serve,
            host,
            port,
            process_request=self._check,
            select_subprotocol=self._select,
            ping_interval=20,
            server_header=None,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._channel is not None:
            await self._channel.close(None)

    @staticmethod
    def _subprotocols(headers: Headers) -> list[str]:
        return [
            value.strip()
            for line in headers.get_all("Sec-WebSocket-Protocol")
            for value in line.split(",")
            if value.strip()
        ]

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuses unknown paths and handshakes without any credential, as HTTP errors."""
        if routes.route(request.path) is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "no such live stream\n")
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        if not routes.credential(request.path, headers, self._subprotocols(request.headers)):
            return connection.respond(
                HTTPStatus.UNAUTHORIZED,
                "send a token: Authorization header, `bearer.<token>` subprotocol "
                "or `token` query parameter\n",
            )
        return None

    @staticmethod
    def _select(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        # Only ever the protocol name: the bearer subprotocol carries a secret.
        return Subprotocol(routes.PROTOCOL) if routes.PROTOCOL in offered else None

    async def _serve(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None and self._channel is not None
        route = routes.route(request.path)
        assert route is not None  # _check refused the others
        headers: Mapping[str, str] = {k.lower(): v for k, v in request.headers.raw_items()}
        token = routes.credential(request.path, headers, self._subprotocols(request.headers))
        call = self._channel.unary_stream(
            route.method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=route.response_type.FromString,
        )(route.request, metadata=(("authorization", f"Bearer {token}"),))
        capacity = 1 if route.kind == "metrics" else _ALERT_BUFFER
        mailbox: Mailbox[Message | grpc.aio.AioRpcError | None] = Mailbox(capacity)
        reader = asyncio.ensure_future(self._read(call, mailbox))
        writer = asyncio.ensure_future(self._write(connection, route, mailbox))
        # A client that leaves (or the server closing) must end the handler even while
        # the stream is quiet (an alerts stream may send nothing for hours).
        closed = asyncio.ensure_future(connection.wait_closed())
        try:
            await asyncio.wait({writer, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            call.cancel()
            for task in (reader, writer, closed):
                task.cancel()
            for task in (reader, writer, closed):
                # The client going away mid-send is the normal end of a live stream.
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task

    @staticmethod
    async def _read(call: Any, mailbox: Mailbox[Message | grpc.aio.AioRpcError | None]) -> None:
        """Drains the gRPC stream; a final None (ended) or the error closes the mailbox."""
        try:
            async for message in call:
                mailbox.offer(message)
            mailbox.offer(None)
        except grpc.aio.AioRpcError as error:
            mailbox.offer(error)
        mailbox.close()

    @staticmethod
    async def _write(
        connection: ServerConnection,
        route: routes.Route,
        mailbox: Mailbox[Message | grpc.aio.AioRpcError | None],
    ) -> None:
        # The mailbox may drop the stream's end marker for a reader that is behind;
        # a closed, drained mailbox then ends the loop the same way.
        async for item in _drain(mailbox):
            if isinstance(item, grpc.aio.AioRpcError):
                code = item.code().name
                await connection.send(
                    json.dumps(
                        {"type": "error", "error": {"code": code, "message": item.details()}}
                    )
                )
                await connection.close(routes.close_code(code), code.lower()[:100])
                return
            if item is None:
                break
            if getattr(item, "error_message", ""):
                # The in-band message before a failing status: the status follows.
                continue
            data = _data(item)
            if route.kind == "metrics" and mailbox.dropped:
                data["droppedUpdateCount"] = str(int(data["droppedUpdateCount"]) + mailbox.dropped)
            await connection.send(json.dumps({"type": route.message_type, "data": data}))
        await connection.close(1000, "stream ended")


async def _drain(mailbox: Mailbox[Any]) -> AsyncIterator[Any]:
    while True:
        try:
            yield await mailbox.get()
        except StopAsyncIteration:
            return
