"""Streaming benchmarks (docs/benchmarks-streaming.md):

    python -m services.streaming.bench --bootstrap 127.0.0.1:9092 [--events 400000]
        [--batch 1000] [--in-flight 8] [--fresh-seconds 20] [--fresh-rate 5000]
        [--pinot-controller URL --pinot-broker URL]

1. ingestion → Kafka: `KafkaEventLog.append` of pre-built `TrackedEvent` batches, `in-flight`
   appends at once; events/s counts acknowledged events (acks=all, idempotent producer).
2. processor → store: a fresh consumer group and DuckDB file drain the topic filled in 1;
   events/s from the processor's start to the last commit.
3. freshness: with the processor running, batches are appended at `fresh-rate` events/s;
   for each batch, the time from the append's acknowledgement until a query of the store
   sees all of its events (polled every 10 ms), as p50/p99/max. With `--pinot-*`, the same
   for Pinot (the generated table, applied to that controller, reading the topic itself).

Needs a broker; starts our registry in process on a free port. Prints one JSON document.

The box may be shared: besides wall-clock rates, each phase reports the CPU seconds this
process and (with `--broker-pid`) the broker JVM spent, and `cpu_bound_events_per_second`
= events / ((process CPU + broker CPU) / cores): the rate these two would reach alone on
this machine if nothing else ran and the work spread over the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from services.events.model import Enrichment, EventSource, TrackedEvent, TrackedEventType
from services.storage.event_store import DuckDBEventStore
from services.streaming.kafka_log import KafkaEventLog
from services.streaming.processor import ProcessorConfig, StreamProcessor
from services.streaming.schemas import EnvelopeSchemaId, WriterSchemas
from services.streaming.topics import build_layout


def _event(i: int, now: datetime, name: str = "") -> TrackedEvent:
    conversion = i % 20 == 0
    return TrackedEvent(
        tenant_id=f"tenant_{i % 5}",
        event_id=f"{uuid.uuid4().hex}",
        event_type=TrackedEventType.CONVERSION if conversion else TrackedEventType.PAGE_VIEW,
        event_name=name or ("ticket_purchased" if conversion else "page_view"),
        occurred_at=now - timedelta(seconds=i % 600),
        received_at=now,
        source=EventSource.WEB,
        session_id=f"s-{i % 900}",
        user_id=f"user-{i % 5000}",
        page_url=f"https://bilten.example/events/{i % 50}",
        ticketed_event_id=f"concert-{i % 50}",
        revenue=Decimal("59.90") if conversion else Decimal(0),
        currency="EUR" if conversion else "",
        quantity=2 if conversion else 0,
        enrichment=Enrichment(
            ip_hash="9f2c1d0e8b7a6f5e",
            country_code="DE",
            browser_family="Chrome",
            browser_version="126",
            os_family="Linux",
            device_type="desktop",
        ),
    )


def _cpu_seconds(pid: int | None = None) -> float:
    """user + system CPU seconds of a process (this one by default), all threads."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    def __init__(self, broker_pid: int | None) -> None:
        self.broker_pid = broker_pid
        self.start = (_cpu_seconds(), _cpu_seconds(broker_pid) if broker_pid else 0.0)

    def report(self, events: int) -> dict[str, float]:
        own = _cpu_seconds() - self.start[0]
        broker = (_cpu_seconds(self.broker_pid) - self.start[1]) if self.broker_pid else 0.0
        cores = os.cpu_count() or 1
        out = {"process_cpu_seconds": round(own, 2)}
        if self.broker_pid:
            out["broker_cpu_seconds"] = round(broker, 2)
        out["cpu_bound_events_per_second"] = round(events / max(1e-9, (own + broker) / cores))
        return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _ingest(log: KafkaEventLog, batches: list[list[TrackedEvent]], in_flight: int) -> float:
    gate = asyncio.Semaphore(in_flight)

    async def one(batch: list[TrackedEvent]) -> None:
        async with gate:
            await log.append(batch)

    started = time.perf_counter()
    await asyncio.gather(*(one(b) for b in batches))
    return time.perf_counter() - started


def _drain(
    bootstrap: str, topic: str, registry_url: str, data_dir: Path, total: int, workers: int = 1
) -> tuple[float, float, StreamProcessor, DuckDBEventStore]:
    """Seconds from the processor's start to the last event stored, and the steady rate:
    events after the first commit / time from that commit to the last (the group join
    and the first fetch are a start-up cost, not throughput)."""
    store = DuckDBEventStore(data_dir / "events.duckdb")
    processor = StreamProcessor(
        ProcessorConfig(
            bootstrap,
            topic,
            topic + ".dlq",
            group_id=f"bench-{uuid.uuid4().hex[:8]}",
            session_timeout_ms=6000,
            dedup_window_seconds=86_400,
            workers=workers,
        ),
        store,
        WriterSchemas(registry_url, None),
    )
    started = time.perf_counter()
    processor.start()
    first: tuple[float, int] | None = None  # (time, events) of the first commit seen
    while (stored := processor.stats.stored_events) < total:
        if first is None and stored:
            first = (time.perf_counter(), stored)
        time.sleep(0.01)  # coarse: each wake-up takes the GIL from the processor
    ended = time.perf_counter()
    if first is None:  # everything in one batch
        first = (started, 0)
    steady = (total - first[1]) / max(ended - first[0], 1e-9)
    return ended - started, steady, processor, store


async def _freshness(
    log: KafkaEventLog,
    seconds: float,
    rate: int,
    visible: Any,  # Callable[[list[str]], dict[str, int]]: batch name -> rows seen
) -> list[float]:
    batch_size = max(1, rate // 10)
    acked: dict[str, tuple[float, int]] = {}
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set() or acked:
            pending = dict(acked)
            if pending:
                seen = visible(list(pending))
                now = time.perf_counter()
                for name, (at, size) in pending.items():
                    if seen.get(name, 0) >= size:
                        latencies.append(now - at)
                        acked.pop(name, None)
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.perf_counter()
    k = 0
    while time.perf_counter() - started < seconds:
        name = f"fresh_{k}"
        now = datetime.now(UTC)
        batch = [_event(i, now, name) for i in range(batch_size)]
        await log.append(batch)
        acked[name] = (time.perf_counter(), batch_size)
        k += 1
        await asyncio.sleep(max(0.0, started + k * 0.1 - time.perf_counter()))
    done.set()
    await asyncio.to_thread(poller.join, 30)
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.streaming.bench")
    parser.add_argument(
        "--bootstrap", default=os.environ.get("BILTEN_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--fresh-seconds", type=float, default=20)
    parser.add_argument("--fresh-rate", type=int, default=5000)
    parser.add_argument("--pinot-controller", default="")
    parser.add_argument("--pinot-broker", default="")
    parser.add_argument("--broker-pid", type=int, default=0, help="Kafka JVM pid, for its CPU")
    parser.add_argument("--workers", type=int, default=1, help="processor consumer threads")
    args = parser.parse_args(argv)

    from schema_registry.app import create_app
    from schema_registry.settings import RegistrySettings

    work = Path(tempfile.mkdtemp(prefix="bilten-streaming-bench-"))
    app = create_app(
        RegistrySettings(storage=f"sqlite:///{work / 'registry.db'}", auth_enabled=False)
    )
    registry_url, stop_registry = _serve_registry(app)
    topic = f"bench.streaming.{uuid.uuid4().hex[:8]}"
    layout = build_layout(topic, partitions=args.partitions)
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": os.getloadavg(),
        "topic_partitions": args.partitions,
    }
    now = datetime.now(UTC)
    batches = [
        [_event(i, now) for i in range(start, min(args.events, start + args.batch))]
        for start in range(0, args.events, args.batch)
    ]

    async def run() -> None:
        log = KafkaEventLog(
            bootstrap=args.bootstrap,
            layout=layout,
            schema_id=EnvelopeSchemaId(registry_url, None, topic),
            max_pending_events=max(200_000, args.batch * args.in_flight),
        )
        assert await log.start()
        await log.append(batches[0])  # warm-up: connections, producer id, schema id
        meter = _CpuMeter(args.broker_pid or None)
        elapsed = await _ingest(log, batches[1:], args.in_flight)
        sent = args.events - len(batches[0])
        result["ingest_to_kafka"] = {
            "events": sent,
            "batch": args.batch,
            "in_flight": args.in_flight,
            "seconds": round(elapsed, 3),
            "events_per_second": round(sent / elapsed),
            **meter.report(sent),
        }
        # 600k TrackedEvent objects left alive would make every full garbage collection
        # of the later phases walk them (measured: a 1-2 s stall in the freshness phase),
        # a cost of this benchmark, not of a processor.
        batches.clear()
        gc.collect()
        meter = _CpuMeter(args.broker_pid or None)
        seconds, steady, processor, store = await asyncio.to_thread(
            _drain, args.bootstrap, topic, registry_url, work, args.events, args.workers
        )
        result["processor_to_store"] = {
            "events": args.events,
            "seconds_from_start": round(seconds, 3),
            "events_per_second": round(args.events / seconds),
            "steady_events_per_second": round(steady),
            "workers": args.workers,
            "batches": processor.stats.batches,
            "note": "events_per_second includes the consumer group join (~0.5-3 s); "
            "steady_events_per_second is measured from the first commit to the last",
            **meter.report(args.events),
        }

        def store_visible(names: list[str]) -> dict[str, int]:
            marks = ", ".join("?" for _ in names)
            table = store.read(
                f"SELECT event_name, count(*) AS n FROM tracked_events"
                f" WHERE event_name IN ({marks}) GROUP BY event_name",
                names,
            )
            return dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))

        latencies = await _freshness(log, args.fresh_seconds, args.fresh_rate, store_visible)
        result["freshness_store"] = _summary(latencies, args.fresh_rate)
        await asyncio.to_thread(processor.stop)
        store.close()
        await log.close()
        if args.pinot_controller and args.pinot_broker:
            result["freshness_pinot"] = await _pinot_freshness(args, registry_url)

    try:
        asyncio.run(run())
    finally:
        stop_registry()
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return 0


def _summary(latencies: list[float], rate: int) -> dict[str, Any]:
    return {
        "rate_events_per_second": rate,
        "batches": len(latencies),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
    }


async def _pinot_freshness(args: argparse.Namespace, registry_url: str) -> dict[str, Any]:
    """Freshness through Pinot on a topic of its own, so no backlog of the earlier phases
    is measured: the table is created first and polled until it answers."""
    import httpx

    from services.pinot.apply import apply
    from services.pinot.config import PinotTableSettings

    topic = f"bench.pinot.{uuid.uuid4().hex[:8]}"
    log = KafkaEventLog(
        bootstrap=args.bootstrap,
        layout=build_layout(topic, partitions=args.partitions),
        schema_id=EnvelopeSchemaId(registry_url, None, topic),
    )
    assert await log.start()
    table = f"bench_{uuid.uuid4().hex[:8]}"
    apply(
        args.pinot_controller,
        PinotTableSettings(
            table=table, topic=topic, kafka_bootstrap=args.bootstrap, registry_url=registry_url
        ),
    )
    client = httpx.Client(timeout=10)

    def pinot_visible(names: list[str]) -> dict[str, int]:
        quoted = ", ".join(f"'{n}'" for n in names)  # names are fresh_<int>
        body = client.post(
            f"{args.pinot_broker}/query/sql",
            json={
                "sql": f"SELECT event_name, COUNT(*) FROM {table} WHERE event_name IN ({quoted})"
                " GROUP BY event_name LIMIT 100000"
            },
        ).json()
        return {row[0]: int(row[1]) for row in body.get("resultTable", {}).get("rows", [])}

    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(timeout=10) as probe:
        while True:  # the consuming segments are created a moment after the table
            response = await probe.post(
                f"{args.pinot_broker}/query/sql", json={"sql": f"SELECT COUNT(*) FROM {table}"}
            )
            body = response.json()
            if body.get("resultTable") and not body.get("exceptions"):
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.5)
    latencies = await _freshness(log, args.fresh_seconds, args.fresh_rate, pinot_visible)
    await log.close()
    return {**_summary(latencies, args.fresh_rate), "table": table}


def _serve_registry(app: Any) -> tuple[str, Any]:
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        app.close()

    return f"http://127.0.0.1:{port}", stop


if __name__ == "__main__":
    raise SystemExit(main())
