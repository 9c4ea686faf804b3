"""Benchmark of the hot path ``GET /schemas/ids/{id}``.

    python -m schema_registry.bench --requests 50000 --concurrency 64 --workers 2
    python -m schema_registry.bench --tool wrk --duration 10 --concurrency 64 --workers 2

Starts the registry as a subprocess (``python -m schema_registry.server``) on a free port with
a throwaway SQLite file (or ``--storage``; a PostgreSQL DSN gets a throwaway schema in that
database, dropped afterwards, so nothing lands in ``public``), registers a schema, then drives
``GET /schemas/ids/{id}`` with authenticated keep-alive requests, either from a minimal
asyncio HTTP/1.1 client in this process (``--tool python``: exact request count, but it shares
the CPU with the server) or with ``wrk`` (``--tool wrk``: time-based, far cheaper per request).
Every response is checked for status 200 by the Python client; wrk reports non-2xx counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

_TOKEN = "bench-token-0123456789"  # noqa: S105 - a throwaway token of the bench server
_SCHEMA = orjson.dumps(
    {
        "type": "record",
        "name": "PageView",
        "namespace": "bilten.bench",
        "fields": [
            {"name": "user_id", "type": "string"},
            {"name": "url", "type": "string"},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "referrer", "type": ["null", "string"], "default": None},
        ],
    }
).decode()


@dataclass
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_server(port: int, storage: str, workers: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BILTEN_SCHEMA_REGISTRY_HOST": "127.0.0.1",
        "BILTEN_SCHEMA_REGISTRY_PORT": str(port),
        "BILTEN_SCHEMA_REGISTRY_STORAGE": storage,
        "BILTEN_SCHEMA_REGISTRY_WORKERS": str(workers),
        "BILTEN_SCHEMA_REGISTRY_AUTH_TOKENS": orjson.dumps({_TOKEN: ["admin"]}).decode(),
        "BILTEN_SCHEMA_REGISTRY_LOG_LEVEL": "warning",
    }
    return subprocess.Popen([sys.executable, "-m", "schema_registry.server"], env=env)


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"registry exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("registry did not become ready")


async def _connection_loop(
    port: int, request: bytes, count: int, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"(?i)content-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else 0
            if length:
                await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            if not head.startswith(b"HTTP/1.1 200"):
                errors[0] += 1
    finally:
        writer.close()


async def _drive_python(port: int, path: str, total: int, concurrency: int) -> Result:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {_TOKEN}\r\n"
        "Accept: application/vnd.schemaregistry.v1+json\r\n\r\n"
    ).encode()
    per_connection = [total // concurrency] * concurrency
    for i in range(total % concurrency):
        per_connection[i] += 1
    latencies: list[float] = []
    errors = [0]
    started = time.perf_counter()
    await asyncio.gather(
        *(_connection_loop(port, request, n, latencies, errors) for n in per_connection if n)
    )
    return Result(total, errors[0], time.perf_counter() - started, latencies)


def _drive_wrk(port: int, path: str, duration: int, concurrency: int, threads: int) -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk, or use --tool python")
    out = subprocess.run(
        [
            wrk,
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{duration}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {_TOKEN}",
            f"http://127.0.0.1:{port}{path}",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


@contextmanager
def _storage(url: str | None, tmp: str) -> Iterator[str]:
    """The storage URL for the bench server; PostgreSQL gets a schema of its own."""
    if url is None:
        yield f"sqlite:///{Path(tmp) / 'registry.db'}"
    elif url.startswith(("postgresql://", "postgres://")):
        from schema_registry.storage.postgres import throwaway_schema

        with throwaway_schema(url, "sr_bench") as scoped:
            yield scoped
    else:
        yield url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=50_000, help="python tool: total")
    parser.add_argument("--concurrency", type=int, default=64, help="open connections")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--storage", default=None, help="default: a throwaway SQLite file")
    parser.add_argument("--tool", choices=["python", "wrk"], default="python")
    parser.add_argument("--duration", type=int, default=10, help="wrk: seconds")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2_000, help="requests before measuring")
    args = parser.parse_args(argv)

    with (
        tempfile.TemporaryDirectory(prefix="bilten-sr-bench-") as tmp,
        _storage(args.storage, tmp) as storage,
    ):
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = _start_server(port, storage, args.workers)
        try:
            _wait_ready(base, proc)
            headers = {"Authorization": f"Bearer {_TOKEN}"}
            registered = httpx.post(
                f"{base}/subjects/bench-value/versions",
                json={"schema": _SCHEMA},
                headers=headers,
                timeout=10,
            )
            registered.raise_for_status()
            path = f"/schemas/ids/{registered.json()['id']}"
            # Warm every worker's cache (connections land on workers at random).
            if args.warmup:
                asyncio.run(_drive_python(port, path, args.warmup, min(32, args.warmup)))
            machine = (
                f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
            )
            print(f"machine: {machine}")
            print(f"server: {args.workers} uvicorn worker(s), storage {storage.split(':')[0]}")
            if args.tool == "wrk":
                print(_drive_wrk(port, path, args.duration, args.concurrency, args.wrk_threads))
                return
            result = asyncio.run(_drive_python(port, path, args.requests, args.concurrency))
            print(
                f"GET {path}: {result.requests} requests, concurrency {args.concurrency}, "
                f"{result.seconds:.2f} s, {result.rps:,.0f} req/s, errors {result.errors}, "
                f"p50 {result.percentile(50):.2f} ms, p99 {result.percentile(99):.2f} ms"
            )
            if result.errors:
                raise SystemExit(1)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
