"""End-to-end tier: the real `bilten-analytics up` (real Envoy) as a child process.

Set BILTEN_E2E_REST_URL / BILTEN_E2E_GRPC_TARGET / BILTEN_E2E_CREDENTIALS to point the
tier at an external deployment instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningSystem:
    rest_url: str
    grpc_target: str
    credentials: dict[str, str]
    data_dir: Path
    process: subprocess.Popen[bytes] | None
    log_path: Path | None
    metrics_url: str = ""
    registry_url: str = ""


def start_system(data_dir: Path, *, extra_env: dict[str, str] | None = None) -> RunningSystem:
    grpc_port, http_port, admin_port, metrics_port, registry_port = (free_port() for _ in range(5))
    env = {
        **os.environ,
        "BILTEN_GRPC_PORT": str(grpc_port),
        "BILTEN_HTTP_PORT": str(http_port),
        "BILTEN_ENVOY_ADMIN_PORT": str(admin_port),
        "BILTEN_METRICS_PORT": str(metrics_port),
        "BILTEN_SCHEMA_REGISTRY_PORT": str(registry_port),
        # New definition versions must show up quickly in the definition tests.
        "BILTEN_DEFINITION_CACHE_SECONDS": "1",
        "BILTEN_DATA_DIR": str(data_dir),
        **(extra_env or {}),
    }
    log_path = data_dir.parent / f"{data_dir.name}-up.log"
    log = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rest_url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 150
    credentials_path = data_dir / "credentials.json"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"`up` exited early:\n{log_path.read_text()[-3000:]}")
        if credentials_path.exists():
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1).text.strip()
                    == "LIVE"
                ):
                    break
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"`up` not ready in 150 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    credentials = json.loads(credentials_path.read_text())
    return RunningSystem(
        rest_url,
        f"127.0.0.1:{grpc_port}",
        credentials,
        data_dir,
        process,
        log_path,
        f"http://127.0.0.1:{metrics_port}/metrics",
        f"http://127.0.0.1:{registry_port}",
    )


def stop_system(system: RunningSystem) -> int | None:
    if system.process is None:
        return None
    system.process.send_signal(signal.SIGINT)
    try:
        return system.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        system.process.kill()
        raise


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    if os.environ.get("BILTEN_E2E_REST_URL"):
        yield RunningSystem(
            os.environ["BILTEN_E2E_REST_URL"],
            os.environ["BILTEN_E2E_GRPC_TARGET"],
            json.loads(Path(os.environ["BILTEN_E2E_CREDENTIALS"]).read_text()),
            Path("."),
            None,
            None,
        )
        return
    running = start_system(tmp_path_factory.mktemp("e2e") / "data")
    yield running
    stop_system(running)
