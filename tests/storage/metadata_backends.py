"""The metadata store's backends for parametrised tests: SQLite in a temporary directory,
and PostgreSQL in a fresh schema of ``BILTEN_TEST_POSTGRES_DSN`` (skipped when unset, like
the schema registry's tests; ``./dev/postgres.sh start`` prints a DSN).

Import the ``metadata_backend`` fixture into a test module to run its tests on both.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from services.storage.metadata_store import MetadataStore, open_metadata_store

PG_ENV = "BILTEN_TEST_POSTGRES_DSN"


def postgres_dsn() -> str | None:
    return os.environ.get(PG_ENV) or None


def requires_postgres() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        postgres_dsn() is None,
        reason=f"{PG_ENV} is not set; run ./dev/postgres.sh start and export the DSN it prints",
    )


@contextmanager
def fresh_postgres_schema(prefix: str = "meta_test") -> Iterator[str]:
    """A DSN whose tables land in a new PostgreSQL schema, dropped afterwards. The schema is
    not created here: the store creates the first schema of its search_path at open."""
    import psycopg

    dsn = postgres_dsn()
    assert dsn is not None
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in dsn else "?"
    try:
        yield f"{dsn}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@dataclass(frozen=True)
class MetadataBackend:
    """Where one test's metadata lives; `open` gives another instance on the same data
    (another "process")."""

    kind: str  # "sqlite" | "postgres"
    url: str  # the metadata_store_url setting: "" for SQLite
    data_dir: Path

    def open(self) -> MetadataStore:
        return open_metadata_store(self.url, self.data_dir)


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=[pytest.mark.postgres, requires_postgres()]),
]


@pytest.fixture(params=BACKENDS)
def metadata_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataBackend]:
    if request.param == "sqlite":
        yield MetadataBackend("sqlite", "", tmp_path)
        return
    with fresh_postgres_schema() as url:
        yield MetadataBackend("postgres", url, tmp_path)
