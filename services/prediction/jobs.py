"""Training on demand from the command line, with progress on the terminal.

    python -m services.prediction.jobs --data-dir .bilten train churn --tenant TENANT
    python -m services.prediction.jobs --data-dir .bilten schedule   # every kind, every tenant
    python -m services.prediction.jobs --data-dir .bilten list --tenant TENANT
    python -m services.prediction.jobs --data-dir .bilten rules add --tenant TENANT \
        --metric tickets_sold --lower 5 --upper 500 [--severity critical] [--rule-id ID]
    python -m services.prediction.jobs --data-dir .bilten rules list --tenant TENANT
    python -m services.prediction.jobs --data-dir .bilten rules delete --tenant TENANT ID

DuckDB lets one process open the event store, so run training while the server is
stopped; a running server trains through `TrainModel` and its own schedule
(`BILTEN_PREDICTION_RETRAIN_INTERVAL_HOURS`) instead. `rules` touches only the
prediction SQLite file, so it works next to a running server: the anomaly monitor reads
a tenant's threshold rules at every check (hourly values of `alerts.METRICS`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

from services.platform.errors import AnalyticsError
from services.prediction.alerts import METRICS, AlertStore, ThresholdRule, new_rule
from services.prediction.anomaly import Severity
from services.prediction.registry import ModelKind, ModelRecord, ModelState
from services.prediction.service import REGISTRY_FILE, PredictionService, PredictionSettings
from services.storage.event_store import DuckDBEventStore


def _print(record: ModelRecord) -> None:
    headline = (
        "roc_auc",
        "baseline_recency_roc_auc",
        "pr_auc",
        "baseline_recency_pr_auc",
        "calibration_ece",
        "mase",
        "baseline_mase",
        "f1",
        "baseline_f1",
    )
    shown = [k for k in headline if k in record.metrics]
    metrics = ", ".join(f"{k}={record.metrics[k]:.4g}" for k in shown)
    print(f"{record.model_id} {record.kind.value} {record.state.value} {metrics}")
    if record.failure:
        print(f"  failure: {record.failure}")


def _watch(service: PredictionService, tenant_id: str, stop: threading.Event) -> None:
    """Prints the progress of the version in training, as a client polling GetModel would."""
    shown = ""
    while not stop.wait(0.5):
        page, _ = service.registry.page(tenant_id, None, 5, "")
        for record in page:
            if record.state is ModelState.TRAINING:
                line = f"  {record.model_id}: {record.progress:4.0%} {record.stage}"
                if line != shown:
                    print(line, flush=True)
                    shown = line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.prediction.jobs")
    parser.add_argument("--data-dir", type=Path, default=Path(".bilten"))
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one model version now")
    train.add_argument("kind", choices=[k.value for k in ModelKind])
    train.add_argument("--tenant", required=True)
    sub.add_parser("schedule", help="one run of the retraining schedule")
    listing = sub.add_parser("list", help="model versions of a tenant")
    listing.add_argument("--tenant", required=True)
    rules = sub.add_parser("rules", help="user-defined threshold rules of a tenant")
    rule_sub = rules.add_subparsers(dest="action", required=True)
    add = rule_sub.add_parser("add", help="add or replace a rule")
    add.add_argument("--tenant", required=True)
    add.add_argument("--metric", required=True, choices=METRICS)
    add.add_argument("--lower", type=float, default=None)
    add.add_argument("--upper", type=float, default=None)
    add.add_argument("--severity", choices=[s.value for s in Severity], default="warning")
    add.add_argument("--rule-id", default="", help="default: a new id")
    rule_list = rule_sub.add_parser("list", help="the tenant's rules")
    rule_list.add_argument("--tenant", required=True)
    delete = rule_sub.add_parser("delete", help="remove a rule")
    delete.add_argument("--tenant", required=True)
    delete.add_argument("rule_id")
    args = parser.parse_args(argv)
    if args.command == "rules":
        return _rules(args)

    store = DuckDBEventStore(args.data_dir / "events.duckdb")
    settings = PredictionSettings(  # no background loops in a one-shot job
        retrain_interval_hours=0,
        schedule_start_delay_seconds=0,
        anomaly_interval_seconds=0,
        snapshot_ttl_seconds=900,
    )
    service = PredictionService(store, args.data_dir, settings=settings)
    try:
        if args.command == "list":
            for record in service.registry.page(args.tenant, None, 1000, "")[0]:
                _print(record)
            return 0
        stop = threading.Event()
        tenant = getattr(args, "tenant", "")
        watcher = threading.Thread(target=_watch, args=(service, tenant, stop), daemon=True)
        watcher.start()
        started = time.perf_counter()
        if args.command == "train":
            service.precheck(args.tenant, ModelKind(args.kind))
            records = [asyncio.run(service.train(args.tenant, ModelKind(args.kind)))]
        else:
            records = asyncio.run(service.retrain_due())
        stop.set()
        for record in records:
            _print(record)
        print(f"done in {time.perf_counter() - started:.1f} s")
        return 0 if all(r.state is not ModelState.FAILED for r in records) else 1
    except Exception as error:  # the CLI's last word: the reason, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        asyncio.run(service.aclose())
        store.close()


def _show(rule: ThresholdRule) -> str:
    def bound(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    return (
        f"{rule.rule_id} {rule.metric_name} lower={bound(rule.lower)} "
        f"upper={bound(rule.upper)} {rule.severity.value}"
    )


def _rules(args: argparse.Namespace) -> int:
    store = AlertStore(args.data_dir / REGISTRY_FILE)
    try:
        if args.action == "add":
            rule = new_rule(
                store,
                args.tenant,
                args.metric,
                args.lower,
                args.upper,
                Severity(args.severity),
                args.rule_id,
            )
            store.put_rule(rule)
            print(_show(rule))
        elif args.action == "list":
            for rule in store.rules(args.tenant):
                print(_show(rule))
        elif not store.delete_rule(args.tenant, args.rule_id):
            print(f"error: no rule {args.rule_id!r} in tenant {args.tenant!r}", file=sys.stderr)
            return 1
        return 0
    except AnalyticsError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    finally:
        store.close()


if __name__ == "__main__":
    raise SystemExit(main())
