"""Consent enforced at ingestion, erasure (nothing of the subject readable after it),
export in both formats, retention policy."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from bilten.analytics.compliance.v1 import compliance_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as ipb
from bilten.analytics.query.v1 import query_service_pb2 as qpb
from bilten.analytics.query.v1 import query_service_pb2_grpc as q_grpc
from bilten.analytics.type.v1 import tracked_event_pb2 as te

from services.compliance.consent import ConsentMode
from services.platform.auth import Role
from services.query import rollups
from services.query.metrics import Granularity, Scope, TimeRange
from services.query.rollups import RollupStore, Tier
from tests.compliance.conftest import Env, start_env
from tests.conftest import tracked_event

pytestmark = pytest.mark.integration


async def _send(env: Env, *user_ids: str) -> list[ipb.IngestResult]:
    events = [tracked_event("page_seen", user_id=u) for u in user_ids]
    for event in events:
        event.client.user_agent = "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"
        event.client.ip_address = "198.51.100.20"
    response = await env.ingestion.IngestEvents(
        ipb.IngestEventsRequest(events=events), metadata=env.md(env.credentials["write_key"])
    )
    return list(response.results)


async def _consent(env: Env, subject: str, granted: bool, purpose: int = 1) -> None:
    await env.compliance.RecordConsent(
        pb.RecordConsentRequest(
            subject_id=subject,
            purpose=purpose,  # type: ignore[arg-type]
            granted=granted,
            source="cookie_banner",
            policy_version="2026-01",
        ),
        metadata=env.md(env.token(Role.COMPLIANCE_OFFICER)),
    )


async def _export(env: Env, subject: str, fmt: int = 0) -> bytes:
    chunks: AsyncIterator[pb.ExportSubjectDataResponse] = env.compliance.ExportSubjectData(
        pb.ExportSubjectDataRequest(subject_id=subject, format=fmt),  # type: ignore[arg-type]
        metadata=env.md(env.token(Role.COMPLIANCE_OFFICER)),
    )
    return b"".join([c.chunk async for c in chunks])


async def test_withdrawal_stops_storage_and_is_quarantined(env: Env) -> None:
    assert all(r.status == ipb.INGEST_STATUS_ACCEPTED for r in await _send(env, "carol"))
    await _consent(env, "carol", granted=False)
    results = await _send(env, "carol", "dave")
    assert results[0].status == ipb.INGEST_STATUS_REJECTED
    assert results[0].rejection_reason == ipb.REJECTION_REASON_CONSENT_MISSING
    assert results[1].status == ipb.INGEST_STATUS_ACCEPTED
    quarantined = await env.ingestion.ListQuarantinedEvents(
        ipb.ListQuarantinedEventsRequest(), metadata=env.md(env.credentials["admin_token"])
    )
    assert any(
        q.rejection_reason == ipb.REJECTION_REASON_CONSENT_MISSING
        for q in quarantined.quarantined_events
    )
    assert env.mesh.event_store.count(env.tenant) == 2  # carol's first event, dave's
    # Withdrawing marketing does not stop analytics; granting analytics again resumes it.
    await _consent(env, "dave", granted=False, purpose=pb.CONSENT_PURPOSE_MARKETING)
    await _consent(env, "carol", granted=True)
    assert all(r.status == ipb.INGEST_STATUS_ACCEPTED for r in await _send(env, "carol", "dave"))

    state = await env.compliance.GetConsent(
        pb.GetConsentRequest(subject_id="carol"),
        metadata=env.md(env.token(Role.COMPLIANCE_OFFICER)),
    )
    assert [r.granted for r in state.history] == [True, False]  # newest first
    (current,) = state.current
    assert current.granted and current.policy_version == "2026-01"
    assert current.source == "cookie_banner"


async def test_required_mode_stores_only_after_a_grant(env: Env) -> None:
    assert env.mesh.consent is not None
    env.mesh.consent.set_mode(env.tenant, ConsentMode.REQUIRED)
    assert (await _send(env, "erin"))[0].status == ipb.INGEST_STATUS_REJECTED
    await _consent(env, "erin", granted=True)
    assert (await _send(env, "erin"))[0].status == ipb.INGEST_STATUS_ACCEPTED


async def test_default_mode_is_a_setting(tmp_path: Path) -> None:
    mesh, channel = await start_env(tmp_path / "d", consent_default_mode="required")
    try:
        env = Env(mesh, channel)
        assert (await _send(env, "frank"))[0].status == ipb.INGEST_STATUS_REJECTED
    finally:
        await channel.close()
        await mesh.stop()


async def test_erasure_leaves_nothing_of_the_subject(env: Env) -> None:
    await _send(env, "gina", "gina", "hank")
    await _consent(env, "gina", granted=True, purpose=pb.CONSENT_PURPOSE_MARKETING)
    bad = tracked_event("Bad Name", user_id="gina")  # rejected: lands in quarantine
    await env.ingestion.IngestEvents(
        ipb.IngestEventsRequest(events=[bad]), metadata=env.md(env.credentials["write_key"])
    )
    assert b"gina" in await _export(env, "gina")
    query = q_grpc.QueryServiceStub(env.channel)
    sql = qpb.ExecuteQueryRequest(sql="SELECT user_id, anonymous_id FROM events")
    admin = env.md(env.credentials["admin_token"])
    # Asked once before the erasure, so a result cache (if any) holds gina's rows.
    assert "gina" in str(await query.ExecuteQuery(sql, metadata=admin))

    created = await env.compliance.CreateErasureRequest(
        pb.CreateErasureRequestRequest(request_id="erase-gina", subject_id="gina"),
        metadata=env.md(env.token(Role.COMPLIANCE_OFFICER, single_use=True)),
    )
    request = created.erasure_request
    assert request.state == pb.ERASURE_STATE_DONE
    assert request.deadline_time.seconds > request.create_time.seconds
    assert any("2 rows deleted" in line for line in request.certificate_lines)
    assert any("quarantined_events): 1 entries" in line for line in request.certificate_lines)
    fetched = await env.compliance.GetErasureRequest(
        pb.GetErasureRequestRequest(erasure_request_id=request.erasure_request_id),
        metadata=env.md(env.token(Role.COMPLIANCE_OFFICER)),
    )
    assert fetched.erasure_request == request

    # Raw read of every column of the store, the export, the quarantine, the query API.
    table = env.mesh.event_store.read("SELECT * FROM tracked_events")
    assert "gina" not in json.dumps(table.to_pylist(), default=str)
    actors = env.mesh.event_store.read("SELECT actor_id FROM tenant_actors")
    assert "u:gina" not in actors.column(0).to_pylist()
    assert env.mesh.event_store.count(env.tenant) == 1  # hank's
    assert await _export(env, "gina") == b""
    quarantined = await env.ingestion.ListQuarantinedEvents(
        ipb.ListQuarantinedEventsRequest(), metadata=env.md(env.credentials["admin_token"])
    )
    assert all("gina" not in q.event_json for q in quarantined.quarantined_events)
    audit_rows = env.mesh.metadata.list_audit(env.tenant, 1000, "")[0]
    assert all("gina" not in f"{e.resource}{e.actor}" for e in audit_rows)
    result = await query.ExecuteQuery(sql, metadata=admin)
    assert "hank" in str(result) and "gina" not in str(result)


def _tier_orders(store: RollupStore, tenant_id: str) -> dict[Tier, set[str]]:
    return {
        tier: set(
            store.read(
                f"SELECT DISTINCT unnest(order_ids) FROM {tier.table} WHERE tenant_id = ?",
                [tenant_id],
            )
            .column(0)
            .to_pylist()
        )
        for tier in rollups.TIERS
    }


async def test_erasure_replaces_the_subjects_order_ids_in_the_rollups(env: Env) -> None:
    purchases = []
    for user, order, ago in (
        ("lena", "lena-o1", timedelta(minutes=5)),
        ("lena", "lena-o2", timedelta(hours=2)),
        ("mark", "mark-o1", timedelta(minutes=5)),
    ):
        purchase = tracked_event(
            "ticket_purchased",
            event_type=te.TRACKED_EVENT_TYPE_CONVERSION,
            user_id=user,
            ago=ago,
            revenue=("EUR", 12, 0),
            quantity=2,
        )
        purchase.ticketing.order_id = order
        purchases.append(purchase)
    response = await env.ingestion.IngestEvents(
        ipb.IngestEventsRequest(events=purchases), metadata=env.md(env.credentials["write_key"])
    )
    assert all(r.status == ipb.INGEST_STATUS_ACCEPTED for r in response.results)
    assert env.mesh.aggregation is not None
    maintainer = env.mesh.aggregation.maintainer
    assert maintainer is not None
    maintainer.flush()
    store = maintainer.store
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    days = TimeRange(today - timedelta(days=1), today + timedelta(days=1))

    def revenue() -> object:
        return rollups.revenue(store, Tier.DAY, Scope.tenant(env.tenant), days, Granularity.DAY)

    before = revenue()
    assert sum(r.orders for r in rollups.revenue(
        store, Tier.DAY, Scope.tenant(env.tenant), days, Granularity.MONTH
    )) == 3  # fmt: skip
    assert all({"lena-o1", "lena-o2", "mark-o1"} <= ids for ids in _tier_orders(
        store, env.tenant
    ).values())  # fmt: skip

    created = await env.compliance.CreateErasureRequest(
        pb.CreateErasureRequestRequest(request_id="erase-lena", subject_id="lena"),
        metadata=env.md(env.token(Role.COMPLIANCE_OFFICER, single_use=True)),
    )
    request = created.erasure_request
    assert request.state == pb.ERASURE_STATE_DONE
    (line,) = [x for x in request.certificate_lines if " rollups " in x]
    assert "rollups (rollups.duckdb, minute/hour/day tiers): 2 order ids" in line
    assert "not erased" not in line

    for tier, ids in _tier_orders(store, env.tenant).items():
        assert "mark-o1" in ids and not {"lena-o1", "lena-o2"} & ids, tier
        assert len([o for o in ids if o.startswith("erased:")]) == 2, tier
    assert revenue() == before  # her orders still count, anonymously
    links = env.mesh.event_store.read("SELECT order_id FROM tenant_order_actors")
    assert sorted(links.column(0).to_pylist()) == ["mark-o1"]


async def test_export_json_lines_and_csv(env: Env) -> None:
    await _send(env, "ivan", "ivan", "judy")
    await _consent(env, "ivan", granted=True)
    lines = [json.loads(x) for x in (await _export(env, "ivan")).splitlines()]
    events = [x for x in lines if x["record_type"] == "tracked_event"]
    consents = [x for x in lines if x["record_type"] == "consent"]
    assert len(events) == 2 and all(e["user_id"] == "ivan" for e in events)
    assert all(e["tenant_id"] == env.tenant for e in events)
    assert events[0]["browser_family"] and "actor_key" not in events[0]
    assert consents[0]["purpose"] == "ANALYTICS" and consents[0]["granted"] is True

    rows = list(
        csv.DictReader(io.StringIO((await _export(env, "ivan", pb.EXPORT_FORMAT_CSV)).decode()))
    )
    assert [r["user_id"] for r in rows] == ["ivan", "ivan"]


async def test_retention_policy_defaults_update_and_refusal(env: Env) -> None:
    officer = env.md(env.token(Role.COMPLIANCE_OFFICER))
    got = await env.compliance.GetRetentionPolicy(pb.GetRetentionPolicyRequest(), metadata=officer)
    assert (
        got.policy.raw_days,
        got.policy.minute_rollup_days,
        got.policy.hour_rollup_days,
        got.policy.day_rollup_days,
    ) == (7, 30, 365, 1825)
    wanted = pb.RetentionPolicy(
        raw_days=3, minute_rollup_days=14, hour_rollup_days=90, day_rollup_days=730
    )
    await env.compliance.UpdateRetentionPolicy(
        pb.UpdateRetentionPolicyRequest(policy=wanted), metadata=officer
    )
    got = await env.compliance.GetRetentionPolicy(pb.GetRetentionPolicyRequest(), metadata=officer)
    assert got.policy == wanted
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compliance.UpdateRetentionPolicy(
            pb.UpdateRetentionPolicyRequest(
                policy=pb.RetentionPolicy(
                    raw_days=60, minute_rollup_days=30, hour_rollup_days=90, day_rollup_days=730
                )
            ),
            metadata=officer,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_ip_allowlist_guards_sensitive_operations(tmp_path: Path) -> None:
    mesh, channel = await start_env(tmp_path / "d", sensitive_ip_allowlist=["10.0.0.0/8"])
    try:
        env = Env(mesh, channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await env.compliance.ListApiKeys(
                pb.ListApiKeysRequest(),
                # Not trusted unless configured: a client cannot claim an allowed address.
                metadata=env.md(env.token(Role.ORGANIZER_ADMIN), ("x-forwarded-for", "10.1.1.1")),
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Non-sensitive reads are not restricted.
        await env.compliance.GetRetentionPolicy(
            pb.GetRetentionPolicyRequest(), metadata=env.md(env.token(Role.ORGANIZER_ADMIN))
        )
    finally:
        await channel.close()
        await mesh.stop()
