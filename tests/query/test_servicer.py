"""QueryService over real gRPC: the edge (auth, scopes, validation), the servicer, the
conversions and the error model, on an in-process server bound to a free port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from bilten.analytics.query.v1 import query_service_pb2 as pb
from bilten.analytics.query.v1 import query_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import time_range_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.platform.auth import Authenticator, Scope, TokenIssuer
from services.platform.server import Registration, start_grpc_server
from services.query import funnels, reports, users
from services.query.metrics import Scope as TenantScope
from services.query.metrics import TimeRange
from services.query.servicer import QueryServicer
from services.storage.event_store import DuckDBEventStore
from tests.conftest import ts
from tests.query.analytics_events import START, clustered_events

pytestmark = pytest.mark.integration

RANGE = TimeRange(START, START + timedelta(days=40))


class _NoKeys:
    def find_api_key(self, key_id: str) -> None:
        return None


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    with DuckDBEventStore(tmp_path_factory.mktemp("servicer") / "events.duckdb") as opened:
        opened.append(clustered_events(31, 40))
        yield opened


@dataclass
class Client:
    stub: pb_grpc.QueryServiceStub
    tokens: TokenIssuer
    servicer: QueryServicer

    def md(
        self, tenant: str = "acme", scopes: frozenset[str] | None = None
    ) -> list[tuple[str, str]]:
        scopes = scopes or frozenset({Scope.ANALYTICS_READ, Scope.REPORTS_WRITE})
        return [("authorization", f"Bearer {self.tokens.issue('dev', tenant, scopes)}")]

    def admin(self) -> list[tuple[str, str]]:
        return self.md("", frozenset({Scope.ADMIN}))


@pytest.fixture
async def client(store: DuckDBEventStore, tmp_path: Path) -> AsyncIterator[Client]:
    tokens = TokenIssuer("test-secret-of-enough-length-0123456789", "iss", "aud")
    servicer = QueryServicer(
        store, reports_path=tmp_path / "metadata.sqlite3", scheduler_tick_seconds=0.2
    )
    servicer.start_background()
    server, port, _ = await start_grpc_server(
        [
            Registration(
                "bilten.analytics.query.v1.QueryService",
                servicer,
                pb_grpc.add_QueryServiceServicer_to_server,
            )
        ],
        Authenticator(tokens, _NoKeys(), "pepper"),
        "127.0.0.1",
        0,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Client(pb_grpc.QueryServiceStub(channel), tokens, servicer)
    await server.stop(0)
    await servicer.aclose()


def _range() -> time_range_pb2.TimeRange:
    return time_range_pb2.TimeRange(start_time=ts(RANGE.start), end_time=ts(RANGE.end))


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def test_funnel_over_grpc_matches_the_domain(client: Client, store: DuckDBEventStore) -> None:
    request = pb.ComputeFunnelRequest(
        steps=[
            pb.FunnelStep(event_name="page_view"),
            pb.FunnelStep(event_name="ticket_viewed"),
            pb.FunnelStep(event_name="ticket_purchased", property_equals={"category": "music"}),
        ],
        time_range=_range(),
        conversion_window_seconds=86_400,
        order=pb.FUNNEL_ORDER_ORDERED,
        breakdown_property="utm_source",
    )
    got = await client.stub.ComputeFunnel(request, metadata=client.md())
    want = funnels.compute_funnel(
        store,
        TenantScope.tenant("acme"),
        RANGE,
        funnels.FunnelSpec(
            (
                funnels.FunnelStep("page_view"),
                funnels.FunnelStep("ticket_viewed"),
                funnels.FunnelStep("ticket_purchased", (("category", "music"),)),
            ),
            window=timedelta(days=1),
            breakdown_property="utm_source",
        ),
    )
    assert [b.breakdown_value for b in got.breakdowns] == [
        b.breakdown_value or "" for b in want.breakdowns
    ]
    assert [[s.user_count for s in b.steps] for b in got.breakdowns] == [
        [s.users for s in b.steps] for b in want.breakdowns
    ]
    simple = await client.stub.ComputeFunnel(
        pb.ComputeFunnelRequest(
            step_event_names=["page_view", "ticket_viewed"], time_range=_range()
        ),
        metadata=client.md(),
    )
    assert simple.breakdowns[0].steps[0].user_count > 0


async def test_bad_funnel_requests_are_invalid(client: Client) -> None:
    for request in (
        pb.ComputeFunnelRequest(step_event_names=["a"], time_range=_range()),
        pb.ComputeFunnelRequest(
            step_event_names=["a", "b"],
            steps=[pb.FunnelStep(event_name="a"), pb.FunnelStep(event_name="b")],
            time_range=_range(),
        ),
        pb.ComputeFunnelRequest(
            step_event_names=["a", "b"], exclusion_event_names=["b"], time_range=_range()
        ),
        pb.ComputeFunnelRequest(step_event_names=["a", "b"]),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.ComputeFunnel(request, metadata=client.md())
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_cohorts_sessions_users_and_ticketed_events(client: Client) -> None:
    md = client.md()
    cohorts = await client.stub.ComputeCohorts(
        pb.ComputeCohortsRequest(time_range=_range(), period_count=4), metadata=md
    )
    assert cohorts.cohorts[0].size > 0
    assert cohorts.cohorts[0].retention_rates[0] == 1.0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.ComputeCohorts(
            pb.ComputeCohortsRequest(time_range=_range(), period=time_range_pb2.GRANULARITY_HOUR),
            metadata=md,
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    sessions = await client.stub.GetSessionAnalytics(
        pb.GetSessionAnalyticsRequest(
            time_range=_range(), granularity=time_range_pb2.GRANULARITY_WEEK
        ),
        metadata=md,
    )
    assert [s.metric_name for s in sessions.series] == [
        "sessions",
        "average_session_duration_seconds",
        "bounce_rate",
    ]
    assert sum(p.value for p in sessions.series[0].points) == sessions.session_count > 0

    user = await client.stub.GetUserAnalytics(pb.GetUserAnalyticsRequest(user_id="p1"), metadata=md)
    assert user.user_id == "p1" and user.total_sessions > 0
    assert user.funnel_position in users.FUNNEL_STAGES
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetUserAnalytics(
            pb.GetUserAnalyticsRequest(user_id="nobody"), metadata=md
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetUserAnalytics(
            pb.GetUserAnalyticsRequest(user_id="p1"), metadata=client.admin()
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    as_admin = await client.stub.GetUserAnalytics(
        pb.GetUserAnalyticsRequest(user_id="p1", tenant_id="acme"), metadata=client.admin()
    )
    assert as_admin == user

    concert = await client.stub.GetTicketedEventAnalytics(
        pb.GetTicketedEventAnalyticsRequest(
            ticketed_event_id="concert-1",
            time_range=_range(),
            granularity=time_range_pb2.GRANULARITY_DAY,
        ),
        metadata=md,
    )
    assert concert.view_count > 0 and concert.unique_visitor_count > 0
    assert [s.metric_name for s in concert.series] == [
        "views",
        "visitors",
        "tickets_sold",
        "revenue",
    ]
    assert concert.revenues and concert.top_countries
    # Without a range: the last 30 days, long after these events: zeros, not an error.
    recent = await client.stub.GetTicketedEventAnalytics(
        pb.GetTicketedEventAnalyticsRequest(ticketed_event_id="concert-1"), metadata=md
    )
    assert recent.view_count == 0 and len(recent.series[0].points) == 31
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetTicketedEventAnalytics(
            pb.GetTicketedEventAnalyticsRequest(ticketed_event_id="nope"), metadata=md
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_tenants_cannot_name_another_tenant(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.ExecuteQuery(
            pb.ExecuteQueryRequest(sql="SELECT 1", tenant_id="globex"), metadata=client.md()
        )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_execute_query_pages_and_refusals(client: Client) -> None:
    md = client.md()
    sql = "SELECT event_id, occurred_at, revenue FROM events ORDER BY occurred_at, event_id"
    first = await client.stub.ExecuteQuery(
        pb.ExecuteQueryRequest(sql=sql, page_size=50), metadata=md
    )
    assert [c.name for c in first.columns] == ["event_id", "occurred_at", "revenue"]
    assert first.columns[1].type == "TIMESTAMP WITH TIME ZONE"
    assert len(first.rows) == 50 and first.next_page_token
    assert first.rows[0].values[1].string_value.endswith("Z")
    second = await client.stub.ExecuteQuery(
        pb.ExecuteQueryRequest(sql=sql, page_size=50, page_token=first.next_page_token), metadata=md
    )
    assert second.rows[0] != first.rows[0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.ExecuteQuery(
            pb.ExecuteQueryRequest(sql="SELECT * FROM tracked_events"), metadata=md
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(caught.value) == "ERROR_REASON_QUERY_REFUSED"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.ExecuteQuery(
            pb.ExecuteQueryRequest(
                sql="SELECT count(*) FROM events a, events b, events c, events d, events e",
                timeout_ms=200,
            ),
            metadata=md,
        )
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert _reason(caught.value) == "ERROR_REASON_QUERY_TIMEOUT"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.ExecuteQuery(
            pb.ExecuteQueryRequest(sql=sql, page_token=first.next_page_token + "x"), metadata=md
        )
    assert _reason(caught.value) == "ERROR_REASON_INVALID_PAGE_TOKEN"


async def test_reports_lifecycle_scopes_and_tenancy(client: Client) -> None:
    md = client.md()
    report = pb.Report(
        display_name="Daily purchases",
        sql="SELECT count(*) AS purchases FROM events WHERE event_name = 'ticket_purchased'",
        schedule=pb.REPORT_SCHEDULE_DAILY,
    )
    created = (
        await client.stub.CreateReport(pb.CreateReportRequest(report=report), metadata=md)
    ).report
    assert created.report_id and created.schedule == pb.REPORT_SCHEDULE_DAILY
    assert not created.HasField("latest_run")
    # The scheduler runs a new report right away (polled up to 60 s: a loaded machine).
    for _ in range(600):
        got = (
            await client.stub.GetReport(
                pb.GetReportRequest(report_id=created.report_id), metadata=md
            )
        ).report
        if got.HasField("latest_run"):
            break
        await asyncio.sleep(0.1)
    assert got.latest_run.columns[0].name == "purchases"
    assert got.latest_run.rows[0].values[0].number_value > 0
    assert got.latest_run.error_message == ""

    listed = await client.stub.ListReports(pb.ListReportsRequest(page_size=10), metadata=md)
    assert [r.report_id for r in listed.reports] == [created.report_id]
    # Another tenant sees nothing and cannot read or delete it.
    other = client.md("globex")
    assert not (await client.stub.ListReports(pb.ListReportsRequest(), metadata=other)).reports
    for call in (client.stub.GetReport, client.stub.DeleteReport):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(pb.GetReportRequest(report_id=created.report_id), metadata=other)  # type: ignore[operator]
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    # Read-only credentials cannot create or delete.
    reader = client.md(scopes=frozenset({Scope.ANALYTICS_READ}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CreateReport(pb.CreateReportRequest(report=report), metadata=reader)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # A query that could never run is refused at creation.
    bad = pb.Report(
        display_name="x", sql="SELECT * FROM tenant_actors", schedule=pb.REPORT_SCHEDULE_HOURLY
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CreateReport(pb.CreateReportRequest(report=bad), metadata=md)
    assert _reason(caught.value) == "ERROR_REASON_QUERY_REFUSED"
    await client.stub.DeleteReport(pb.DeleteReportRequest(report_id=created.report_id), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetReport(pb.GetReportRequest(report_id=created.report_id), metadata=md)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert isinstance(client.servicer.scheduler, reports.ReportScheduler)
