"""GetMetrics grouped by country, ticketed event and source: the domain functions (raw
and rollups) against a plain-Python count, and the RPC (raw window, rollups, and the
FAILED_PRECONDITION when a dimension only raw events keep is asked past them)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from bilten.analytics.query.v1 import query_service_pb2 as pb
from bilten.analytics.query.v1 import query_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import time_range_pb2

from services.aggregation.reads import MetricReads
from services.events.model import TrackedEvent, TrackedEventType
from services.platform.auth import Authenticator, Scope, TokenIssuer
from services.platform.server import Registration, start_grpc_server
from services.query import metrics, rollups
from services.query.metrics import Granularity, MetricFilters, TimeRange, bucket_floor
from services.query.metrics import Scope as TenantScope
from services.query.rollups import RetentionPolicy, RollupMaintainer, RollupStore, Tier
from services.query.servicer import QueryServicer
from services.storage.event_store import DuckDBEventStore
from tests.conftest import ts
from tests.storage.generated_events import random_events

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
EVENTS = random_events(23, 5000, start=NOW - timedelta(days=14), span=timedelta(days=14), users=70)
RECENT = TimeRange(NOW - timedelta(days=3, hours=5, minutes=7), NOW)  # raw window
OLD = TimeRange(datetime(2026, 6, 2, tzinfo=UTC), datetime(2026, 6, 6, tzinfo=UTC))  # rollups


def _value(event: TrackedEvent, dimension: str) -> str:
    return {
        "event_name": event.event_name,
        "event_type": event.event_type.value,
        "country_code": event.enrichment.country_code if event.enrichment else "",
        "ticketed_event_id": event.ticketed_event_id,
        "source": event.source.value,
    }[dimension]


def _python_counts(
    scope: TenantScope,
    window: TimeRange,
    granularity: Granularity,
    dimensions: Sequence[str],
    filters: MetricFilters = metrics.NO_FILTERS,
) -> tuple[metrics.GroupedEventCount, ...]:
    """The plain definition: count the events of the scope and range by bucket and
    the dimensions' values."""
    counted: Counter[tuple[datetime, tuple[str, ...]]] = Counter()
    for e in EVENTS:
        if scope.tenant_id is not None and e.tenant_id != scope.tenant_id:
            continue
        if not window.start <= e.occurred_at < window.end:
            continue
        if (
            filters.ticketed_event_id is not None
            and e.ticketed_event_id != filters.ticketed_event_id
        ):
            continue
        if filters.event_name is not None and e.event_name != filters.event_name:
            continue
        if filters.event_type is not None and e.event_type is not filters.event_type:
            continue
        key = (bucket_floor(e.occurred_at, granularity), tuple(_value(e, d) for d in dimensions))
        counted[key] += 1
    return tuple(metrics.GroupedEventCount(b, v, n) for (b, v), n in sorted(counted.items()))


@pytest.fixture(scope="module")
def stores(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DuckDBEventStore, RollupStore]]:
    root = tmp_path_factory.mktemp("group_by")
    raw = DuckDBEventStore(root / "events.duckdb")
    raw.append(EVENTS)
    store = RollupStore(root / "rollups.duckdb")
    RollupMaintainer(raw, store, RetentionPolicy(), clock=lambda: NOW).rebuild()
    yield raw, store
    store.close()
    raw.close()


DIMENSION_SETS: list[tuple[str, ...]] = [
    ("country_code",),
    ("ticketed_event_id",),
    ("source",),
    ("country_code", "source"),
    ("source", "event_type"),
    ("ticketed_event_id", "country_code"),
    (),
]
SCOPES = [TenantScope.tenant("acme"), TenantScope.all_tenants()]
FILTERS = [
    metrics.NO_FILTERS,
    MetricFilters(ticketed_event_id="concert-1"),
    MetricFilters(event_type=TrackedEventType.CONVERSION),
]


@pytest.mark.parametrize("dimensions", DIMENSION_SETS, ids=lambda d: "+".join(d) or "none")
def test_raw_grouped_counts_equal_a_python_count(
    stores: tuple[DuckDBEventStore, RollupStore], dimensions: tuple[str, ...]
) -> None:
    raw, _ = stores
    for scope in SCOPES:
        for filters in FILTERS:
            for granularity in (Granularity.HOUR, Granularity.DAY, Granularity.WEEK):
                got = metrics.grouped_event_counts(
                    raw, scope, RECENT, granularity, dimensions, filters
                )
                assert got == _python_counts(scope, RECENT, granularity, dimensions, filters)
    # The data must spread over the values, or the grouping proves nothing.
    everything = _python_counts(SCOPES[1], RECENT, Granularity.MONTH, dimensions)
    assert len({row.values for row in everything}) >= (3 if dimensions else 1)


@pytest.mark.parametrize(
    "dimensions", [d for d in DIMENSION_SETS if "source" not in d], ids=lambda d: "+".join(d)
)
def test_rollup_grouped_counts_equal_raw_on_every_tier(
    stores: tuple[DuckDBEventStore, RollupStore], dimensions: tuple[str, ...]
) -> None:
    raw, store = stores
    for tier, granularity in ((Tier.DAY, Granularity.DAY), (Tier.HOUR, Granularity.HOUR)):
        for scope in SCOPES:
            for filters in FILTERS:
                args = (scope, OLD, granularity, dimensions, filters)
                expected = metrics.grouped_event_counts(raw, *args)
                assert expected, "nothing to compare"
                assert rollups.grouped_event_counts(store, tier, *args) == expected
    with pytest.raises(rollups.RollupDimensionError, match="source"):
        rollups.grouped_event_counts(
            store, Tier.DAY, SCOPES[0], OLD, Granularity.DAY, ("country_code", "source")
        )


def test_event_counts_regrouped_equal_the_grouped_query(
    stores: tuple[DuckDBEventStore, RollupStore],
) -> None:
    raw, _ = stores
    for dimensions in [(), ("event_type",), ("event_name",), ("event_type", "event_name")]:
        rows = metrics.event_counts(raw, SCOPES[1], RECENT, Granularity.DAY)
        assert metrics.regroup_event_counts(rows, dimensions) == metrics.grouped_event_counts(
            raw, SCOPES[1], RECENT, Granularity.DAY, dimensions
        )


def test_unknown_or_repeated_dimensions_are_refused(
    stores: tuple[DuckDBEventStore, RollupStore],
) -> None:
    raw, _ = stores
    for bad in [("occurred_at; DROP TABLE x",), ("source", "source")]:
        with pytest.raises(ValueError):
            metrics.grouped_event_counts(raw, SCOPES[0], RECENT, Granularity.DAY, bad)


# --- over gRPC ------------------------------------------------------------------------


class _NoKeys:
    def find_api_key(self, key_id: str) -> None:
        return None


@dataclass
class Client:
    stub: pb_grpc.QueryServiceStub
    md: list[tuple[str, str]]


@pytest.fixture
async def client(stores: tuple[DuckDBEventStore, RollupStore]) -> AsyncIterator[Client]:
    raw, store = stores
    maintainer = RollupMaintainer(raw, store, RetentionPolicy(), clock=lambda: NOW)
    reads = MetricReads(raw, maintainer, RetentionPolicy(), clock=lambda: NOW)
    tokens = TokenIssuer("test-secret-of-enough-length-0123456789", "iss", "aud")
    server, port, _ = await start_grpc_server(
        [
            Registration(
                "bilten.analytics.query.v1.QueryService",
                QueryServicer(raw, reads=reads),
                pb_grpc.add_QueryServiceServicer_to_server,
            )
        ],
        Authenticator(tokens, _NoKeys(), "pepper"),
        "127.0.0.1",
        0,
    )
    token = tokens.issue("dev", "acme", frozenset({Scope.ANALYTICS_READ}))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Client(pb_grpc.QueryServiceStub(channel), [("authorization", f"Bearer {token}")])
    await server.stop(0)


def _request(window: TimeRange, *group_by: int) -> pb.GetMetricsRequest:
    return pb.GetMetricsRequest(
        metrics=[pb.METRIC_KIND_EVENT_COUNT],
        time_range=time_range_pb2.TimeRange(start_time=ts(window.start), end_time=ts(window.end)),
        granularity=time_range_pb2.GRANULARITY_DAY,
        group_by=list(group_by),
    )


Point = tuple[datetime, tuple[tuple[str, str], ...], int]


def _points(response: pb.GetMetricsResponse) -> list[Point]:
    """The response's points in order, each with its dimensions as sorted pairs."""
    return [
        (
            p.bucket_start_time.ToDatetime(tzinfo=UTC),
            tuple(sorted(p.dimensions.items())),
            int(p.value),
        )
        for p in response.series[0].points
    ]


def _expected(rows: Sequence[metrics.GroupedEventCount], keys: Sequence[str]) -> list[Point]:
    """Python counts as points, in the response's order (bucket, then values)."""
    out = []
    for row in rows:
        shown = [
            _SOURCE_NAMES.get(v, v) if k == "source" else v
            for k, v in zip(keys, row.values, strict=True)
        ]
        out.append((row.bucket_start, tuple(sorted(zip(keys, shown, strict=True))), row.events))
    return sorted(out, key=lambda p: (p[0], [v for _, v in p[1]]))


_SOURCE_NAMES = {"web": "EVENT_SOURCE_WEB", "mobile": "EVENT_SOURCE_MOBILE"}
_SOURCE_NAMES |= {"server": "EVENT_SOURCE_SERVER", "api": "EVENT_SOURCE_API"}


async def test_get_metrics_groups_by_country_and_source_in_the_raw_window(
    client: Client,
) -> None:
    response = await client.stub.GetMetrics(
        _request(RECENT, pb.DIMENSION_COUNTRY, pb.DIMENSION_SOURCE), metadata=client.md
    )
    keys = ("country_code", "source")
    rows = _python_counts(TenantScope.tenant("acme"), RECENT, Granularity.DAY, keys)
    assert sorted(_points(response)) == sorted(_expected(rows, keys))
    assert {dict(p[1])["source"] for p in _points(response)} == set(_SOURCE_NAMES.values())


async def test_get_metrics_groups_older_ranges_by_ticketed_event_from_the_rollups(
    client: Client,
) -> None:
    response = await client.stub.GetMetrics(
        _request(OLD, pb.DIMENSION_TICKETED_EVENT, pb.DIMENSION_COUNTRY), metadata=client.md
    )
    keys = ("ticketed_event_id", "country_code")
    rows = _python_counts(TenantScope.tenant("acme"), OLD, Granularity.DAY, keys)
    assert sorted(_points(response)) == sorted(_expected(rows, keys))


async def test_grouping_an_older_range_by_source_is_a_precise_failed_precondition(
    client: Client,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetMetrics(_request(OLD, pb.DIMENSION_SOURCE), metadata=client.md)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details() or ""
    assert "source" in details and "7 days" in details
    # The same range grouped by a dimension the rollups keep is answered.
    await client.stub.GetMetrics(_request(OLD, pb.DIMENSION_COUNTRY), metadata=client.md)
