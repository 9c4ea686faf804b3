"""`bilten-analytics`: run the mesh, one service, the gateway, or a benchmark."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

if TYPE_CHECKING:
    from services.platform.settings import PlatformSettings

log = structlog.get_logger("bilten.cli")


def _settings(args: argparse.Namespace) -> object:
    from services.platform.settings import PlatformSettings

    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    if getattr(args, "grpc_port", None) is not None:
        overrides["grpc_port"] = args.grpc_port
    if getattr(args, "http_port", None) is not None:
        overrides["http_port"] = args.http_port
    if getattr(args, "event_log", None):
        overrides["event_log"] = args.event_log
    try:
        return PlatformSettings(**overrides)
    except ValidationError as exc:
        print(f"bilten-analytics: refusing to start, bad settings:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def one_process_defaults(settings: PlatformSettings) -> PlatformSettings:
    """`up` with the Kafka event log seals personal fields per subject unless told
    otherwise: every part (ingestion, processor, compliance) runs in this one process and
    shares the data dir's key store, so nothing can go wrong, and the topic never holds
    them in clear (docs/compliance.md). `serve` keeps the setting's own default, since
    separate processes must be given one shared key store first."""
    if settings.event_log == "kafka" and "crypto_shredding" not in settings.model_fields_set:
        return settings.model_copy(update={"crypto_shredding": True})
    return settings


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _freeze_startup_heap() -> None:
    """Once the server is up: moves the objects that live as long as the process (modules,
    protobuf descriptors, the mesh's caches and tables) out of the garbage collector's
    reach, so its full collections stop rescanning them (~12 % of a serving process's CPU
    under ingestion load before, docs/benchmarks.md). Garbage is collected first so
    none of it is kept. Objects created later are collected as before.

    The young generation's threshold goes from 700 to 20,000 net container allocations:
    a 500-event batch allocates thousands, so at 700 the collector ran ~120 times a
    second under load and promoted each in-flight batch to the older generations, whose
    collections then rescanned it (GC time over a bench run: ~1.0 s → ~0.35 s). Cyclic
    garbage waits at most 20,000 allocations (a few MB) longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


async def _up(args: argparse.Namespace) -> int:
    from services.mesh import SERVICE_NAMES, Mesh
    from services.platform import gateway
    from services.platform.settings import PlatformSettings
    from services.platform.telemetry import configure_telemetry
    from services.streaming.avro_envelope import register_envelope_schema
    from services.websocket_bridge.server import WebSocketBridge

    settings = _settings(args)
    assert isinstance(settings, PlatformSettings)
    settings = one_process_defaults(settings)
    configure_telemetry("bilten-analytics", settings.metrics_port, settings.metrics_host)
    mesh = Mesh.open(settings)
    registry = mesh.registry()
    # WebSockets of the live streams, behind Envoy's /ws/ routes (docs/live.md).
    bridge: WebSocketBridge | None = None
    try:
        await registry.start()
        # The tracked-event envelope lives in the registry from the first start, under
        # the event topic's value subject (TopicNameStrategy), whichever event log runs.
        await asyncio.to_thread(
            register_envelope_schema,
            settings.registry_url,
            mesh.platform_token(),
            settings.kafka_events_topic,
        )
        port = await mesh.start(SERVICE_NAMES)
        bridge = WebSocketBridge(f"{settings.grpc_host}:{port}")
        websocket_port = await bridge.start("127.0.0.1", settings.websocket_bridge_port)
        credentials = mesh.ensure_dev_credentials()
        data_dir = Path(settings.data_dir)
        config_path = data_dir / "envoy.yaml"
        config_path.write_text(
            gateway.render_envoy_config(
                http_host="127.0.0.1",
                http_port=settings.http_port,
                admin_port=settings.envoy_admin_port,
                grpc_host=settings.grpc_host,
                grpc_port=port,
                websocket_bridge_port=websocket_port,
            )
        )
    except BaseException:
        if bridge is not None:
            await bridge.stop()
        await mesh.stop()
        await registry.stop()
        raise
    _freeze_startup_heap()
    envoy = await gateway.start_envoy(config_path, data_dir / "envoy.log", settings.envoy_binary)
    stop = _stop_event()
    try:
        await gateway.wait_until_ready(settings.envoy_admin_port)
        print(
            f"\nBilten Analytics is up (event log: {settings.event_log}; DuckDB + SQLite)\n"
            f"  gRPC      {settings.grpc_host}:{port}   (health, reflection on)\n"
            f"  REST      http://127.0.0.1:{settings.http_port}   (Envoy; SSE for streams)\n"
            f"  WebSocket ws://127.0.0.1:{settings.http_port}/ws/analytics/live   (Envoy)\n"
            f"  registry  http://127.0.0.1:{settings.schema_registry_port}   (Confluent API)\n"
            f"  metrics   http://127.0.0.1:{settings.metrics_port}/metrics\n"
            f"  data      {data_dir.resolve()}\n"
            f"  tenant    {credentials['tenant_id']}\n"
            f"  write key {credentials['write_key']}\n"
            f"  admin token {credentials['admin_token']}\n"
            f"  all of them in {data_dir / 'credentials.json'}\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        waiter = asyncio.ensure_future(stop.wait())
        envoy_exit = asyncio.ensure_future(envoy.wait())
        done, _ = await asyncio.wait({waiter, envoy_exit}, return_when=asyncio.FIRST_COMPLETED)
        if envoy_exit in done:
            print("Envoy exited; see envoy.log in the data dir", file=sys.stderr)
            return 1
        return 0
    finally:
        if envoy.returncode is None:
            envoy.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(envoy.wait(), 10)
            if envoy.returncode is None:
                envoy.kill()
        await bridge.stop()
        await mesh.stop()
        await registry.stop()


async def _serve(args: argparse.Namespace) -> int:
    from services.mesh import Mesh
    from services.platform.settings import PlatformSettings
    from services.platform.telemetry import configure_telemetry

    settings = _settings(args)
    if args.service == "schema-registry":
        # Cluster shape: the registry alone, storage from BILTEN_SCHEMA_REGISTRY_STORAGE
        # (PostgreSQL), the platform's credentials for auth.
        from schema_registry.server import EmbeddedRegistry
        from schema_registry.settings import RegistrySettings
        from services.platform.auth import Authenticator, TokenIssuer
        from services.platform.schema_registry_auth import PlatformRegistryAuthenticator
        from services.platform.secrets_file import load_secrets
        from services.storage.metadata_store import open_metadata_store

        assert isinstance(settings, PlatformSettings)
        secrets = load_secrets(settings)
        # API keys are checked against the platform's metadata (shared when on PostgreSQL).
        metadata = open_metadata_store(settings.metadata_store_url, Path(settings.data_dir))
        tokens = TokenIssuer(secrets.jwt_secret, settings.jwt_issuer, settings.jwt_audience)
        registry = EmbeddedRegistry(
            RegistrySettings(),
            PlatformRegistryAuthenticator(Authenticator(tokens, metadata, secrets.api_key_pepper)),
        )
        await registry.start()
        print("schema-registry serving", flush=True)
        try:
            await _stop_event().wait()
        finally:
            await registry.stop()
            metadata.close()
        return 0
    assert isinstance(settings, PlatformSettings)
    configure_telemetry(
        f"bilten-analytics-{args.service}", settings.metrics_port, settings.metrics_host
    )
    mesh = Mesh.open(settings)
    port = await mesh.start((args.service,))
    if settings.create_dev_credentials:
        mesh.ensure_dev_credentials()
    _freeze_startup_heap()
    print(f"{args.service} serving gRPC on {settings.grpc_host}:{port}", flush=True)
    stop = _stop_event()
    try:
        await stop.wait()
    finally:
        await mesh.stop()
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what == "ingest":
        from services.bench.ingest_bench import main as ingest_main

        return ingest_main(args.rest)
    if args.what == "analytics":
        from services.query.analytics_bench import main as analytics_main

        return analytics_main(args.rest)
    from services.bench.query_bench import main as query_main

    # The query bench parses its own arguments from sys.argv.
    sys.argv = ["bilten-analytics bench query", *args.rest]
    query_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ]
    )
    parser = argparse.ArgumentParser(prog="bilten-analytics", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="all five services + Envoy on the embedded stores")
    serve = sub.add_parser("serve", help="one service (the cluster shape)")
    serve.add_argument(
        "service",
        choices=[
            "ingestion",
            "query",
            "aggregation",
            "compliance",
            "prediction",
            "schema-registry",
            # The stream processor alone: Kafka topic -> event store (docs/streaming.md).
            "processor",
        ],
    )
    for p in (up, serve):
        p.add_argument("--data-dir", default=os.environ.get("BILTEN_DATA_DIR"))
        p.add_argument("--grpc-port", type=int)
        p.add_argument("--event-log", choices=["embedded", "kafka"])
    up.add_argument("--http-port", type=int)
    pinot = sub.add_parser(
        "pinot", help="generate / apply the Pinot schema and REALTIME table (docs/streaming.md)"
    )
    pinot.add_argument("action", choices=["show", "apply"])
    pinot.add_argument("rest", nargs=argparse.REMAINDER)
    bench = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    bench.add_argument("what", choices=["ingest", "query", "analytics"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    audit = sub.add_parser("audit", help="check the audit log's hash chains")
    audit.add_argument("action", choices=["verify"])
    retention = sub.add_parser("retention", help="enforce retention (dry run unless --apply)")
    retention.add_argument("action", choices=["enforce"])
    retention.add_argument("--apply", action="store_true", help="delete, not only count")
    for p in (audit, retention):
        p.add_argument("--data-dir", default=os.environ.get("BILTEN_DATA_DIR", ".bilten"))
        # The services' shared metadata, from the environment only: the URL carries a
        # password, which does not belong on a command line.
        p.set_defaults(metadata_store_url=os.environ.get("BILTEN_METADATA_STORE_URL", ""))
    args = parser.parse_args(argv)
    if args.command in ("audit", "retention"):
        from services.compliance import commands

        if args.command == "audit":
            return commands.audit_verify(Path(args.data_dir), args.metadata_store_url)
        return commands.retention_enforce(Path(args.data_dir), args.apply, args.metadata_store_url)
    if args.command == "bench":
        return _bench(args)
    if args.command == "pinot":
        from services.pinot.apply import main as pinot_main

        return pinot_main([args.action, *args.rest])
    if args.command == "serve" and args.service == "processor" and not args.event_log:
        args.event_log = "kafka"  # the processor only exists in the Kafka shape
    runner = _up if args.command == "up" else _serve
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
