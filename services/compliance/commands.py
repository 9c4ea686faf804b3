"""Operator commands on a data directory: `audit verify`, `retention enforce`.

They open the stores directly, so they run while the server is stopped (DuckDB lets one
process open the event store; `audit verify` only needs the metadata and runs any time).
The metadata is the SQLite file in the data dir, or the PostgreSQL database the services
share when `BILTEN_METADATA_STORE_URL` is set (the cluster shape).
"""

from __future__ import annotations

import json
import sys
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from services.compliance.retention import RetentionPolicies
from services.platform.audit import AuditLog
from services.storage.metadata_store import open_metadata_store


def audit_verify(data_dir: Path, metadata_store_url: str = "") -> int:
    """Recomputes every tenant's audit chain; prints one JSON line per chain and exits
    1 when any is broken (or the file is missing), 0 when all are intact."""
    path = data_dir / "metadata.sqlite3"
    if not metadata_store_url and not path.exists():
        print(json.dumps({"error": f"{path} not found"}), file=sys.stderr)
        return 1
    with closing(open_metadata_store(metadata_store_url, data_dir)) as store:
        reports = AuditLog(store).verify_all()
    for report in reports:
        print(
            json.dumps(
                {
                    "tenant_id": report.tenant_id,
                    "intact": report.intact,
                    "checked_count": report.checked_count,
                    "first_broken_sequence": report.first_broken_sequence,
                }
            )
        )
    return 0 if all(r.intact for r in reports) else 1


def retention_enforce(data_dir: Path, apply: bool, metadata_store_url: str = "") -> int:
    """Deletes (with `apply`) or counts raw events past each tenant's retention."""
    from services.storage.event_store import DuckDBEventStore

    with (
        closing(open_metadata_store(metadata_store_url, data_dir)) as store,
        DuckDBEventStore(data_dir / "events.duckdb") as events,
    ):
        tenants = [t.tenant_id for t in store.list_tenants()]
        runs = RetentionPolicies(store).enforce(
            events, tenants, datetime.now(UTC), dry_run=not apply
        )
        for run in runs:
            store.append_audit(
                run.tenant_id,
                "bilten-analytics-cli",
                "retention.enforce" + ("" if apply else ".dry_run"),
                f"raw_rows={run.raw_rows}",
                "local",
                "OK",
                datetime.now(UTC),
            )
            print(
                json.dumps(
                    {
                        "tenant_id": run.tenant_id,
                        "cutoff": run.cutoff.isoformat(),
                        "raw_rows": run.raw_rows,
                        "dry_run": run.dry_run,
                    }
                )
            )
    return 0
