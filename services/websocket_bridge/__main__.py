"""`python -m services.websocket_bridge --grpc-target HOST:PORT [--host H] [--port P]`:
the bridge alone (cluster shape: next to Envoy, pointed at the aggregation service)."""

from __future__ import annotations

import argparse
import asyncio
import signal

from services.websocket_bridge.server import WebSocketBridge


async def _main(target: str, host: str, port: int) -> None:
    bridge = WebSocketBridge(target)
    bound = await bridge.start(host, port)
    print(f"websocket bridge on {host}:{bound} -> gRPC {target}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await bridge.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.websocket_bridge")
    parser.add_argument("--grpc-target", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    asyncio.run(_main(args.grpc_target, args.host, args.port))


if __name__ == "__main__":
    main()
