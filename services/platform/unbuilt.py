"""RPCs that are in the v1 contract but whose service is built by a later issue.

They answer UNIMPLEMENTED with reason `ERROR_REASON_NOT_IMPLEMENTED` and a message that
names the issue, instead of grpc's bare "Method not implemented!", and nothing pretends
to work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from google.protobuf.descriptor import ServiceDescriptor

from services.platform.errors import not_implemented

T = TypeVar("T")


def answer_unbuilt(
    service: ServiceDescriptor, issue: str, methods: list[str] | None = None
) -> Callable[[type[T]], type[T]]:
    """Class decorator: every listed method (default: every method the class does not
    define itself) raises `not_implemented`."""

    def decorate(cls: type[T]) -> type[T]:
        for method in service.methods:
            own = method.name in cls.__dict__
            if (methods is None and own) or (methods is not None and method.name not in methods):
                continue
            rpc = f"{service.full_name}/{method.name}"
            if method.server_streaming:

                async def stream(
                    self: Any, request: Any, context: Any, _rpc: str = rpc
                ) -> AsyncIterator[Any]:
                    raise not_implemented(_rpc, issue)
                    yield  # pragma: no cover - makes this an async generator

                setattr(cls, method.name, stream)
            else:

                async def unary(self: Any, request: Any, context: Any, _rpc: str = rpc) -> Any:
                    raise not_implemented(_rpc, issue)

                setattr(cls, method.name, unary)
        return cls

    return decorate
