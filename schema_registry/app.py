"""The Confluent-compatible REST API as a raw ASGI application.

Raw ASGI rather than a framework for two reasons: ``GET /schemas/ids/{id}`` is the hot path of
every consumer (one request per new schema id per client) and is served from an in-process
cache without any per-request framework machinery, and Confluent clients percent-encode
subjects (``/`` becomes ``%2F``), so routes are matched on the raw path, segment by segment,
before decoding — a decoded-path router would split such subjects apart.

Handlers are thin: they decode query/body, call :class:`~schema_registry.registry.SchemaRegistry`
in a worker thread (the stores are blocking) and render JSON.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, unquote

import orjson
import structlog

from schema_registry import errors
from schema_registry.auth import (
    ADMIN_SCOPES,
    READ_SCOPES,
    WRITE_SCOPES,
    AllowAllAuthenticator,
    Authenticator,
    Principal,
    StaticTokenAuthenticator,
    token_from_authorization,
)
from schema_registry.errors import RegistryError
from schema_registry.registry import (
    SUPPORTED_SCHEMA_TYPES,
    SchemaRegistry,
    SchemaRequest,
    parse_level,
    parse_mode,
    parse_version,
    schema_json,
)
from schema_registry.settings import RegistrySettings
from schema_registry.storage import open_store

log = structlog.get_logger("schema_registry")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

V1_JSON: Final = "application/vnd.schemaregistry.v1+json"
DEFAULT_JSON: Final = "application/vnd.schemaregistry+json"
PLAIN_JSON: Final = "application/json"
_RESPONSE_TYPES: Final = (V1_JSON, DEFAULT_JSON, PLAIN_JSON)
# Request bodies Confluent accepts (its "generic request" is octet-stream).
_REQUEST_TYPES: Final = frozenset({V1_JSON, DEFAULT_JSON, PLAIN_JSON, "application/octet-stream"})
_MAX_BODY_BYTES: Final = 16 << 20
_AUTH_CACHE_TTL_S: Final = 10.0
_AUTH_CACHE_MAX: Final = 10_000
_ID_CACHE_MAX: Final = 100_000
# How long a process serves an id from memory: bounds how long another process on the same
# storage keeps answering for an id that a permanent delete removed.
_ID_CACHE_TTL_S: Final = 30.0

T = TypeVar("T")


@dataclass(slots=True)
class Request:
    method: str
    params: dict[str, str]
    query: dict[str, list[str]]
    body: bytes
    principal: Principal

    def flag(self, *names: str) -> bool:
        """A boolean query parameter; the Python client sends ``True``/``False``."""
        for name in names:
            values = self.query.get(name)
            if values:
                return values[-1].strip().lower() in ("true", "1", "yes")
        return False

    def text(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[-1] if values else default

    def integer(self, name: str, default: int) -> int:
        raw = self.text(name)
        if not raw:
            return default
        try:
            return int(raw)
        except ValueError:
            raise RegistryError(400, f"query parameter {name} must be an integer") from None

    def json(self) -> Any:
        if not self.body:
            return None
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            # Confluent (rest-utils' JsonParseExceptionMapper) answers 400 / error_code 400.
            raise RegistryError(400, f"Unrecognized JSON in request body: {exc}") from None


Handler = Callable[[Request], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    segments: tuple[str, ...]
    handler: Handler
    write: bool
    # Registry-wide settings (global config and mode): only the admin scope may change them.
    admin: bool = False

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for pattern, raw in zip(self.segments, parts, strict=True):
            if pattern.startswith("{"):
                params[pattern[1:-1]] = unquote(raw)
            elif pattern != raw:
                return None
        return params


class RawResponse:
    """A body that is already JSON text (a stored schema served as-is)."""

    def __init__(self, body: bytes) -> None:
        self.body = body


def _error_body(exc: RegistryError) -> bytes:
    return orjson.dumps(exc.to_json())


_NOT_FOUND = RegistryError(404, "HTTP 404 Not Found")
_METHOD_NOT_ALLOWED = RegistryError(405, "HTTP 405 Method Not Allowed")
_ID_PATH = re.compile(rb"/schemas/ids/([0-9]{1,10})\Z")


class RegistryApp:
    """The ASGI callable. Build it with :func:`create_app`."""

    def __init__(self, registry: SchemaRegistry, authenticator: Authenticator, workers: int = 8):
        self.registry = registry
        self.authenticator = authenticator
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="registry")
        self._id_cache: dict[int, tuple[float, bytes]] = {}  # id -> (expires at, body)
        self._auth_cache: dict[str, tuple[float, Principal | None]] = {}
        self.routes = self._build_routes()

    # -- ASGI entry --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = scope["headers"]
        content_type = _negotiate(_header(headers, b"accept"))
        if content_type is None:
            await _send_json(
                send,
                406,
                orjson.dumps(RegistryError(406, "HTTP 406 Not Acceptable").to_json()),
                V1_JSON,
            )
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        method: str = scope["method"]
        if raw_path == b"/" and method == "GET":
            # Confluent's root answers {} without credentials: load balancers probe it.
            await _send_json(send, 200, b"{}", content_type)
            return
        principal = self._authenticate(_header(headers, b"authorization"))
        if principal is None:
            await _send_json(
                send,
                401,
                _error_body(RegistryError(40101, "Unauthorized: missing or invalid credentials")),
                content_type,
                (b"www-authenticate", b'Basic realm="schema-registry"'),
            )
            return
        # Hot path: immutable by id, served from memory once seen.
        if method == "GET":
            match = _ID_PATH.match(raw_path)
            if match is not None:
                body = self._cached_id(int(match.group(1)))
                if body is not None:
                    if not principal.may(READ_SCOPES):
                        await self._forbidden(send, content_type)
                        return
                    await _send_json(send, 200, body, content_type)
                    return
        await self._dispatch(scope, receive, send, raw_path, method, principal, content_type)

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw_path: bytes,
        method: str,
        principal: Principal,
        content_type: str,
    ) -> None:
        path = raw_path.decode("latin-1")
        parts = path.strip("/").split("/") if path.strip("/") else []
        route, params, method_mismatch = None, None, False
        for candidate in self.routes:
            found = candidate.match(parts)
            if found is None:
                continue
            if candidate.method != method:
                method_mismatch = True
                continue
            route, params = candidate, found
            break
        try:
            if route is None or params is None:
                if parts[:1] == ["associations"]:
                    raise errors.association_not_found("/".join(parts[1:]))
                raise _METHOD_NOT_ALLOWED if method_mismatch else _NOT_FOUND
            if route.admin and not principal.may(ADMIN_SCOPES):
                await _send_json(
                    send,
                    403,
                    _error_body(
                        RegistryError(
                            40301,
                            "Forbidden: changing the global compatibility or mode needs the "
                            "admin scope",
                        )
                    ),
                    content_type,
                )
                return
            if not principal.may(WRITE_SCOPES if route.write else READ_SCOPES):
                await self._forbidden(send, content_type)
                return
            if route.write and not principal.may_write_subject(params.get("subject")):
                await _send_json(
                    send,
                    403,
                    _error_body(
                        RegistryError(
                            40301,
                            "Forbidden: these credentials may only write subjects starting "
                            f"with {principal.subject_prefix!r}",
                        )
                    ),
                    content_type,
                )
                return
            body = b""
            if method in ("POST", "PUT"):
                request_type = _header(scope["headers"], b"content-type")
                if request_type:
                    base = request_type.split(";", 1)[0].strip().lower()
                    if base not in _REQUEST_TYPES:
                        raise RegistryError(415, "HTTP 415 Unsupported Media Type")
                body = await _read_body(receive)
            query_string: bytes = scope.get("query_string", b"")
            request = Request(
                method=method,
                params=params,
                query=parse_qs(query_string.decode("latin-1"), keep_blank_values=True),
                body=body,
                principal=principal,
            )
            result = await route.handler(request)
        except RegistryError as exc:
            await _send_json(send, exc.http_status, _error_body(exc), content_type)
            return
        except Exception:
            log.exception("unhandled error", path=path, method=method)
            await _send_json(
                send,
                500,
                orjson.dumps({"error_code": 500, "message": "Internal Server Error"}),
                content_type,
            )
            return
        if isinstance(result, RawResponse):
            await _send_json(send, 200, result.body, content_type)
        else:
            await _send_json(send, 200, orjson.dumps(result), content_type)

    async def _forbidden(self, send: Send, content_type: str) -> None:
        await _send_json(
            send,
            403,
            _error_body(RegistryError(40301, "Forbidden: the credentials lack the required scope")),
            content_type,
        )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.registry.store.close()

    def _authenticate(self, header: str | None) -> Principal | None:
        """The caller's principal; results are cached per header value for a few seconds."""
        key = header or ""
        now = time.monotonic()
        cached = self._auth_cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        # A missing or malformed header is an empty token: only AllowAll accepts it.
        principal = self.authenticator.authenticate(token_from_authorization(header) or "")
        if len(self._auth_cache) >= _AUTH_CACHE_MAX:
            self._auth_cache.clear()
        self._auth_cache[key] = (now + _AUTH_CACHE_TTL_S, principal)
        return principal

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    # -- routes ------------------------------------------------------------------------------

    def _build_routes(self) -> list[Route]:
        def r(
            method: str, path: str, handler: Handler, *, write: bool = False, admin: bool = False
        ) -> Route:
            return Route(method, tuple(path.strip("/").split("/")), handler, write or admin, admin)

        return [
            r("GET", "/schemas", self.list_schemas),
            r("GET", "/schemas/types", self.schema_types),
            r("GET", "/schemas/ids/{id}", self.schema_by_id),
            r("GET", "/schemas/ids/{id}/schema", self.schema_text_by_id),
            r("GET", "/schemas/ids/{id}/subjects", self.subjects_by_id),
            r("GET", "/schemas/ids/{id}/versions", self.versions_by_id),
            r("GET", "/subjects", self.list_subjects),
            r("POST", "/subjects/{subject}", self.lookup),
            r("DELETE", "/subjects/{subject}", self.delete_subject, write=True),
            r("GET", "/subjects/{subject}/versions", self.list_versions),
            r("POST", "/subjects/{subject}/versions", self.register, write=True),
            r("GET", "/subjects/{subject}/versions/{version}", self.get_version),
            r("DELETE", "/subjects/{subject}/versions/{version}", self.delete_version, write=True),
            r("GET", "/subjects/{subject}/versions/{version}/schema", self.get_version_schema),
            r("GET", "/subjects/{subject}/versions/{version}/referencedby", self.referenced_by),
            r("POST", "/compatibility/subjects/{subject}/versions", self.compatibility_all),
            r("POST", "/compatibility/subjects/{subject}/versions/{version}", self.compatibility),
            r("GET", "/config", self.get_global_config),
            r("PUT", "/config", self.put_global_config, admin=True),
            r("DELETE", "/config", self.delete_global_config, admin=True),
            r("GET", "/config/{subject}", self.get_subject_config),
            r("PUT", "/config/{subject}", self.put_subject_config, write=True),
            r("DELETE", "/config/{subject}", self.delete_subject_config, write=True),
            r("GET", "/mode", self.get_global_mode),
            r("PUT", "/mode", self.put_global_mode, admin=True),
            r("GET", "/mode/{subject}", self.get_subject_mode),
            r("PUT", "/mode/{subject}", self.put_subject_mode, write=True),
            r("DELETE", "/mode/{subject}", self.delete_subject_mode, write=True),
            r("GET", "/contexts", self.contexts),
        ]

    # -- schemas -----------------------------------------------------------------------------

    async def schema_types(self, request: Request) -> Any:
        return list(SUPPORTED_SCHEMA_TYPES)

    async def contexts(self, request: Request) -> Any:
        # Contexts are not supported: everything lives in the default context ".".
        return ["."]

    @staticmethod
    def _schema_id(request: Request) -> int:
        raw = request.params["id"]
        if not raw.isdigit():
            raise _NOT_FOUND
        return int(raw)

    async def schema_by_id(self, request: Request) -> Any:
        schema_id = self._schema_id(request)
        cached = self._cached_id(schema_id)
        if cached is not None:
            return RawResponse(cached)
        stored = await self._call(self.registry.schema_by_id, schema_id)
        body = orjson.dumps(schema_json(stored))
        if len(self._id_cache) >= _ID_CACHE_MAX:
            self._id_cache.clear()
        self._id_cache[schema_id] = (time.monotonic() + _ID_CACHE_TTL_S, body)
        return RawResponse(body)

    def _cached_id(self, schema_id: int) -> bytes | None:
        entry = self._id_cache.get(schema_id)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    async def schema_text_by_id(self, request: Request) -> Any:
        stored = await self._call(self.registry.schema_by_id, self._schema_id(request))
        return RawResponse(_schema_as_json(stored.text))

    async def subjects_by_id(self, request: Request) -> Any:
        return await self._call(
            self.registry.subjects_for_id, self._schema_id(request), deleted=request.flag("deleted")
        )

    async def versions_by_id(self, request: Request) -> Any:
        return await self._call(
            self.registry.versions_for_id, self._schema_id(request), deleted=request.flag("deleted")
        )

    async def list_schemas(self, request: Request) -> Any:
        return await self._call(
            self.registry.list_schemas,
            prefix=request.text("subjectPrefix"),
            deleted=request.flag("deleted"),
            latest_only=request.flag("latestOnly"),
            offset=request.integer("offset", 0),
            limit=request.integer("limit", -1),
        )

    # -- subjects ----------------------------------------------------------------------------

    async def list_subjects(self, request: Request) -> Any:
        prefix = request.text("subjectPrefix")
        if prefix == ":*:":
            # Confluent's "every context" wildcard; there is only the default context here.
            prefix = ""
        return await self._call(
            self.registry.list_subjects,
            prefix=prefix,
            deleted=request.flag("deleted"),
            deleted_only=request.flag("deletedOnly", "deleted_only"),
            offset=request.integer("offset", 0),
            limit=request.integer("limit", -1),
        )

    async def list_versions(self, request: Request) -> Any:
        return await self._call(
            self.registry.list_versions,
            request.params["subject"],
            deleted=request.flag("deleted"),
            deleted_only=request.flag("deletedOnly", "deleted_only"),
        )

    async def lookup(self, request: Request) -> Any:
        body = SchemaRequest.from_json(request.json())
        return await self._call(
            self.registry.lookup, request.params["subject"], body, deleted=request.flag("deleted")
        )

    async def register(self, request: Request) -> Any:
        body = SchemaRequest.from_json(request.json())
        schema_id = await self._call(self.registry.register, request.params["subject"], body)
        return {"id": schema_id}

    async def get_version(self, request: Request) -> Any:
        version = parse_version(request.params["version"])
        return await self._call(
            self.registry.get_version,
            request.params["subject"],
            version,
            deleted=request.flag("deleted"),
        )

    async def get_version_schema(self, request: Request) -> Any:
        version = parse_version(request.params["version"])
        text = await self._call(
            self.registry.get_version_text,
            request.params["subject"],
            version,
            deleted=request.flag("deleted"),
        )
        return RawResponse(_schema_as_json(text))

    async def referenced_by(self, request: Request) -> Any:
        version = parse_version(request.params["version"])
        return await self._call(self.registry.referenced_by, request.params["subject"], version)

    async def delete_subject(self, request: Request) -> Any:
        permanent = request.flag("permanent")
        deleted = await self._call(
            self.registry.delete_subject, request.params["subject"], permanent=permanent
        )
        self._forget_ids(permanent)
        return deleted

    async def delete_version(self, request: Request) -> Any:
        version = parse_version(request.params["version"])
        permanent = request.flag("permanent")
        deleted = await self._call(
            self.registry.delete_version, request.params["subject"], version, permanent=permanent
        )
        self._forget_ids(permanent)
        return deleted

    def _forget_ids(self, permanent: bool) -> None:
        # Content by id never changes, but a permanent delete can make an id unknown (40403).
        # Such deletes are rare operator actions, so this process simply starts its cache
        # afresh; other processes on the same storage stop serving it when their entry
        # expires (_ID_CACHE_TTL_S).
        if permanent:
            self._id_cache.clear()

    # -- compatibility -----------------------------------------------------------------------

    async def compatibility(self, request: Request) -> Any:
        version = parse_version(request.params["version"])
        return await self._compatibility(request, version)

    async def compatibility_all(self, request: Request) -> Any:
        return await self._compatibility(request, None)

    async def _compatibility(self, request: Request, version: int | None) -> Any:
        body = SchemaRequest.from_json(request.json())
        messages = await self._call(
            self.registry.test_compatibility, request.params["subject"], version, body
        )
        out: dict[str, Any] = {"is_compatible": not messages}
        # Confluent omits empty message lists and sends messages only when asked.
        if request.flag("verbose") and messages:
            out["messages"] = messages
        return out

    # -- config ------------------------------------------------------------------------------

    async def get_global_config(self, request: Request) -> Any:
        level = await self._call(self.registry.global_compatibility)
        return {"compatibilityLevel": level.value}

    async def put_global_config(self, request: Request) -> Any:
        level = parse_level(_field(request.json(), "compatibility"))
        await self._call(self.registry.set_compatibility, None, level)
        return {"compatibility": level.value}

    async def delete_global_config(self, request: Request) -> Any:
        level = await self._call(self.registry.delete_compatibility, None)
        return {"compatibilityLevel": level.value}

    async def get_subject_config(self, request: Request) -> Any:
        level = await self._call(
            self.registry.subject_compatibility,
            request.params["subject"],
            default_to_global=request.flag("defaultToGlobal"),
        )
        return {"compatibilityLevel": level.value}

    async def put_subject_config(self, request: Request) -> Any:
        level = parse_level(_field(request.json(), "compatibility"))
        await self._call(self.registry.set_compatibility, request.params["subject"], level)
        return {"compatibility": level.value}

    async def delete_subject_config(self, request: Request) -> Any:
        level = await self._call(self.registry.delete_compatibility, request.params["subject"])
        return {"compatibilityLevel": level.value}

    # -- mode --------------------------------------------------------------------------------

    async def get_global_mode(self, request: Request) -> Any:
        mode = await self._call(self.registry.global_mode)
        return {"mode": mode.value}

    async def put_global_mode(self, request: Request) -> Any:
        mode = parse_mode(_field(request.json(), "mode"))
        await self._call(self.registry.set_mode, None, mode, force=request.flag("force"))
        return {"mode": mode.value}

    async def get_subject_mode(self, request: Request) -> Any:
        mode = await self._call(
            self.registry.subject_mode,
            request.params["subject"],
            default_to_global=request.flag("defaultToGlobal"),
        )
        return {"mode": mode.value}

    async def put_subject_mode(self, request: Request) -> Any:
        mode = parse_mode(_field(request.json(), "mode"))
        await self._call(
            self.registry.set_mode, request.params["subject"], mode, force=request.flag("force")
        )
        return {"mode": mode.value}

    async def delete_subject_mode(self, request: Request) -> Any:
        mode = await self._call(self.registry.delete_mode, request.params["subject"])
        return {"mode": mode.value}


def _field(body: Any, name: str) -> Any:
    if not isinstance(body, dict):
        raise RegistryError(422, "Unprocessable Entity: the request body must be a JSON object")
    # Confluent's ConfigUpdateRequest also accepts "compatibilityLevel" for "compatibility".
    if name == "compatibility" and name not in body:
        return body.get("compatibilityLevel")
    return body.get(name)


def _schema_as_json(text: str) -> bytes:
    """``.../schema`` endpoints return the schema itself as the JSON document."""
    try:
        return orjson.dumps(orjson.loads(text))
    except orjson.JSONDecodeError:
        return orjson.dumps(text)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _negotiate(accept: str | None) -> str | None:
    """The response media type for an ``Accept`` header (None: nothing acceptable)."""
    if not accept:
        return V1_JSON
    offered = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    for media in _RESPONSE_TYPES:
        if media in offered:
            return media
    if any(media in ("*/*", "application/*") for media in offered):
        return V1_JSON
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            raise RegistryError(413, "HTTP 413 Request Entity Too Large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


_HEADERS_BY_TYPE: dict[str, bytes] = {media: media.encode() for media in _RESPONSE_TYPES}


async def _send_json(
    send: Send, status: int, body: bytes, content_type: str, *extra: tuple[bytes, bytes]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", _HEADERS_BY_TYPE[content_type]),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def load_authenticator(settings: RegistrySettings) -> Authenticator:
    """The authenticator the settings describe (used when none is passed in)."""
    if settings.authenticator:
        module_name, _, attr = settings.authenticator.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        built = factory()
        if not isinstance(built, Authenticator):
            raise ValueError(f"{settings.authenticator} did not return an Authenticator")
        return built
    if not settings.auth_enabled:
        return AllowAllAuthenticator()
    if not settings.auth_tokens:
        raise ValueError(
            "authentication is enabled but no authenticator is configured: pass one to "
            "create_app, set BILTEN_SCHEMA_REGISTRY_AUTH_TOKENS or "
            "BILTEN_SCHEMA_REGISTRY_AUTHENTICATOR, or set BILTEN_SCHEMA_REGISTRY_AUTH_ENABLED=false"
        )
    return StaticTokenAuthenticator(settings.auth_tokens)


def create_app(
    settings: RegistrySettings, authenticator: Authenticator | None = None
) -> RegistryApp:
    """Build the ASGI app: opens the store named by ``settings.storage`` (creating tables).

    Raises ``ValueError`` on a configuration that cannot work (refusal at start).
    """
    chosen = authenticator if authenticator is not None else load_authenticator(settings)
    store = open_store(settings.storage, pool_size=settings.storage_pool_size)
    registry = SchemaRegistry(store, max_schema_bytes=settings.max_schema_bytes)
    return RegistryApp(registry, chosen, workers=settings.storage_pool_size)
