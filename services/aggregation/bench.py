"""Benchmarks of docs/benchmarks-live.md: `python -m services.aggregation.bench live|rollups`.

- `live`: the in-process mesh over real gRPC; conversions through `TrackConversion` at
  random gaps, one `StreamLiveMetrics` subscriber; prints the delay from each
  acknowledgement to the update that includes it.
- `rollups`: random events of one tenant over 30 days; rebuild, flush and read times of
  each tier against raw.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from services.events.model import TrackedEvent, TrackedEventType
from services.query import metrics, rollups
from services.query.metrics import Granularity, Scope, TimeRange
from services.query.rollups import RetentionPolicy, RollupMaintainer, RollupStore, Tier
from services.storage.event_store import DuckDBEventStore


async def _live(events: int) -> None:
    import grpc
    from bilten.analytics.aggregation.v1 import aggregation_service_pb2 as agg_pb
    from bilten.analytics.aggregation.v1 import aggregation_service_pb2_grpc as agg_grpc
    from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
    from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
    from bilten.analytics.type.v1 import tracked_event_pb2 as te

    from services.mesh import Mesh
    from services.platform.settings import PlatformSettings

    with tempfile.TemporaryDirectory() as data_dir:
        mesh = Mesh.open(
            PlatformSettings(
                data_dir=Path(data_dir), grpc_port=0, metrics_port=0, schema_registry_port=0
            )
        )
        await mesh.start(("ingestion", "aggregation"))
        credentials = mesh.ensure_dev_credentials()
        read = (("authorization", f"Bearer {credentials['admin_token']}"),)
        write = (("authorization", f"Bearer {credentials['write_key']}"),)
        delays = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
            ingest = pb_grpc.IngestionServiceStub(channel)
            stream = agg_grpc.AggregationServiceStub(channel).StreamLiveMetrics(
                agg_pb.StreamLiveMetricsRequest(), metadata=read
            )
            await stream.read()
            rng = random.Random(1)
            for sold in range(1, events + 1):
                await asyncio.sleep(rng.uniform(0, 1.2))
                event = te.TrackedEvent(
                    event_type=te.TRACKED_EVENT_TYPE_CONVERSION,
                    event_name="ticket_purchased",
                    user_id=f"u{sold}",
                    session_id=f"s{sold}",
                )
                event.occurred_at.GetCurrentTime()
                event.ticketing.quantity = 1
                await ingest.TrackConversion(pb.TrackConversionRequest(event=event), metadata=write)
                acked = time.perf_counter()
                while True:
                    update = await stream.read()
                    assert isinstance(update, agg_pb.StreamLiveMetricsResponse)
                    if update.tickets_sold_today >= sold:
                        break
                delays.append(time.perf_counter() - acked)
            stream.cancel()
        await mesh.stop()
    cut = statistics.quantiles(delays, n=20)
    print(
        f"ack -> update, {len(delays)} events: median {statistics.median(delays) * 1000:.1f} ms,"
        f" p95 {cut[18] * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms"
    )


def _random_events(count: int, users: int, now: datetime) -> list[TrackedEvent]:
    rng = random.Random(1)
    kinds = list(TrackedEventType)
    out = []
    for i in range(count):
        kind = rng.choice(kinds)
        at = now - timedelta(seconds=rng.uniform(0, 30 * 86_400))
        sale = kind is TrackedEventType.CONVERSION
        out.append(
            TrackedEvent(
                tenant_id="acme",
                event_id=f"e{i}",
                event_type=kind,
                event_name=f"{kind.value}_{rng.randrange(3)}",
                occurred_at=at,
                received_at=at,
                user_id=f"u{rng.randrange(users)}",
                ticketed_event_id=rng.choice(("", "concert-1", "concert-2")),
                order_id=f"o{i}" if sale else "",
                revenue=Decimal(rng.randrange(100, 10_000)) / 100 if sale else Decimal(0),
                currency="EUR" if sale else "",
                quantity=rng.randrange(1, 4) if sale else 0,
            )
        )
    return out


def _median_ms(run: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _rollups(count: int) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    events = _random_events(count, 20_000, now)
    with tempfile.TemporaryDirectory() as directory:
        raw = DuckDBEventStore(Path(directory) / "events.duckdb")
        for first in range(0, len(events), 50_000):
            raw.append(events[first : first + 50_000])
        store = RollupStore(Path(directory) / "rollups.duckdb")
        maintainer = RollupMaintainer(raw, store, RetentionPolicy())
        rebuild_ms = _median_ms(maintainer.rebuild, 1)
        print(f"rebuild of the tiers from {count} raw events: {rebuild_ms:.0f} ms")
        for tier in rollups.TIERS:
            rows = store.read(f"SELECT count(*) AS n FROM {tier.table}").column("n")[0].as_py()
            print(f"  {tier.name.lower()} tier rows: {rows}")
        scope = Scope.tenant("acme")
        month = TimeRange(
            rollups.floor_to(now - timedelta(days=29), Tier.DAY), rollups.floor_to(now, Tier.DAY)
        )
        readers: list[tuple[str, Callable[..., object], Callable[..., object]]] = [
            ("revenue", rollups.revenue, metrics.revenue),
            ("conversions", rollups.conversions, metrics.conversions),
            ("active_users", rollups.active_users, metrics.active_users),
        ]
        for name, from_tier, from_raw in readers:

            def read_raw(read_events: Callable[..., object] = from_raw) -> object:
                return read_events(raw, scope, month, Granularity.DAY)

            cells = [f"raw {_median_ms(read_raw):.0f} ms"]
            for tier in rollups.TIERS:

                def read(tier: Tier = tier, read_tier: Callable[..., object] = from_tier) -> object:
                    return read_tier(store, tier, scope, month, Granularity.DAY)

                cells.append(f"{tier.name.lower()} {_median_ms(read):.0f} ms")
            print(f"{name}, 29 days by day: " + ", ".join(cells))
        fresh = [
            dataclasses.replace(e, event_id=f"n{i}", occurred_at=now + timedelta(seconds=i % 60))
            for i, e in enumerate(_random_events(1000, 20_000, now))
        ]
        raw.append(fresh)
        started = time.perf_counter()
        maintainer.observe_events(fresh)
        observed = time.perf_counter() - started
        flush_ms = _median_ms(maintainer.flush, 1)
        print(f"observe 1000 events: {observed * 1000:.2f} ms; flush: {flush_ms:.0f} ms")
        store.close()
        raw.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.aggregation.bench")
    parser.add_argument("what", choices=["live", "rollups"])
    parser.add_argument("--events", type=int, default=0)
    args = parser.parse_args()
    if args.what == "live":
        asyncio.run(_live(args.events or 40))
    else:
        _rollups(args.events or 300_000)


if __name__ == "__main__":
    main()
