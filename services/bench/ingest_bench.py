"""Ingestion benchmark: real server process, real gRPC, durable group commit into DuckDB.

    bilten-analytics bench ingest [--seconds 10] [--batch 500] [--concurrency 8]
                                  [--phase both|batch|single] [--client python|ghz]

Starts `bilten-analytics serve ingestion` on a fresh data dir, then drives it with
(1) `IngestEvents` batches, (2) single-event `Track` calls. Requests are serialized once
up front, so the client spends its CPU on the wire, not on building protos; on a 2-core
box client and server still share the cores, which the figures include. Events carry no
client id, so nothing is deduped.

The client: `python` (default) is grpc.aio in this process; `ghz` runs the Go load
generator ghz (github.com/bojand/ghz; `go install github.com/bojand/ghz/cmd/ghz@v0.93.0`,
the version the Go proxy here serves; found on PATH or in ~/go/bin) with the same
serialized requests. It takes less of the shared CPU than a Python client, so the
server's capacity shows better. Each phase also reports the server process's CPU time
per event / per call (psutil), which moves much less with the machine's load than the
rates do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.type.v1 import tracked_event_pb2 as te
from grpc_health.v1 import health_pb2, health_pb2_grpc

INGEST = "/bilten.analytics.ingestion.v1.IngestionService/IngestEvents"
TRACK = "/bilten.analytics.ingestion.v1.IngestionService/Track"
DESCRIPTOR_SET = (
    Path(__file__).resolve().parents[2] / "gen" / "descriptors" / "bilten_analytics.binpb"
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _event(i: int) -> te.TrackedEvent:
    event = te.TrackedEvent(
        event_type=te.TRACKED_EVENT_TYPE_TRACK,
        event_name="ticket_viewed",
        user_id=f"user-{i % 5000}",
        session_id=f"s-{i % 900}",
    )
    event.ticketing.ticketed_event_id = f"concert-{i % 50}"
    event.client.ip_address = "81.2.69.160"
    event.client.user_agent = "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36"
    return event


async def _drive(
    target: str, method: str, payload: bytes, seconds: float, concurrency: int, key: str
) -> tuple[int, list[float]]:
    calls = 0
    latencies: list[float] = []
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal calls
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await call(payload, metadata=metadata, timeout=30)
                latencies.append(time.perf_counter() - started)
                calls += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls, latencies


def _find_ghz() -> str:
    found = shutil.which("ghz") or str(Path.home() / "go" / "bin" / "ghz")
    if not Path(found).is_file():
        raise SystemExit(
            "ghz not found: go install github.com/bojand/ghz/cmd/ghz@v0.93.0 (or use "
            "--client python)"
        )
    return found


def _drive_ghz(
    target: str, method: str, payload: bytes, seconds: float, concurrency: int, key: str
) -> tuple[int, float, float]:
    """The same calls from ghz; returns (successful calls, p50 and p99 latency in s)."""
    with tempfile.TemporaryDirectory(prefix="bilten-ghz-") as tmp:
        request = Path(tmp) / "request.bin"
        request.write_bytes(payload)
        run = subprocess.run(
            [
                _find_ghz(),
                "--insecure",
                f"--protoset={DESCRIPTOR_SET}",
                f"--call={method.strip('/').replace('/', '.')}",
                f"--binary-file={request}",
                f"--metadata={json.dumps({'authorization': f'Bearer {key}'})}",
                f"--concurrency={concurrency}",
                f"--duration={seconds}s",
                "--duration-stop=wait",
                "--connections=1",
                "--cpus=1",
                "--format=json",
                target,
            ],
            capture_output=True,
            text=True,
        )
    if run.returncode != 0:
        raise RuntimeError(f"ghz failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    report = json.loads(run.stdout)
    ok = int(report.get("statusCodeDistribution", {}).get("OK", 0))
    if ok != int(report["count"]):
        raise RuntimeError(f"ghz saw failed calls: {report.get('statusCodeDistribution')}")
    by_percent = {int(d["percentage"]): d["latency"] / 1e9 for d in report["latencyDistribution"]}
    return ok, by_percent[50], by_percent[99]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bilten-analytics bench ingest")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--client",
        choices=("python", "ghz"),
        default="python",
        help="the load generator: grpc.aio in this process, or the Go tool ghz",
    )
    parser.add_argument(
        "--phase",
        choices=("both", "batch", "single"),
        default="both",
        help="run one phase alone (to profile the server during it)",
    )
    args = parser.parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="bilten-bench-"))
    port = _free_port()
    env = {
        **os.environ,
        "BILTEN_DATA_DIR": str(data_dir),
        "BILTEN_GRPC_PORT": str(port),
        "BILTEN_METRICS_PORT": "0",
        "BILTEN_RATE_LIMIT_EVENTS_PER_SECOND": "10000000",
        "BILTEN_RATE_LIMIT_BURST_EVENTS": "10000000",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "ingestion"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with grpc.insecure_channel(target) as channel:
                    health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                if (data_dir / "credentials.json").exists():
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("ingestion server did not start")
            time.sleep(0.2)
        key = json.loads((data_dir / "credentials.json").read_text())["write_key"]
        result: dict[str, object] = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "server_pid": server.pid,
            "client": args.client,
        }
        # The server's CPU time per event / per call: the wall-clock rates move with the
        # machine's load (and the client shares its 2 cores); the CPU cost much less.
        server_process = psutil.Process(server.pid)

        def server_cpu() -> float:
            times = server_process.cpu_times()
            return float(times.user + times.system)

        def drive(
            target: str, method: str, payload: bytes, seconds: float, concurrency: int, key: str
        ) -> tuple[int, float, float]:
            if args.client == "ghz":
                return _drive_ghz(target, method, payload, seconds, concurrency, key)
            calls, latencies = asyncio.run(
                _drive(target, method, payload, seconds, concurrency, key)
            )
            return calls, _pct(latencies, 0.5), _pct(latencies, 0.99)

        if args.phase in ("both", "batch"):
            batch = pb.IngestEventsRequest(events=[_event(i) for i in range(args.batch)])
            cpu_before = server_cpu()
            calls, p50, p99 = drive(
                target, INGEST, batch.SerializeToString(), args.seconds, args.concurrency, key
            )
            batch_cpu = server_cpu() - cpu_before
            result |= {
                "batch_size": args.batch,
                "batch_events_per_second": round(calls * args.batch / args.seconds),
                "batch_server_cpu_us_per_event": round(
                    batch_cpu * 1e6 / max(calls * args.batch, 1), 1
                ),
                "batch_p50_ms": round(p50 * 1000, 1),
                "batch_p99_ms": round(p99 * 1000, 1),
            }
        if args.phase in ("both", "single"):
            single = pb.TrackRequest(event=_event(1)).SerializeToString()
            cpu_before = server_cpu()
            single_calls, single_p50, single_p99 = drive(
                target, TRACK, single, args.seconds, args.concurrency * 4, key
            )
            single_cpu = server_cpu() - cpu_before
            result |= {
                "single_rpc_per_second": round(single_calls / args.seconds),
                "single_server_cpu_ms_per_rpc": round(single_cpu * 1e3 / max(single_calls, 1), 3),
                "single_p50_ms": round(single_p50 * 1000, 1),
                "single_p99_ms": round(single_p99 * 1000, 1),
            }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
