"""Fixtures: one registry per test on each real store, and an in-process ASGI client.

PostgreSQL runs when ``BILTEN_TEST_POSTGRES_DSN`` is set (``./dev/postgres.sh start`` prints
one); each test gets its own PostgreSQL schema (``search_path``) so tests stay independent.
Without the DSN the PostgreSQL variants skip, unless ``BILTEN_REQUIRE_SERVICES=1`` is set
(the full test run): then they fail, so a missing server cannot pass as a green run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from schema_registry.app import RegistryApp, create_app
from schema_registry.auth import StaticTokenAuthenticator
from schema_registry.registry import SchemaRegistry
from schema_registry.settings import RegistrySettings
from schema_registry.storage import open_store
from schema_registry.storage.postgres import throwaway_schema

PG_ENV = "BILTEN_TEST_POSTGRES_DSN"
REQUIRE_ENV = "BILTEN_REQUIRE_SERVICES"
ADMIN_TOKEN = "admin-token-0001"
READ_TOKEN = "read-token-00001"
WRITE_TOKEN = "write-token-0001"
TOKENS = {
    ADMIN_TOKEN: ["admin"],
    READ_TOKEN: ["schemas:read"],
    WRITE_TOKEN: ["schemas:read", "schemas:write"],
}


def postgres_dsn() -> str | None:
    return os.environ.get(PG_ENV) or None


def services_required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


_MISSING_DSN = f"{PG_ENV} is not set; run ./dev/postgres.sh start and export the DSN it prints"


def requires_postgres() -> pytest.MarkDecorator:
    # When services are required the test runs anyway and `require_postgres_dsn` fails it.
    return pytest.mark.skipif(
        postgres_dsn() is None and not services_required(), reason=_MISSING_DSN
    )


def require_postgres_dsn() -> str:
    """The DSN; without one, skip the test, or fail it when ``BILTEN_REQUIRE_SERVICES=1``."""
    dsn = postgres_dsn()
    if dsn is None:
        if services_required():
            pytest.fail(f"{_MISSING_DSN} ({REQUIRE_ENV}=1: PostgreSQL tests may not skip)")
        pytest.skip(_MISSING_DSN)
    return dsn


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A DSN whose tables land in a fresh PostgreSQL schema, dropped afterwards."""
    with throwaway_schema(require_postgres_dsn(), "sr_test") as url:
        yield url


STORES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=[pytest.mark.postgres, requires_postgres()]),
]


@pytest.fixture(params=STORES)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url


@pytest.fixture
def registry(storage_url: str) -> Iterator[SchemaRegistry]:
    store = open_store(storage_url, pool_size=4)
    try:
        yield SchemaRegistry(store, max_schema_bytes=64 * 1024)
    finally:
        store.close()


@pytest.fixture
def app(storage_url: str) -> Iterator[RegistryApp]:
    settings = RegistrySettings(
        storage=storage_url, storage_pool_size=4, max_schema_bytes=64 * 1024
    )
    built = create_app(settings, StaticTokenAuthenticator(TOKENS))
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
async def client(app: RegistryApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://registry",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as c:
        yield c
