"""Audit log: every admitted or refused call recorded by the edge; hash chain; the CLI
and VerifyAuditLog find an edited row."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from bilten.analytics.compliance.v1 import compliance_service_pb2 as pb

from services.cli import main
from services.platform.audit import subject_hash
from services.platform.auth import Role
from services.storage.metadata_store import SQLiteMetadataStore
from tests.compliance.conftest import Env

pytestmark = pytest.mark.integration

_SVC = "/bilten.analytics.compliance.v1.ComplianceService/"


async def test_calls_are_audited_with_who_what_where_outcome(env: Env) -> None:
    officer = env.token(Role.COMPLIANCE_OFFICER, subject="olga")
    analyst = env.token(Role.ANALYST, subject="andy")
    await env.compliance.GetConsent(
        pb.GetConsentRequest(subject_id="alice"),
        metadata=env.md(officer, ("x-forwarded-for", "203.0.113.7, 10.0.0.1")),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await env.compliance.GetConsent(
            pb.GetConsentRequest(subject_id="alice"), metadata=env.md(analyst)
        )
    with pytest.raises(grpc.aio.AioRpcError):
        await env.compliance.GetConsent(
            pb.GetConsentRequest(subject_id="alice"), metadata=env.md("not-a-token")
        )
    listed = await env.compliance.ListAuditLogEntries(
        pb.ListAuditLogEntriesRequest(), metadata=env.md(officer)
    )
    entries = list(listed.entries)
    assert [e.sequence for e in entries] == sorted((e.sequence for e in entries), reverse=True)
    ok = next(e for e in entries if e.actor == "olga" and e.action == _SVC + "GetConsent")
    assert ok.outcome == "OK"
    assert ok.peer.startswith("203.0.113.7 via ipv")
    # The subject id is kept only as a hash: erasing the person leaves no readable id.
    assert ok.resource == f"subject_id=sha256:{subject_hash('alice')}"
    assert ok.time.ToDatetime(UTC) <= datetime.now(UTC)
    denied = next(e for e in entries if e.actor == "andy")
    assert denied.outcome == "PERMISSION_DENIED"
    assert len(ok.entry_hash) == 64
    # The unauthenticated attempt lands in the platform chain, not the tenant's.
    platform = env.mesh.metadata.list_audit("", 100, "")[0]
    assert any(e.actor == "anonymous" and e.outcome == "UNAUTHENTICATED" for e in platform)

    verified = await env.compliance.VerifyAuditLog(
        pb.VerifyAuditLogRequest(), metadata=env.md(officer)
    )
    assert verified.intact and verified.checked_count >= 2


def _tamper(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql)
    conn.close()


def _cli_verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "audit", "verify", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE audit_log SET outcome = 'OK' WHERE sequence = 2",
        "UPDATE audit_log SET actor = 'someone-else' WHERE sequence = 2",
        "DELETE FROM audit_log WHERE sequence = 2",
        "UPDATE audit_log SET entry_hash = CASE WHEN substr(entry_hash, 1, 1) = 'f'"
        " THEN 'e' ELSE 'f' END || substr(entry_hash, 2) WHERE sequence = 2",
    ],
)
def test_any_edit_of_the_rows_is_detected(
    tmp_path: Path, edit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "metadata.sqlite3"
    with SQLiteMetadataStore(path) as store:
        for n in range(4):
            store.append_audit(
                "acme", f"actor{n}", "Rpc", "", "ipv4:127.0.0.1:1", "DENIED", datetime.now(UTC)
            )
        assert store.verify_audit_chain("acme").intact
    assert main(["audit", "verify", "--data-dir", str(tmp_path)]) == 0
    _tamper(path, f"{edit} AND tenant_id = 'acme'")
    with SQLiteMetadataStore(path) as store:
        report = store.verify_audit_chain("acme")
    assert not report.intact and report.first_broken_sequence == 2
    capsys.readouterr()
    assert main(["audit", "verify", "--data-dir", str(tmp_path)]) == 1
    assert '"first_broken_sequence": 2' in capsys.readouterr().out


def test_the_installed_command_exits_non_zero_on_a_broken_chain(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite3"
    with SQLiteMetadataStore(path) as store:
        for n in range(3):
            store.append_audit("acme", f"a{n}", "Rpc", "", "local", "OK", datetime.now(UTC))
    # One run only (the in-process tests above cover the intact case): it imports the
    # whole CLI, which costs seconds.
    _tamper(path, "UPDATE audit_log SET action = 'Other' WHERE sequence = 3")
    result = _cli_verify(tmp_path)
    assert result.returncode == 1, result.stderr
    assert '"intact": false' in result.stdout


async def test_verify_rpc_reports_the_broken_entry(env: Env) -> None:
    officer = env.md(env.token(Role.COMPLIANCE_OFFICER))
    for _ in range(3):
        await env.compliance.GetRetentionPolicy(pb.GetRetentionPolicyRequest(), metadata=officer)
    _tamper(
        env.mesh.metadata.path,
        f"UPDATE audit_log SET peer = 'elsewhere' WHERE sequence = 2"
        f" AND tenant_id = '{env.tenant}'",
    )
    verified = await env.compliance.VerifyAuditLog(pb.VerifyAuditLogRequest(), metadata=officer)
    assert not verified.intact and verified.first_broken_sequence == 2
