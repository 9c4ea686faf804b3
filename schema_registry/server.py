"""Running the registry under uvicorn: ``run(settings)`` is what the CLI calls.

One worker serves the app object built here (so a platform authenticator object can be
passed in). Several workers are separate processes that each build their own app from the
same settings, handed over through the environment; they share state only through the
storage, which serializes writes (see :mod:`schema_registry.storage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator

import orjson
import uvicorn

from schema_registry.app import RegistryApp, create_app
from schema_registry.auth import Authenticator
from schema_registry.settings import RegistrySettings

_SETTINGS_ENV = "BILTEN_SCHEMA_REGISTRY__WORKER_SETTINGS"


def run(settings: RegistrySettings, authenticator: Authenticator | None = None) -> None:
    """Serve until interrupted. Fails fast (ValueError) on unusable configuration."""
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,
        "http": "httptools",
        "loop": "uvloop",
        "lifespan": "on",
    }
    if settings.workers == 1:
        app = create_app(settings, authenticator)
        uvicorn.run(app, **common)  # type: ignore[arg-type]
        return
    if authenticator is not None:
        raise ValueError(
            "an Authenticator object cannot be shared by several worker processes; set "
            "settings.authenticator to a 'module:factory' path instead"
        )
    # Build once in this process so bad settings fail here, not in every worker.
    create_app(settings).close()
    os.environ[_SETTINGS_ENV] = settings.model_dump_json()
    uvicorn.run(
        "schema_registry.server:worker_app",
        factory=True,
        workers=settings.workers,
        **common,  # type: ignore[arg-type]
    )


def worker_app() -> RegistryApp:
    """Factory each uvicorn worker process calls."""
    settings = RegistrySettings.model_validate(orjson.loads(os.environ[_SETTINGS_ENV]))
    return create_app(settings)


def main() -> None:
    """``python -m schema_registry.server``: settings from ``BILTEN_SCHEMA_REGISTRY_*``."""
    run(RegistrySettings())


if __name__ == "__main__":
    main()


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EmbeddedRegistry:
    """The registry inside another asyncio program (`bilten-analytics up`)."""

    def __init__(self, settings: RegistrySettings, authenticator: Authenticator | None) -> None:
        config = uvicorn.Config(
            create_app(settings, authenticator),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            http="httptools",
            lifespan="on",
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raises why it could not start
                raise RuntimeError("schema registry stopped during start-up")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task
