"""The model registry: versions, their state, metrics, feature schema, training window,
and which version serves. One SQLite file (`<data_dir>/prediction.sqlite3`); the model
files live beside it in `<data_dir>/models/<model_id>/`.

Lifecycle: `create` (TRAINING, with progress 0..1 and a stage text updated while it
trains) -> `complete` (READY, metrics stored) or `fail` (FAILED, message stored).
`promote` makes a READY version the serving one of its tenant and kind (PROMOTED) and
returns the previous one to READY, in one transaction, so exactly one version serves;
rolling back is promoting an older version. Every promotion is kept in
`model_promotions` (who served when). A version left TRAINING by a crash is marked
FAILED when the registry opens, since its training thread is gone.

SQLite in WAL mode with `synchronous = FULL`, one connection behind a lock, like the
platform's metadata store: registry writes are rare and tiny.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from services.platform.errors import AnalyticsError, StatusCode

# The tenant key of platform-wide models (a platform admin without a tenant).
PLATFORM = "*"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
  model_id        TEXT PRIMARY KEY,
  tenant_id       TEXT NOT NULL,
  kind            TEXT NOT NULL,
  state           TEXT NOT NULL,
  metrics_json    TEXT NOT NULL DEFAULT '{}',
  feature_names   TEXT NOT NULL DEFAULT '[]',
  config_json     TEXT NOT NULL DEFAULT '{}',
  training_start  TEXT,
  training_end    TEXT,
  created_at      TEXT NOT NULL,
  updated_at      TEXT NOT NULL,
  progress        REAL NOT NULL DEFAULT 0,
  stage           TEXT NOT NULL DEFAULT '',
  failure         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS models_page ON models (tenant_id, created_at, model_id);
-- At most one serving version per tenant and kind.
CREATE UNIQUE INDEX IF NOT EXISTS models_promoted
  ON models (tenant_id, kind) WHERE state = 'promoted';
CREATE TABLE IF NOT EXISTS model_promotions (
  tenant_id   TEXT NOT NULL,
  kind        TEXT NOT NULL,
  model_id    TEXT NOT NULL,
  previous_id TEXT,
  promoted_at TEXT NOT NULL
);
"""


class ModelKind(enum.StrEnum):
    CHURN = "churn"
    DEMAND_FORECAST = "demand_forecast"
    REVENUE_FORECAST = "revenue_forecast"
    ANOMALY = "anomaly"


class ModelState(enum.StrEnum):
    TRAINING = "training"
    READY = "ready"
    PROMOTED = "promoted"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ModelRecord:
    model_id: str
    tenant_id: str
    kind: ModelKind
    state: ModelState
    created_at: datetime
    updated_at: datetime
    metrics: dict[str, float] = field(default_factory=dict)
    feature_names: tuple[str, ...] = ()
    config: dict[str, object] = field(default_factory=dict)
    training_start: datetime | None = None
    training_end: datetime | None = None
    progress: float = 0.0
    stage: str = ""
    failure: str = ""


def _text(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def invalid_page_token() -> AnalyticsError:
    return AnalyticsError(
        StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        "page_token is malformed or belongs to another listing",
    )


class ModelRegistry:
    """Thread-safe; synchronous (callers in async code use `asyncio.to_thread`)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        with self._lock:
            self._conn.executescript(_SCHEMA)
            self._conn.execute(
                "UPDATE models SET state = 'failed', failure = 'interrupted: the process "
                "stopped while it was training', updated_at = ? WHERE state = 'training'",
                [_text(datetime.now(UTC))],
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- writes ------------------------------------------------------------------------

    def create(self, tenant_id: str, kind: ModelKind, now: datetime) -> ModelRecord:
        # Sortable by time, unique without coordination, well under the 64-char limit.
        model_id = f"{kind.value.replace('_', '-')}-{now:%Y%m%d%H%M%S}-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._conn.execute(
                "INSERT INTO models (model_id, tenant_id, kind, state, created_at, updated_at, "
                "stage) VALUES (?, ?, ?, 'training', ?, ?, 'queued')",
                [model_id, tenant_id, kind.value, _text(now), _text(now)],
            )
        record = self.get(tenant_id, model_id)
        assert record is not None
        return record

    def report_progress(self, model_id: str, fraction: float, stage: str) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE models SET progress = ?, stage = ?, updated_at = ? "
                "WHERE model_id = ? AND state = 'training'",
                [min(max(fraction, 0.0), 1.0), stage, _text(datetime.now(UTC)), model_id],
            )

    def complete(
        self,
        model_id: str,
        *,
        metrics: dict[str, float],
        feature_names: tuple[str, ...],
        config: dict[str, object],
        training_start: datetime,
        training_end: datetime,
    ) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE models SET state = 'ready', metrics_json = ?, feature_names = ?, "
                "config_json = ?, training_start = ?, training_end = ?, progress = 1, "
                "stage = 'done', updated_at = ? WHERE model_id = ?",
                [
                    json.dumps(metrics),
                    json.dumps(list(feature_names)),
                    json.dumps(config),
                    _text(training_start),
                    _text(training_end),
                    _text(datetime.now(UTC)),
                    model_id,
                ],
            )

    def note(self, model_id: str, stage: str) -> None:
        """Records why a trained version is not serving (its `stage`, shown by GetModel)."""
        with self._lock:
            self._conn.execute(
                "UPDATE models SET stage = ?, updated_at = ? "
                "WHERE model_id = ? AND state = 'ready'",
                [stage[:500], _text(datetime.now(UTC)), model_id],
            )

    def fail(self, model_id: str, message: str) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE models SET state = 'failed', failure = ?, stage = 'failed', "
                "updated_at = ? WHERE model_id = ?",
                [message[:2000], _text(datetime.now(UTC)), model_id],
            )

    def merge_metrics(self, model_id: str, metrics: dict[str, float]) -> None:
        """Adds or replaces metrics (drift figures measured while serving)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT metrics_json FROM models WHERE model_id = ?", [model_id]
            ).fetchone()
            if row is None:
                return
            merged = {
                k: v
                for k, v in json.loads(row["metrics_json"]).items()
                if not k.startswith("drift_psi.")
            }
            merged.update(metrics)
            self._conn.execute(
                "UPDATE models SET metrics_json = ? WHERE model_id = ?",
                [json.dumps(merged), model_id],
            )

    def promote(self, tenant_id: str, model_id: str, now: datetime) -> ModelRecord:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT kind, state FROM models WHERE tenant_id = ? AND model_id = ?",
                    [tenant_id, model_id],
                ).fetchone()
                if row is None:
                    raise AnalyticsError(
                        StatusCode.NOT_FOUND, "NOT_FOUND", f"model {model_id!r} not found"
                    )
                if row["state"] not in ("ready", "promoted"):
                    raise AnalyticsError(
                        StatusCode.FAILED_PRECONDITION,
                        "INVALID_REQUEST",
                        f"model {model_id!r} is {row['state']}; only a trained (ready) "
                        "version can serve",
                    )
                previous = self._conn.execute(
                    "SELECT model_id FROM models WHERE tenant_id = ? AND kind = ? "
                    "AND state = 'promoted'",
                    [tenant_id, row["kind"]],
                ).fetchone()
                if previous is None or previous["model_id"] != model_id:
                    self._conn.execute(
                        "UPDATE models SET state = 'ready', updated_at = ? "
                        "WHERE tenant_id = ? AND kind = ? AND state = 'promoted'",
                        [_text(now), tenant_id, row["kind"]],
                    )
                    self._conn.execute(
                        "UPDATE models SET state = 'promoted', updated_at = ? WHERE model_id = ?",
                        [_text(now), model_id],
                    )
                    self._conn.execute(
                        "INSERT INTO model_promotions VALUES (?, ?, ?, ?, ?)",
                        [
                            tenant_id,
                            row["kind"],
                            model_id,
                            previous["model_id"] if previous else None,
                            _text(now),
                        ],
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        record = self.get(tenant_id, model_id)
        assert record is not None
        return record

    # --- reads -------------------------------------------------------------------------

    def get(self, tenant_id: str, model_id: str) -> ModelRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM models WHERE tenant_id = ? AND model_id = ?", [tenant_id, model_id]
            ).fetchone()
        return _record(row) if row else None

    def promoted(self, tenant_id: str, kind: ModelKind) -> ModelRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM models WHERE tenant_id = ? AND kind = ? AND state = 'promoted'",
                [tenant_id, kind.value],
            ).fetchone()
        return _record(row) if row else None

    def promotion_history(self, tenant_id: str, kind: ModelKind) -> list[tuple[str, str | None]]:
        """(model_id, previous model_id), oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT model_id, previous_id FROM model_promotions WHERE tenant_id = ? "
                "AND kind = ? ORDER BY rowid",
                [tenant_id, kind.value],
            ).fetchall()
        return [(r["model_id"], r["previous_id"]) for r in rows]

    def tenants(self) -> list[str]:
        with self._lock:
            rows = self._conn.execute("SELECT DISTINCT tenant_id FROM models").fetchall()
        return [r["tenant_id"] for r in rows]

    def page(
        self, tenant_id: str, kind: ModelKind | None, page_size: int, page_token: str
    ) -> tuple[list[ModelRecord], str]:
        """Newest first; keyset pages that stay stable while versions are added."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        kind_key = kind.value if kind else ""
        where = ["tenant_id = ?"]
        params: list[object] = [tenant_id]
        if kind:
            where.append("kind = ?")
            params.append(kind.value)
        if page_token:
            created_at, last_id = _decode_token(page_token, tenant_id, kind_key)
            where.append("(created_at, model_id) < (?, ?)")
            params += [created_at, last_id]
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM models WHERE {' AND '.join(where)} "
                "ORDER BY created_at DESC, model_id DESC LIMIT ?",
                [*params, size + 1],
            ).fetchall()
        records = [_record(r) for r in rows[:size]]
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = _encode_token(tenant_id, kind_key, last["created_at"], last["model_id"])
        return records, token


def _encode_token(tenant_id: str, kind: str, created_at: str, model_id: str) -> str:
    # Opaque to clients (AIP-158) but not secret; carries the listing it belongs to so
    # it cannot be replayed against another tenant or filter.
    body = json.dumps({"v": 1, "t": tenant_id, "k": kind, "c": created_at, "m": model_id})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode_token(token: str, tenant_id: str, kind: str) -> tuple[str, str]:
    try:
        body = json.loads(base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()))
        if body["v"] != 1 or body["t"] != tenant_id or body["k"] != kind:
            raise invalid_page_token()
        created_at, model_id = body["c"], body["m"]
        if not isinstance(created_at, str) or not isinstance(model_id, str):
            raise invalid_page_token()
        return created_at, model_id
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise invalid_page_token() from exc


def _record(row: sqlite3.Row) -> ModelRecord:
    return ModelRecord(
        model_id=row["model_id"],
        tenant_id=row["tenant_id"],
        kind=ModelKind(row["kind"]),
        state=ModelState(row["state"]),
        created_at=_time(row["created_at"]) or datetime.now(UTC),
        updated_at=_time(row["updated_at"]) or datetime.now(UTC),
        metrics=json.loads(row["metrics_json"]),
        feature_names=tuple(json.loads(row["feature_names"])),
        config=json.loads(row["config_json"]),
        training_start=_time(row["training_start"]),
        training_end=_time(row["training_end"]),
        progress=float(row["progress"]),
        stage=row["stage"],
        failure=row["failure"],
    )
