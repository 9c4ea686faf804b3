"""The edge of every gRPC server: authentication, scopes, validation, errors, telemetry.

One interceptor applies the same chain to every RPC, so servicers receive requests that
are authenticated, authorised and well-formed, and only raise `AnalyticsError`s.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

import grpc
import structlog
from buf.validate import validate_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import metrics, trace

from services.platform import validation
from services.platform.access import PER_ITEM_VALIDATION, PUBLIC_METHOD_PREFIXES, REQUIRED_SCOPES
from services.platform.audit import (
    RESOURCE_FIELDS,
    AuditEvent,
    AuditSink,
    client_address,
    resource_label,
    should_audit,
)
from services.platform.auth import Authenticator, Principal
from services.platform.errors import (
    ERROR_DOMAIN,
    AnalyticsError,
    FieldViolation,
    StatusCode,
    invalid_request,
    scope_missing,
)

log = structlog.get_logger(__name__)

current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")
# Per-item violations of the current batch message (see access.PER_ITEM_VALIDATION).
current_item_violations: contextvars.ContextVar[dict[int, list[FieldViolation]]] = (
    contextvars.ContextVar("item_violations", default={})  # noqa: B039 - never mutated
)

_tracer = trace.get_tracer("bilten.analytics.grpc")
_meter = metrics.get_meter("bilten.analytics.grpc")
_rpc_count = _meter.create_counter("rpc_server_requests", description="RPCs by method and code")
_rpc_duration = _meter.create_histogram(
    "rpc_server_duration", unit="ms", description="RPC latency by method"
)


_INGESTION = "/bilten.analytics.ingestion.v1.IngestionService/"
# Batch RPCs whose servicer checks its items' shape rules itself, in one pass over the
# batch with its conversion (services/ingestion/shape.py: the same rules, paths and
# descriptions as protovalidate at a tenth of the cost), and reports them per item like
# the edge would. The edge checks only the request's own rule, the item count; a request
# message with any other rule is validated here in full (see `_count_rules`).
# tests/unit/test_ingestion_shape.py proves every rule of the event is still enforced.
ITEMS_VALIDATED_BY_SERVICER = frozenset({_INGESTION + "IngestEvents", _INGESTION + "UploadEvents"})

# buf.validate's extensions (by descriptor: the generated stubs do not declare them).
_MESSAGE_RULES: Any = validate_pb2.DESCRIPTOR.extensions_by_name["message"]
_FIELD_RULES: Any = validate_pb2.DESCRIPTOR.extensions_by_name["field"]

# Per request message: (items field, min_items, max_items) when its only rule is the
# item count of its only field; None when it has any other rule.
_count_rules_cache: dict[Descriptor, tuple[str, int, int] | None] = {}


def _count_rules(descriptor: Descriptor, items_field: str) -> tuple[str, int, int] | None:
    if descriptor in _count_rules_cache:
        return _count_rules_cache[descriptor]
    rules: tuple[str, int, int] | None = None
    fields = descriptor.fields
    field = descriptor.fields_by_name.get(items_field)
    if (
        len(fields) == 1
        and field is not None
        and field.is_repeated
        and not descriptor.oneofs
        and not descriptor.GetOptions().HasExtension(_MESSAGE_RULES)
    ):
        options = field.GetOptions()
        field_rules: Any = options.Extensions[_FIELD_RULES]
        repeated = field_rules.repeated
        if [f.name for f, _ in field_rules.ListFields()] == ["repeated"] and {
            f.name for f, _ in repeated.ListFields()
        } <= {"min_items", "max_items"}:
            max_items = repeated.max_items if repeated.HasField("max_items") else 2**63
            rules = (items_field, repeated.min_items, max_items)
    _count_rules_cache[descriptor] = rules
    return rules


def _item_count_violations(request: Message, items_field: str) -> list[FieldViolation] | None:
    """protovalidate's violations of a request whose only rule is its item count (with
    its descriptions); None when the request has other rules (validate it in full)."""
    rules = _count_rules(cast(Descriptor, request.DESCRIPTOR), items_field)
    if rules is None:
        return None
    name, min_items, max_items = rules
    count = len(getattr(request, name))
    if count < min_items:
        return [FieldViolation(name, f"must contain at least {min_items} item(s)")]
    if count > max_items:
        return [FieldViolation(name, f"must contain no more than {max_items} item(s)")]
    return []


def principal() -> Principal:
    """The caller of the RPC being served."""
    return current_principal.get()


def _credential(metadata: dict[str, str]) -> str:
    api_key = metadata.get("x-api-key", "")
    if api_key:
        return api_key
    auth = metadata.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    return ""


def to_rpc_status(error: AnalyticsError) -> grpc.Status:
    details = []
    info = error_details_pb2.ErrorInfo(
        reason=f"ERROR_REASON_{error.reason}", domain=ERROR_DOMAIN, metadata=error.metadata
    )
    details.append(info)
    if error.field_violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in error.field_violations[:100]
                ]
            )
        )
    if error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_seconds * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.value), message=error.message, details=packed
    )
    return rpc_status.to_status(status)


class Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message, so that the
    edge answers INVALID_ARGUMENT instead of grpc's UNKNOWN for a failed deserializer."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def tolerant_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """`deserializer` returning an `Undecodable` rather than raising on malformed bytes."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as error:  # DecodeError, or anything a bad payload provokes
            return Undecodable(error)

    return deserialize


def _decoded(request: Message | Undecodable) -> Message:
    if isinstance(request, Undecodable):
        raise AnalyticsError(
            StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
            f"request is not a valid protobuf message for this method: {request.error}",
        )
    return request


class EdgeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, authenticator: Authenticator, audit: AuditSink | None = None) -> None:
        self._authenticator = authenticator
        self._audit = audit

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        metadata = {k: v for k, v in details.invocation_metadata if isinstance(v, str)}
        edge = _Call(self._authenticator, method, metadata, self._audit)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                edge.unary(handler.unary_unary),
                request_deserializer=tolerant_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                edge.server_stream(handler.unary_stream),  # type: ignore[arg-type]
                request_deserializer=tolerant_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                edge.client_stream(handler.stream_unary),
                request_deserializer=tolerant_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            edge.bidi_stream(handler.stream_stream),  # type: ignore[arg-type]
            request_deserializer=tolerant_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


class _Call:
    """The edge chain for one call."""

    def __init__(
        self,
        authenticator: Authenticator,
        method: str,
        metadata: dict[str, str],
        audit: AuditSink | None = None,
    ):
        self._authenticator = authenticator
        self._method = method
        self._metadata = metadata
        self._items = PER_ITEM_VALIDATION.get(method)
        self._items_in_servicer = method in ITEMS_VALIDATED_BY_SERVICER
        self._audit = audit
        self._caller: Principal | None = None
        self._resource = ""
        self._audited = False
        self._peer = ""

    def _note_peer(self, context: Any) -> None:
        # Read once while the call is certainly alive: after a client hangs up on a
        # stream, grpc.aio frees the call, and `context.peer()` / `context.cancelled()`
        # from the handler's `finally` then crash the process (SIGSEGV, seen on the
        # aggregation service's live streams). Nothing reads the context after the call.
        self._peer = client_address(str(context.peer()), self._metadata.get("x-forwarded-for", ""))

    def _note_resource(self, request: Message | Undecodable) -> None:
        if isinstance(request, Undecodable):
            return
        fields = request.DESCRIPTOR.fields_by_name
        for name in RESOURCE_FIELDS:
            if name in fields and fields[name].type == fields[name].TYPE_STRING:
                value = getattr(request, name)
                if value:
                    self._resource = resource_label(name, value)
                    return

    async def _record_audit(self, outcome: str) -> None:
        """After the call: who, what, on what, from where, outcome (services/platform/
        audit.py). A failure to write is logged, never turned into the call's error: the
        call has already taken effect."""
        if self._audit is None or self._audited or not should_audit(self._method, outcome):
            return
        self._audited = True
        caller = self._caller
        try:
            await self._audit.record(
                AuditEvent(
                    tenant_id=caller.tenant_id if caller else "",
                    actor=caller.subject if caller else "anonymous",
                    action=self._method,
                    resource=self._resource,
                    peer=self._peer,
                    outcome=outcome,
                    at=datetime.now(UTC),
                )
            )
        except Exception:
            log.exception("audit_write_failed", method=self._method)

    def _admit(self) -> None:
        scope = REQUIRED_SCOPES.get(self._method)
        caller = self._authenticator.authenticate(_credential(self._metadata))
        if scope is None:
            # Unknown to the access table: refuse rather than guess.
            raise AnalyticsError(
                StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", "method is not exposed"
            )
        self._caller = caller
        if not caller.has_scope(scope):
            raise scope_missing(scope)
        current_principal.set(caller)

    def _validate(self, request: Message) -> None:
        if self._items_in_servicer and self._items is not None:
            counted = _item_count_violations(request, self._items[0])
            if counted is not None:
                if counted:
                    raise invalid_request(counted)
                current_item_violations.set({})
                return
        found = validation.violations(request)
        if self._items is None:
            if found:
                raise invalid_request(found)
            return
        items_field, repeated = self._items
        request_level, per_item = validation.split_item_violations(found, items_field, repeated)
        if request_level:
            raise invalid_request(request_level)
        current_item_violations.set(per_item)

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
        if isinstance(error, AnalyticsError):
            analytics_error = error
        else:
            log.exception("rpc_failed", method=self._method)
            analytics_error = AnalyticsError(
                StatusCode.INTERNAL, "UNSPECIFIED", "internal error; it has been logged"
            )
        status = to_rpc_status(analytics_error)
        trace.get_current_span().set_attribute("rpc.grpc.status_code", status.code.name)
        self._record(analytics_error.code.value)
        await self._record_audit(analytics_error.code.value)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _record(self, code: str, started: float | None = None) -> None:
        attributes = {"rpc.method": self._method, "rpc.grpc.status_code": code}
        _rpc_count.add(1, attributes)
        if started is not None:
            _rpc_duration.record((time.perf_counter() - started) * 1000, attributes)

    def unary(self, inner: Callable[..., Awaitable[Message]]) -> Callable[..., Awaitable[Message]]:
        async def behavior(
            request: Message | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Message:
            started = time.perf_counter()
            self._note_peer(context)
            with _tracer.start_as_current_span(self._method, kind=trace.SpanKind.SERVER):
                try:
                    self._note_resource(request)
                    self._admit()
                    request = _decoded(request)
                    self._validate(request)
                    response = await inner(request, context)
                except AnalyticsError as error:
                    await self._fail(context, error)
                    raise
                except (grpc.aio.AbortError, AssertionError):
                    raise
                except Exception as error:
                    await self._fail(context, error)
                    raise
                self._record("OK", started)
                await self._record_audit("OK")
                return response

        return behavior

    def server_stream(
        self, inner: Callable[..., AsyncIterator[Message]]
    ) -> Callable[..., AsyncIterator[Message]]:
        async def behavior(
            request: Message | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Message]:
            self._note_peer(context)
            # Until the stream ends by itself: a client hanging up (or a server cancel)
            # ends it with CancelledError / GeneratorExit at a `yield`.
            outcome = "CANCELLED"
            with _tracer.start_as_current_span(self._method, kind=trace.SpanKind.SERVER):
                try:
                    self._note_resource(request)
                    self._admit()
                    request = _decoded(request)
                    self._validate(request)
                    async for response in inner(request, context):
                        yield response
                    outcome = "OK"
                except grpc.aio.AbortError:
                    outcome = "ABORTED"
                    raise
                except Exception as error:
                    await self._fail(context, error)
                    raise
                finally:
                    # A client that hangs up mid-stream still leaves a trace of what was
                    # read. Not a word to `context` here (see `_note_peer`).
                    if not self._audited:
                        await self._record_audit(outcome)
                self._record("OK")

        return behavior

    def _validated(self, requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
        async def iterate() -> AsyncIterator[Message]:
            async for received in requests:
                request = _decoded(received)
                # Runs in the consuming handler's context, so the servicer reads this
                # message's per-item violations right after receiving it.
                self._validate(request)
                yield request

        return iterate()

    def client_stream(
        self, inner: Callable[..., Awaitable[Message]]
    ) -> Callable[..., Awaitable[Message]]:
        async def behavior(requests: AsyncIterator[Message], context: Any) -> Message:
            started = time.perf_counter()
            self._note_peer(context)
            with _tracer.start_as_current_span(self._method, kind=trace.SpanKind.SERVER):
                try:
                    self._admit()
                    response = await inner(self._validated(requests), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await self._fail(context, error)
                    raise
                self._record("OK", started)
                await self._record_audit("OK")
                return response

        return behavior

    def bidi_stream(
        self, inner: Callable[..., AsyncIterator[Message]]
    ) -> Callable[..., AsyncIterator[Message]]:
        async def behavior(
            requests: AsyncIterator[Message], context: Any
        ) -> AsyncIterator[Message]:
            self._note_peer(context)
            outcome = "CANCELLED"  # as in server_stream
            with _tracer.start_as_current_span(self._method, kind=trace.SpanKind.SERVER):
                try:
                    self._admit()
                    async for response in inner(self._validated(requests), context):
                        yield response
                    outcome = "OK"
                except grpc.aio.AbortError:
                    outcome = "ABORTED"
                    raise
                except Exception as error:
                    await self._fail(context, error)
                    raise
                finally:
                    if not self._audited:
                        await self._record_audit(outcome)

        return behavior
