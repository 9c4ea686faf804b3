"""Fixtures: one registry per test on each real store, and an in-process ASGI client.

PostgreSQL runs when ``BILTEN_TEST_POSTGRES_DSN`` is set (``./dev/postgres.sh start`` prints
one); each test gets its own PostgreSQL schema (``search_path``) so tests stay independent.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from schema_registry.app import RegistryApp, create_app
from schema_registry.auth import StaticTokenAuthenticator
from schema_registry.registry import SchemaRegistry
from schema_registry.settings import RegistrySettings
from schema_registry.storage import open_store

PG_ENV = "BILTEN_TEST_POSTGRES_DSN"
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


def requires_postgres() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        postgres_dsn() is None,
        reason=f"{PG_ENV} is not set; run ./dev/postgres.sh start and export the DSN it prints",
    )


def with_search_path(dsn: str, schema: str) -> str:
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A DSN whose tables land in a fresh PostgreSQL schema, dropped afterwards."""
    import psycopg

    dsn = postgres_dsn()
    assert dsn is not None
    schema = f"sr_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_search_path(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


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
