"""`bilten-analytics pinot show|apply`: the generated Pinot schema and REALTIME table,
printed or applied to a controller.

    bilten-analytics pinot show                      # JSON of both, from BILTEN_* settings
    bilten-analytics pinot apply [--controller URL]  # create, or update when they exist

`apply` is idempotent: the schema goes through `POST /schemas?override=true`, the table
through `POST /tables` when it is new and `PUT /tables/<name>` otherwise. The topic must
exist first (the platform creates it at start); Pinot starts consuming at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from services.pinot.config import PinotTableSettings, pinot_schema, realtime_table_config
from services.platform.settings import PlatformSettings


class PinotControllerError(RuntimeError):
    pass


def table_settings(settings: PlatformSettings, registry_token: str = "") -> PinotTableSettings:
    return PinotTableSettings(
        table=settings.pinot_table,
        topic=settings.kafka_events_topic,
        kafka_bootstrap=settings.pinot_kafka_bootstrap_servers or settings.kafka_bootstrap_servers,
        registry_url=settings.pinot_schema_registry_url or settings.registry_url,
        registry_token=registry_token or settings.schema_registry_token,
        retention_days=settings.raw_retention_days,
        replicas=settings.pinot_replicas,
        kafka_client_config=dict(settings.kafka_client_config),
        query_timeout_ms=settings.pinot_query_timeout_ms,
    )


def _check(response: httpx.Response, what: str) -> Any:
    if response.status_code >= 300:
        raise PinotControllerError(f"{what}: HTTP {response.status_code} {response.text[:500]}")
    return response.json() if response.content else None


def apply(controller_url: str, table: PinotTableSettings, timeout: float = 30.0) -> dict[str, str]:
    """Creates or updates the schema and the REALTIME table; returns what it did."""
    schema = pinot_schema(table.table)
    config = realtime_table_config(table)
    done: dict[str, str] = {}
    with httpx.Client(base_url=controller_url.rstrip("/"), timeout=timeout) as client:
        _check(client.post("/schemas", params={"override": "true"}, json=schema), "schema")
        done["schema"] = table.table
        exists = client.get(f"/tables/{table.table}", params={"type": "realtime"})
        existing = exists.json() if exists.status_code == 200 else {}
        if existing.get("REALTIME"):
            _check(client.put(f"/tables/{table.table}", json=config), "table update")
            done["table"] = "updated"
        else:
            _check(client.post("/tables", json=config), "table create")
            done["table"] = "created"
    return done


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bilten-analytics pinot", description=__doc__)
    parser.add_argument("action", choices=["show", "apply"])
    parser.add_argument("--controller", help="controller URL (default BILTEN_PINOT_CONTROLLER_URL)")
    parser.add_argument("--registry-token", default="", help="token Pinot sends to the registry")
    args = parser.parse_args(argv)
    settings = PlatformSettings()
    table = table_settings(settings, args.registry_token)
    if args.action == "show":
        json.dump(
            {"schema": pinot_schema(table.table), "table": realtime_table_config(table)},
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    try:
        done = apply(args.controller or settings.pinot_controller_url, table)
    except (PinotControllerError, httpx.HTTPError) as exc:
        print(f"bilten-analytics pinot apply: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(done))
    return 0
