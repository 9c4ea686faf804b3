"""Smoke test for the dev Pinot cluster started by dev/pinot.sh (run it as `dev/pinot.sh smoke`).

OFFLINE: create schema + table `bilten_smoke` through the controller REST API, ingest 5 CSV rows
with `POST /ingestFromFile` (the controller builds and uploads the segment), then check
`POST <broker>/query/sql {"sql": "select count(*), sum(revenue) from bilten_smoke"}`.

REALTIME (--realtime): the production stream config (kafka30 consumer factory, Confluent
Schema Registry Avro decoder, read_committed) on a fresh topic of the Kafka on --kafka, with a
tiny in-process schema registry stub answering `GET /schemas/ids/{id}`. A transactional
producer commits 5 Confluent-framed Avro records and 1 record without the magic byte, then
aborts 2 records, then commits 1 more; Pinot must count exactly 6 (junk dropped, aborted
records not read, consumption goes on past the aborted batch).
Needs confluent-kafka and fastavro (the repo .venv has both).

Exit 0 on success, 1 on failure; prints one line per check. Only the standard library is
needed for the OFFLINE part.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OFFLINE = "bilten_smoke"
REALTIME = "bilten_smoke_rt"
ROWS = [
    ("u1", "view", 0.0, 1700000000000),
    ("u2", "buy", 9.5, 1700000001000),
    ("u1", "buy", 3.25, 1700000002000),
    ("u3", "view", 0.0, 1700000003000),
    ("u2", "view", 0.0, 1700000004000),
]


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    ctype: str = "application/json",
    timeout: float = 60,
) -> tuple[int, Any]:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    req = urllib.request.Request(url, data=body, method=method)  # noqa: S310 - checked above
    if body is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - checked above
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def post_json(url: str, payload: Any) -> tuple[int, Any]:
    return http("POST", url, json.dumps(payload).encode())


def schema(name: str) -> dict[str, Any]:
    return {
        "schemaName": name,
        "dimensionFieldSpecs": [
            {"name": "user_id", "dataType": "STRING"},
            {"name": "event", "dataType": "STRING"},
        ],
        "metricFieldSpecs": [{"name": "revenue", "dataType": "DOUBLE"}],
        "dateTimeFieldSpecs": [
            {
                "name": "ts",
                "dataType": "LONG",
                "format": "1:MILLISECONDS:EPOCH",
                "granularity": "1:MILLISECONDS",
            }
        ],
    }


def drop(controller: str, table: str, table_type: str) -> None:
    http("DELETE", f"{controller}/tables/{table}?type={table_type}")
    # the schema can only go once the table is gone; retry briefly
    for _ in range(20):
        status, _ = http("DELETE", f"{controller}/schemas/{table}")
        if status in (200, 404):
            return
        time.sleep(0.5)


def query(broker: str, sql: str) -> dict[str, Any]:
    status, body = post_json(f"{broker}/query/sql", {"sql": sql, "queryOptions": "timeoutMs=5000"})
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"query HTTP {status}: {body}")
    return body


def wait_count(broker: str, table: str, expected: int, timeout: float) -> tuple[list[Any], float]:
    t0 = time.monotonic()
    last: Any = None
    while time.monotonic() - t0 < timeout:
        try:
            body = query(broker, f"select count(*), sum(revenue) from {table}")
            rows = body.get("resultTable", {}).get("rows")
            last = rows if rows else body.get("exceptions")
            if rows and rows[0][0] == expected:
                return rows[0], time.monotonic() - t0
        except Exception as exc:
            last = exc
        time.sleep(0.5)
    raise RuntimeError(
        f"{table}: count(*) did not reach {expected} in {timeout:.0f} s (last: {last})"
    )


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        raise SystemExit(1)


def offline(controller: str, broker: str, keep: bool) -> None:
    drop(controller, OFFLINE, "offline")
    status, body = post_json(f"{controller}/schemas", schema(OFFLINE))
    check(status == 200, f"POST /schemas {OFFLINE}: {status} {body}")
    table = {
        "tableName": OFFLINE,
        "tableType": "OFFLINE",
        "segmentsConfig": {"schemaName": OFFLINE, "timeColumnName": "ts", "replication": "1"},
        "tenants": {},
        "tableIndexConfig": {"loadMode": "MMAP"},
        "metadata": {},
    }
    status, body = post_json(f"{controller}/tables", table)
    check(status == 200, f"POST /tables {OFFLINE}_OFFLINE: {status} {body}")

    csv = "user_id,event,revenue,ts\n" + "".join(f"{u},{e},{r},{t}\n" for u, e, r, t in ROWS)
    boundary = uuid.uuid4().hex
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="rows.csv"\r\n'
        f"Content-Type: text/csv\r\n\r\n{csv}\r\n--{boundary}--\r\n"
    ).encode()
    cfg = urllib.parse.quote(json.dumps({"inputFormat": "csv"}))
    t0 = time.monotonic()
    status, body = http(
        "POST",
        f"{controller}/ingestFromFile?tableNameWithType={OFFLINE}_OFFLINE&batchConfigMapStr={cfg}",
        form,
        f"multipart/form-data; boundary={boundary}",
    )
    check(
        status == 200,
        f"POST /ingestFromFile ({len(ROWS)} rows) in {time.monotonic() - t0:.1f} s: {body}",
    )
    row, waited = wait_count(broker, OFFLINE, len(ROWS), 60)
    check(
        row[0] == 5 and abs(row[1] - 12.75) < 1e-9,
        f"broker: select count(*), sum(revenue) from {OFFLINE} -> {row} "
        f"(visible after {waited:.1f} s)",
    )
    if not keep:
        drop(controller, OFFLINE, "offline")


class _Registry(BaseHTTPRequestHandler):
    schemas: dict[int, str] = {}
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if (
            len(parts) == 3
            and parts[:2] == ["schemas", "ids"]
            and parts[2].isdigit()
            and int(parts[2]) in self.schemas
        ):
            self._send(200, {"schema": self.schemas[int(parts[2])]})
        else:
            self._send(404, {"error_code": 40403, "message": "Schema not found"})

    def _send(self, status: int, payload: Any) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


def realtime(
    controller: str, broker: str, bootstrap: str, keep: bool, isolation: str = "read_committed"
) -> None:
    try:
        import fastavro
        from confluent_kafka import Producer
        from confluent_kafka.admin import (  # type: ignore[attr-defined]
            AdminClient,
            NewTopic,
        )
    except ImportError as exc:
        check(False, f"--realtime needs confluent-kafka and fastavro ({exc})")
        return

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 3000, "log_level": 0})
    try:
        admin.list_topics(timeout=5)
    except Exception as exc:
        check(False, f"Kafka on {bootstrap} (start one with dev/kafka.sh start): {exc}")
    topic = f"bilten-pinot-smoke-{int(time.time())}"
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    check(True, f"created topic {topic} on {bootstrap}")

    avro_schema = {
        "type": "record",
        "name": "Event",
        "namespace": "bilten.smoke",
        "fields": [
            {"name": "user_id", "type": "string"},
            {"name": "event", "type": "string"},
            {"name": "revenue", "type": "double"},
            {"name": "ts", "type": "long"},
        ],
    }
    schema_id = 7
    _Registry.schemas = {schema_id: json.dumps(avro_schema)}
    _Registry.hits = []
    registry = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=registry.serve_forever, daemon=True).start()
    registry_url = f"http://127.0.0.1:{registry.server_address[1]}"
    parsed = fastavro.parse_schema(avro_schema)

    def frame(u: str, e: str, r: float, t: int) -> bytes:
        buf = io.BytesIO()
        buf.write(struct.pack(">bI", 0, schema_id))
        fastavro.schemaless_writer(buf, parsed, {"user_id": u, "event": e, "revenue": r, "ts": t})
        return buf.getvalue()

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"{topic}-tx",
            "enable.idempotence": True,
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for u, e, r, t in ROWS:
        producer.produce(topic, key=u.encode(), value=frame(u, e, r, t))
    producer.produce(topic, key=b"junk", value=b'{"not": "confluent avro"}')  # no magic byte
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"u9", value=frame("u9", "buy", 1000.0, 1700000009000))
    producer.produce(topic, key=b"u9", value=frame("u9", "buy", 2000.0, 1700000010000))
    producer.flush(30)  # make the aborted records reach the log (abort alone purges unsent ones)
    producer.abort_transaction(30)
    producer.begin_transaction()  # committed after the aborted batch: consumption must go past it
    producer.produce(topic, key=b"u4", value=frame("u4", "buy", 7.25, 1700000011000))
    producer.commit_transaction(30)
    check(
        True,
        f"produced {len(ROWS)} committed Avro + 1 junk (no magic byte), then 2 aborted, "
        f"then 1 committed record",
    )

    drop(controller, REALTIME, "realtime")
    status, body = post_json(f"{controller}/schemas", schema(REALTIME))
    check(status == 200, f"POST /schemas {REALTIME}: {status} {body}")
    stream = {
        "streamType": "kafka",
        "stream.kafka.topic.name": topic,
        "stream.kafka.broker.list": bootstrap,
        "stream.kafka.consumer.type": "lowlevel",
        "stream.kafka.consumer.factory.class.name": (
            "org.apache.pinot.plugin.stream.kafka30.KafkaConsumerFactory"
        ),
        "stream.kafka.decoder.class.name": "org.apache.pinot.plugin.inputformat.avro.confluent."
        "KafkaConfluentSchemaRegistryAvroMessageDecoder",
        "stream.kafka.decoder.prop.schema.registry.rest.url": registry_url,
        "stream.kafka.isolation.level": isolation,
        "stream.kafka.consumer.prop.auto.offset.reset": "smallest",
        "realtime.segment.flush.threshold.rows": "100000",
        "realtime.segment.flush.threshold.time": "6h",
    }
    table = {
        "tableName": REALTIME,
        "tableType": "REALTIME",
        "segmentsConfig": {
            "schemaName": REALTIME,
            "timeColumnName": "ts",
            "replicasPerPartition": "1",
        },
        "tenants": {},
        "tableIndexConfig": {"loadMode": "MMAP"},
        "ingestionConfig": {"streamIngestionConfig": {"streamConfigMaps": [stream]}},
        "metadata": {},
    }
    t0 = time.monotonic()
    status, body = post_json(f"{controller}/tables", table)
    check(
        status == 200,
        f"POST /tables {REALTIME}_REALTIME (kafka30 factory, Confluent decoder, "
        f"{isolation}): {status} {body}",
    )
    _, waited = wait_count(broker, REALTIME, len(ROWS) + 1, 90)
    time.sleep(3)  # give aborted / junk records a chance to show up wrongly
    again = query(broker, f"select count(*), sum(revenue) from {REALTIME}")["resultTable"]["rows"][
        0
    ]
    check(
        again[0] == 6 and abs(again[1] - 20.0) < 1e-9,
        f"broker: select count(*), sum(revenue) from {REALTIME} -> {again} "
        f"(first seen {time.monotonic() - t0 - 3:.1f} s after table creation, "
        f"{waited:.1f} s of polling)",
    )
    check(
        any(h.startswith(f"/schemas/ids/{schema_id}") for h in _Registry.hits),
        f"decoder fetched the writer schema from the registry stub ({sorted(set(_Registry.hits))})",
    )
    if not keep:
        drop(controller, REALTIME, "realtime")
        admin.delete_topics([topic])
    registry.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--controller", default="http://127.0.0.1:9000")
    ap.add_argument("--broker", default="http://127.0.0.1:8099")
    ap.add_argument("--kafka", default="127.0.0.1:9092")
    ap.add_argument("--realtime", action="store_true", help="also test a REALTIME table from Kafka")
    ap.add_argument("--keep", action="store_true", help="keep the smoke tables (and topic)")
    args = ap.parse_args()
    offline(args.controller, args.broker, args.keep)
    if args.realtime:
        realtime(args.controller, args.broker, args.kafka, args.keep)
    print("smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
