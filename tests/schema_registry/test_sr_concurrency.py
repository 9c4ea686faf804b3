"""Several registry processes on one database stay consistent (real OS processes).

Each worker process opens its own store and :class:`SchemaRegistry`, exactly like separate
registry servers sharing a database, and the workers race through each job together.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.schema_registry.concurrent_writers import (
    PER_PROCESS,
    PROCESSES,
    Result,
    run_concurrent_writers,
    versions_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("schema-registry-race")]


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=[pytest.mark.postgres]),
    ],
)
def raced(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[Result]]]:
    """One race per store, shared by the assertions below (process start-up is the cost)."""
    if request.param == "sqlite":
        url = f"sqlite:///{Path(tmp_path_factory.mktemp('race')) / 'registry.db'}"
        yield url, run_concurrent_writers(url)
        return
    from schema_registry.storage.postgres import throwaway_schema
    from tests.schema_registry.conftest import require_postgres_dsn

    with throwaway_schema(require_postgres_dsn(), "sr_race") as url:
        yield url, run_concurrent_writers(url)


def _job(results: list[Result], job: str) -> list[Result]:
    return [r for r in results if r[0] == job]


def test_concurrent_registration_of_one_schema_yields_one_id(
    raced: tuple[str, list[Result]],
) -> None:
    url, results = raced
    same = _job(results, "same")
    assert len(same) == PROCESSES * PER_PROCESS
    assert len({sid for *_, sid in same}) == 1
    assert [v["version"] for v in versions_of(url, "same-subject")] == [1]


def test_one_schema_under_many_subjects_gets_one_id(raced: tuple[str, list[Result]]) -> None:
    _, results = raced
    cross = _job(results, "cross")
    assert len(cross) == PROCESSES
    assert len({sid for *_, sid in cross}) == 1


def test_no_lost_versions_and_ids_only_grow(raced: tuple[str, list[Result]]) -> None:
    url, results = raced
    distinct = _job(results, "distinct")
    ids_by_tag = {tag: sid for _, _, tag, sid in distinct}
    assert len(ids_by_tag) == PROCESSES * PER_PROCESS
    assert len(set(ids_by_tag.values())) == PROCESSES * PER_PROCESS
    versions = versions_of(url, "busy-subject")
    # Every registration produced exactly one version, numbered without gaps.
    assert [v["version"] for v in versions] == list(range(1, PROCESSES * PER_PROCESS + 1))
    assert sorted(v["id"] for v in versions) == sorted(ids_by_tag.values())
    # Writes are serialized, so a later version always got a larger, newly allocated id,
    # and every id allocated in the race is above the ids allocated before it.
    ids_in_version_order = [v["id"] for v in versions]
    assert ids_in_version_order == sorted(ids_in_version_order)
    earlier = {sid for job, *_, sid in results if job in ("same", "cross")}
    assert min(ids_in_version_order) > max(earlier)
