"""Producer (and consumer) throughput against the dev broker.

    .venv/bin/python dev/kafka/bench_produce.py [--bootstrap 127.0.0.1:9092]
        [--messages 1000000] [--size 200] [--partitions 3] [--linger-ms 5] [--compression none]

Creates a throwaway topic, produces --messages values of --size bytes with an idempotent
acks=all producer, reports msg/s and MB/s (first produce() to flush() returning, i.e. every
message acknowledged), reads them all back with consume(num_messages=...), deletes the topic.
Bounded: one pass, local broker only.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--bootstrap", default=os.environ.get("BILTEN_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--linger-ms", type=int, default=5)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--no-consume", action="store_true")
    args = ap.parse_args()

    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    topic = f"bench-produce-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, args.partitions, 1)])[topic].result(60)
    try:
        producer = Producer(
            {
                "bootstrap.servers": args.bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": args.linger_ms,
                "compression.type": args.compression,
                "queue.buffering.max.messages": 1_000_000,
            }
        )
        payload = os.urandom(args.size)
        errors = 0

        def on_delivery(err, _msg) -> None:  # type: ignore[no-untyped-def]
            nonlocal errors
            if err is not None:
                errors += 1

        t0 = time.perf_counter()
        for i in range(args.messages):
            while True:
                try:
                    producer.produce(topic, payload, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.01)
            if i % 1000 == 0:
                producer.poll(0)
        left = producer.flush(120)
        dt = time.perf_counter() - t0
        assert left == 0 and errors == 0, f"{left} undelivered, {errors} errors"
        mb = args.messages * args.size / 1e6
        print(
            f"produce: {args.messages} x {args.size} B, {args.partitions} partitions, "
            f"idempotent acks=all linger.ms={args.linger_ms} compression={args.compression}: "
            f"{dt:.2f} s, {args.messages / dt:,.0f} msg/s, {mb / dt:.1f} MB/s"
        )

        if not args.no_consume:
            consumer = Consumer(
                {
                    "bootstrap.servers": args.bootstrap,
                    "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                    "session.timeout.ms": 6000,
                }
            )
            consumer.subscribe([topic])
            n = 0
            t_first = None
            deadline = time.monotonic() + 300
            while n < args.messages and time.monotonic() < deadline:
                msgs = consumer.consume(num_messages=1000, timeout=1.0)
                if msgs and t_first is None:
                    t_first = time.perf_counter()
                n += sum(1 for m in msgs if m.error() is None)
            dt = time.perf_counter() - (t_first or time.perf_counter())
            consumer.close()
            print(
                f"consume: {n} msgs in {dt:.2f} s after the first batch "
                f"(group join excluded), {n / dt:,.0f} msg/s"
            )
    finally:
        admin.delete_topics([topic])[topic].result(60)


if __name__ == "__main__":
    main()
