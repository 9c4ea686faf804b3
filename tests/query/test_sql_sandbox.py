"""Custom SQL: hostile queries never read another tenant's rows or a file; legitimate
ones give what a direct computation gives; pages, tokens and deadlines."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events.model import TrackedEvent, TrackedEventType
from services.platform.errors import AnalyticsError
from services.query import sql_sandbox
from services.query.metrics import Scope
from services.query.sql_sandbox import QueryOptions, QueryResult
from services.storage.event_store import DuckDBEventStore
from tests.query.analytics_events import clustered_events

MINE, VICTIM = "mine", "victim"
SECRET = "VICTIM-SECRET-7f3a"
FILE_SECRET = "FILE-SECRET-91bc"
T0 = datetime(2024, 5, 1, tzinfo=UTC)


def _victim_events() -> list[TrackedEvent]:
    return [
        TrackedEvent(
            tenant_id=VICTIM,
            event_id=f"{SECRET}-{i}",
            event_type=TrackedEventType.CONVERSION,
            event_name="victim_secret",
            occurred_at=T0 + timedelta(minutes=i),
            received_at=T0 + timedelta(minutes=i),
            user_id=f"{SECRET}-user",
            order_id=SECRET,
            revenue=Decimal("999.99"),
            currency="EUR",
            quantity=7,
            properties_json=f'{{"secret": "{SECRET}"}}',
        )
        for i in range(50)
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DuckDBEventStore, Path]]:
    root = tmp_path_factory.mktemp("sandbox")
    secret_file = root / "secret.csv"
    secret_file.write_text(f"a,b\n{FILE_SECRET},1\n")
    store = DuckDBEventStore(root / "events.duckdb")
    store.append(clustered_events(21, 30, tenants=(MINE,)))
    store.append(_victim_events())
    yield store, secret_file
    store.close()


def _run(store: DuckDBEventStore, sql: str, **options: object) -> QueryResult:
    return sql_sandbox.execute(
        store,
        Scope.tenant(MINE),
        sql,
        QueryOptions(**options),  # type: ignore[arg-type]
    )


def _no_leak(result: QueryResult) -> None:
    text = repr(result.rows)
    assert SECRET not in text and FILE_SECRET not in text and VICTIM not in text


# Each must be refused before it runs: other tables, files, statements, functions.
REFUSED = [
    "SELECT * FROM tracked_events",
    "SELECT * FROM main.tracked_events",
    'SELECT * FROM "tracked_events"',
    "sElEcT * FrOm TrAcKeD_eVeNtS",
    "SELECT * FROM events.main.tracked_events",  # the catalog is named after the file
    "SELECT * FROM tenant_actors",
    "SELECT * FROM stream_offsets",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM duckdb_tables()",
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM system.main.duckdb_tables()",
    "SELECT current_setting('enable_external_access')",
    "SELECT * FROM read_csv('{file}')",
    "SELECT * FROM '{file}'",
    "SELECT * FROM read_parquet('{file}')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_csv('https://example.com/x.csv')",
    "SELECT * FROM query('SELECT * FROM tracked_events')",
    "SELECT * FROM query_table('tracked_events')",
    "SELECT * FROM pragma_table_info('tracked_events')",
    "COPY (SELECT * FROM events) TO '{dir}/out.csv'",
    "ATTACH '{dir}/other.duckdb' AS other",
    "SET enable_external_access = true",
    "PRAGMA table_info('tracked_events')",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CALL pragma_version()",
    "EXPORT DATABASE '{dir}/dump'",
    "SELECT 1; SELECT * FROM tracked_events",
    "SELECT * FROM events; DROP TABLE tracked_events",
    "DROP TABLE tracked_events",
    "INSERT INTO tracked_events SELECT * FROM tracked_events",
    "DELETE FROM events",
    "UPDATE events SET event_name = 'x'",
    "CREATE TABLE copy AS SELECT * FROM events",
    "SELECT * FROM events UNION ALL SELECT * FROM tracked_events",
    "SELECT * FROM events /* harmless? */ UNION SELECT * FROM tracked_events",
    "SELECT * FROM/**/tracked_events",
    "WITH t AS (SELECT * FROM tracked_events) SELECT * FROM t",
    "WITH events AS (SELECT * FROM tracked_events) SELECT * FROM events",
    "WITH x AS (SELECT * FROM events) SELECT * FROM (WITH events AS (SELECT * FROM x) SELECT * FROM events)",
    "WITH x AS (SELECT * FROM x) SELECT * FROM x",  # no recursion: the inner x is no CTE
    "SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x), x",  # x out of scope outside
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    "SELECT (SELECT count(*) FROM tracked_events)",
    "SELECT * FROM events WHERE user_id IN (SELECT user_id FROM tracked_events)",
    "SELECT * FROM events e, LATERAL (SELECT * FROM tracked_events WHERE tenant_id = e.tenant_id)",
    "SELECT list_transform([1], x -> (SELECT count(*) FROM tracked_events))",
    "SELECT * FROM events e JOIN tenant_actors a ON true",
    "SELECT * FROM tracked_events AS events",
    "FROM tracked_events",
    "SELECT * FROM events, events.tracked_events",
    "SELECT * FROM ｅvents",  # noqa: RUF001 - a fullwidth e, on purpose
    "SELECT * FROM events\u200b",  # zero-width space
    'SELECT * FROM "events"".""tracked_events"',
    'SELECT * FROM U&"\\0074racked_events"',
    "SELECT * FROM events AS __bilten_scan_00000000",
    "SELECT $bilten_tenant",
    "SELECT * FROM events WHERE tenant_id = ?",
    "SELECT getvariable('x')",
    "SELECT nextval('seq')",
    "SELECT stats(tenant_id) FROM events",
    "SELECT json_serialize_plan('SELECT * FROM tracked_events')",
    "SELECT * FROM json_execute_serialized_sql('{{}}')",
    "SELECT repeat('x', 1000000000)",
    "SELECT * FROM range(1000000000000)",
    "SELECT sleep_ms(100000)",
    "SELECT main.some_macro()",
    "SELECT * FROM (DESCRIBE tracked_events)",
    "SELECT * FROM (SHOW TABLES)",
    "SUMMARIZE events",
    "DESCRIBE events",
    "SELECT * FROM events AT (VERSION => 1)",
    "VALUES (1)",
    "SELECT * INTO copy FROM events",
    "",
    ";",
]
# Allowed to run (or to be refused, or to fail cleanly): only the caller's rows.
CONFINED = [
    "SELECT * FROM events WHERE tenant_id = 'victim'",
    "SELECT * FROM events WHERE 1 = 1 OR tenant_id <> ''",
    "SELECT * FROM events e WHERE e.tenant_id = 'victim' OR true",
    "SELECT * FROM events -- ; DROP TABLE tracked_events",
    "SELECT * FROM events WHERE user_id = 'x' /* ' OR tenant_id = 'victim' */",
    "SELECT * FROM events WHERE event_name = 'x'' OR tenant_id = ''victim'",
    'SELECT * FROM "events"',
    'SELECT * FROM "EVENTS"',
    "SELECT * FROM 'events'",
    "WITH tracked_events AS (SELECT * FROM events) SELECT * FROM tracked_events",
    "WITH a AS (SELECT * FROM events), b AS (SELECT * FROM a) SELECT * FROM b",
    "SELECT events FROM events",
    "SELECT * FROM events e1 NATURAL JOIN events e2 LIMIT 5",
    "SELECT * EXCLUDE (tenant_id) FROM events",
    "SELECT tenant_id, count(*) FROM events GROUP BY ALL",
    "SELECT * FROM events WHERE properties->>'secret' IS NOT NULL",
    "SELECT DISTINCT tenant_id FROM events UNION SELECT 'x'",
    "SELECT * FROM events USING SAMPLE 100%",
    "SELECT * FROM events PIVOT (count(*) FOR event_name IN ('victim_secret', 'page_view'))",
    "SELECT unnest(string_split(user_id, '-')) FROM events",
    "SELECT * FROM events, unnest([1, 2]) AS u(x) LIMIT 3",
    "SELECT count(*) FROM events a, events b, events c, events d",  # a blow-up: deadline
]


@pytest.mark.integration
@pytest.mark.parametrize("template", REFUSED)
def test_hostile_queries_are_refused(world: tuple[DuckDBEventStore, Path], template: str) -> None:
    store, secret_file = world
    sql = template.format(file=secret_file, dir=secret_file.parent)
    with pytest.raises(AnalyticsError) as caught:
        _run(store, sql, timeout=timedelta(seconds=5))
    assert caught.value.reason == "QUERY_REFUSED", caught.value.message
    assert SECRET not in caught.value.message and FILE_SECRET not in caught.value.message


@pytest.mark.integration
@pytest.mark.parametrize("sql", CONFINED)
def test_allowed_tricks_only_see_the_callers_rows(
    world: tuple[DuckDBEventStore, Path], sql: str
) -> None:
    store, _ = world
    try:
        result = _run(store, sql, page_size=10_000, timeout=timedelta(seconds=2))
    except AnalyticsError as error:
        # Refusing is always safe; failing or timing out must not echo another's rows.
        assert error.reason in ("QUERY_REFUSED", "QUERY_TIMEOUT", "INVALID_REQUEST")
        assert SECRET not in error.message
        return
    _no_leak(result)


@pytest.mark.integration
def test_nothing_was_written_or_read_from_disk(world: tuple[DuckDBEventStore, Path]) -> None:
    store, secret_file = world
    for template in REFUSED:
        sql = template.format(file=secret_file, dir=secret_file.parent)
        with pytest.raises(AnalyticsError):
            _run(store, sql, timeout=timedelta(seconds=5))
    for name in ("out.csv", "other.duckdb", "dump"):
        assert not (secret_file.parent / name).exists()
    assert store.count(VICTIM) == 50
    (row,) = store.read(
        "SELECT count(*) AS n FROM tracked_events WHERE event_name = 'victim_secret'"
    ).to_pylist()
    assert row["n"] == 50


@pytest.mark.integration
def test_the_corpus_is_large_enough() -> None:
    assert len(REFUSED) + len(CONFINED) >= 40


# --- legitimate queries --------------------------------------------------------------


def _mine(store: DuckDBEventStore, sql: str) -> list[tuple[object, ...]]:
    """The same question asked directly of the store, filtered by hand."""
    table = store.read(sql, {"t": MINE})
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return [tuple(sql_sandbox._json_value(v) for v in row) for row in zip(*columns, strict=True)]


LEGIT = [
    (
        "SELECT event_name, count(*) AS n FROM events GROUP BY ALL ORDER BY n DESC, event_name",
        "SELECT event_name, count(*) AS n FROM tracked_events WHERE tenant_id = $t"
        " GROUP BY ALL ORDER BY n DESC, event_name",
    ),
    (
        "SELECT count(DISTINCT actor_id) FROM events",
        "SELECT count(DISTINCT actor_key) FROM tracked_events WHERE tenant_id = $t",
    ),
    (
        "WITH buyers AS (SELECT DISTINCT user_id FROM events WHERE event_type = 'conversion')"
        " SELECT count(*) FROM events e JOIN buyers b USING (user_id)",
        "WITH buyers AS (SELECT DISTINCT user_id FROM tracked_events WHERE tenant_id = $t"
        " AND event_type = 'conversion') SELECT count(*) FROM tracked_events e"
        " JOIN buyers b USING (user_id) WHERE e.tenant_id = $t",
    ),
    (
        "SELECT currency, sum(revenue) FROM events WHERE currency <> '' GROUP BY 1 ORDER BY 1",
        "SELECT currency, sum(revenue) FROM tracked_events WHERE tenant_id = $t"
        " AND currency <> '' GROUP BY 1 ORDER BY 1",
    ),
    (
        "SELECT properties->>'category' AS c, count(*) FROM events GROUP BY 1 ORDER BY 2 DESC, 1",
        "SELECT json_extract_string(properties_json, '$.category') AS c, count(*)"
        " FROM tracked_events WHERE tenant_id = $t GROUP BY 1 ORDER BY 2 DESC, 1",
    ),
    (
        "SELECT date_trunc('day', occurred_at) AS d, count(*) FROM events GROUP BY 1 ORDER BY 1",
        "SELECT date_trunc('day', occurred_at) AS d, count(*) FROM tracked_events"
        " WHERE tenant_id = $t GROUP BY 1 ORDER BY 1",
    ),
    (
        "SELECT user_id, row_number() OVER (PARTITION BY user_id ORDER BY occurred_at, event_id)"
        " AS n FROM events QUALIFY n = 1 ORDER BY user_id",
        "SELECT user_id, row_number() OVER (PARTITION BY user_id ORDER BY occurred_at, event_id)"
        " AS n FROM tracked_events WHERE tenant_id = $t QUALIFY n = 1 ORDER BY user_id",
    ),
    (
        "SELECT e.event_name, x.n FROM (SELECT event_name, count(*) AS n FROM events GROUP BY 1) x"
        " JOIN (SELECT DISTINCT event_name FROM events) e USING (event_name) ORDER BY 1",
        "SELECT event_name, count(*) AS n FROM tracked_events WHERE tenant_id = $t"
        " GROUP BY 1 ORDER BY 1",
    ),
    (
        "SELECT list_sort(list(DISTINCT device_type)) FROM events",
        "SELECT list_sort(list(DISTINCT device_type)) FROM tracked_events WHERE tenant_id = $t",
    ),
    (
        "SELECT count(*) FILTER (WHERE occurred_at >= TIMESTAMPTZ '2024-03-10 00:00:00+00')"
        " FROM events WHERE event_name IN ('page_view', 'ticket_viewed')",
        "SELECT count(*) FILTER (WHERE occurred_at >= TIMESTAMPTZ '2024-03-10 00:00:00+00')"
        " FROM tracked_events WHERE tenant_id = $t AND event_name IN ('page_view', 'ticket_viewed')",
    ),
]


@pytest.mark.integration
@pytest.mark.parametrize("sql, direct", LEGIT)
def test_legitimate_queries_match_a_direct_computation(
    world: tuple[DuckDBEventStore, Path], sql: str, direct: str
) -> None:
    store, _ = world
    result = _run(store, sql, page_size=10_000)
    assert [list(r) for r in result.rows] == [list(r) for r in _mine(store, direct)]
    assert result.next_page_token == ""
    _no_leak(result)


@pytest.mark.integration
def test_pages_cover_the_result_once_and_tokens_are_bound(
    world: tuple[DuckDBEventStore, Path],
) -> None:
    store, _ = world
    sql = "SELECT event_id, occurred_at FROM events ORDER BY occurred_at, event_id"
    whole = _run(store, sql, page_size=10_000).rows
    pages, token = [], ""
    while True:
        page = _run(store, sql, page_size=97, page_token=token)
        pages.extend(page.rows)
        token = page.next_page_token
        if not token:
            break
    assert pages == list(whole) and len(whole) > 97 * 3
    first = _run(store, sql, page_size=10)
    for other_sql, scope in (
        ("SELECT 1", Scope.tenant(MINE)),
        (sql, Scope.tenant(VICTIM)),
    ):
        with pytest.raises(AnalyticsError) as caught:
            sql_sandbox.execute(
                store, scope, other_sql, QueryOptions(page_token=first.next_page_token)
            )
        assert caught.value.reason == "INVALID_PAGE_TOKEN"
    for token in ("garbage", "eyJ2IjoyfQ", first.next_page_token[:-3] + "AAA"):
        with pytest.raises(AnalyticsError) as caught:
            _run(store, sql, page_token=token)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.integration
def test_the_deadline_interrupts_the_query(world: tuple[DuckDBEventStore, Path]) -> None:
    store, _ = world
    started = time.monotonic()
    with pytest.raises(AnalyticsError) as caught:
        _run(
            store,
            "SELECT count(*) FROM events a, events b, events c, events d, events e",
            timeout=timedelta(milliseconds=300),
        )
    assert caught.value.reason == "QUERY_TIMEOUT"
    assert time.monotonic() - started < 5
    # The store is still usable afterwards.
    assert _run(store, "SELECT count(*) FROM events").rows[0][0] > 0


@pytest.mark.integration
def test_platform_admins_read_every_tenant(world: tuple[DuckDBEventStore, Path]) -> None:
    store, _ = world
    result = sql_sandbox.execute(
        store,
        Scope.all_tenants(),
        "SELECT tenant_id, count(*) FROM events GROUP BY 1 ORDER BY 1",
        QueryOptions(),
    )
    assert [r[0] for r in result.rows] == [MINE, VICTIM]
    assert [c.name for c in result.columns] == ["tenant_id", "count_star()"]


@pytest.mark.integration
def test_values_come_back_json_ready(world: tuple[DuckDBEventStore, Path]) -> None:
    store, _ = world
    result = _run(
        store,
        "SELECT TIMESTAMPTZ '2024-05-01 10:00:00+00' AS t, DATE '2024-05-01' AS d,"
        " 1.25::DECIMAL(10, 2) AS m, 9007199254740993::BIGINT AS big, [1, 2] AS l,"
        " {'k': 'v'} AS s, NULL AS n, true AS b",
    )
    assert result.rows == (
        (
            "2024-05-01T10:00:00Z",
            "2024-05-01",
            1.25,
            "9007199254740993",
            [1, 2],
            {"k": "v"},
            None,
            True,
        ),
    )
    assert [c.sql_type for c in result.columns][:4] == [
        "TIMESTAMP WITH TIME ZONE",
        "DATE",
        "DECIMAL(10,2)",
        "BIGINT",
    ]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    store = DuckDBEventStore(tmp_path_factory.mktemp("sandbox-property") / "events.duckdb")
    yield store
    store.close()


@pytest.mark.integration
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32), people=st.integers(0, 12))
def test_property_counts_see_exactly_the_tenants_events(
    shared_store: DuckDBEventStore, seed: int, people: int
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    events = clustered_events(seed, people, tenants=(tenant, f"{tenant}-other"), nobody=2)
    shared_store.append(events)
    result = sql_sandbox.execute(
        shared_store,
        Scope.tenant(tenant),
        "SELECT event_name, count(*), count(DISTINCT actor_id), sum(quantity)"
        " FROM events GROUP BY ALL ORDER BY event_name",
        QueryOptions(),
    )
    mine = [e for e in events if e.tenant_id == tenant]
    names = sorted(Counter(e.event_name for e in mine))
    expected = []
    for name in names:
        evs = [e for e in mine if e.event_name == name]
        actors = {
            f"u:{e.user_id}" if e.user_id else f"a:{e.anonymous_id}"
            for e in evs
            if e.user_id or e.anonymous_id
        }
        expected.append((name, len(evs), len(actors), sum(e.quantity for e in evs)))
    assert [tuple(r) for r in result.rows] == expected


@pytest.mark.integration
def test_the_store_closes_promptly_after_queries(tmp_path: Path) -> None:
    """The sandbox takes cursors the way the store's own reads do, and gives them back,
    also after a timeout: closing the store does not wait for phantom readers."""
    store = DuckDBEventStore(tmp_path / "events.duckdb")
    store.append(clustered_events(3, 5, tenants=(MINE,)))
    _run(store, "SELECT count(*) FROM events")
    with pytest.raises(AnalyticsError):
        _run(
            store,
            "SELECT count(*) FROM events a, events b, events c, events d, events e, events f",
            timeout=timedelta(milliseconds=100),
        )
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 5
