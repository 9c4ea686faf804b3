"""A real Apache Pinot cluster for the `pinot` tests, started once per session.

Opt in with BILTEN_TEST_PINOT=1 (without it the tests skip): the fixture starts a PRIVATE
Kafka broker (dev/kafka.sh) and a PRIVATE Pinot (dev/pinot.sh: ZooKeeper + controller +
broker + server, Apache Pinot 0.11.0 from Maven Central with the two documented shims of
docs/pinot-on-this-machine.md), each on free ports with its own data dir, plus our schema
registry on a free port; all are stopped and deleted afterwards. First run fetches the
Pinot jars (~2.5 min); later starts take 20-40 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from schema_registry.app import create_app
from schema_registry.auth import StaticTokenAuthenticator
from schema_registry.settings import RegistrySettings
from tests.conftest import free_port
from tests.schema_registry.live_server import serve

REPO = Path(__file__).resolve().parents[2]
LABEL = (
    "Apache Pinot 0.11.0 with the documented shims (dev/pinot/shim: kafka30 factory alias, "
    "minimal io.confluent registry client)"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"pinot: needs a real {LABEL}; BILTEN_TEST_PINOT=1")


REGISTRY_TOKEN = "pinot-test-registry-token"


@dataclass(frozen=True)
class PinotCluster:
    kafka_bootstrap: str
    controller_url: str
    broker_url: str
    registry_url: str
    registry_token: str = REGISTRY_TOKEN


def _run(script: str, command: str, env: dict[str, str], timeout: float) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "dev" / script), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0 and command == "start":
        raise RuntimeError(f"dev/{script} start failed:\n{done.stderr[-4000:]}")


@pytest.fixture(scope="session")
def pinot_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PinotCluster]:
    if os.environ.get("BILTEN_TEST_PINOT") != "1":
        pytest.skip(f"set BILTEN_TEST_PINOT=1 to run the tests against a real {LABEL}")
    root = Path(tempfile.mkdtemp(prefix="bilten-pinot-test-"))
    kafka_port = free_port()
    kafka_env = {
        **os.environ,
        "BILTEN_KAFKA_PORT": str(kafka_port),
        "BILTEN_KAFKA_CONTROLLER_PORT": str(free_port()),
        "BILTEN_KAFKA_DIR": str(root / "kafka"),
        "BILTEN_KAFKA_HEAP": "512m",
    }
    controller, broker = free_port(), free_port()
    pinot_env = {
        **os.environ,
        "BILTEN_PINOT_DIR": str(root / "pinot"),
        "BILTEN_PINOT_ZK_PORT": str(free_port()),
        "BILTEN_PINOT_CONTROLLER_PORT": str(controller),
        "BILTEN_PINOT_BROKER_PORT": str(broker),
        "BILTEN_PINOT_SERVER_PORT": str(free_port()),
        "BILTEN_PINOT_SERVER_ADMIN_PORT": str(free_port()),
        "BILTEN_PINOT_SERVER_GRPC_PORT": str(free_port()),
        "BILTEN_PINOT_HEAP": "1g",
    }
    # Auth on: Pinot's decoder reads schemas with the token the generated table carries.
    app = create_app(
        RegistrySettings(storage=f"sqlite:///{root / 'registry.db'}"),
        StaticTokenAuthenticator({REGISTRY_TOKEN: ["admin"]}),
    )
    try:
        _run("kafka.sh", "start", kafka_env, 300)
        _run("pinot.sh", "start", pinot_env, 600)
        with serve(app) as registry_url:
            yield PinotCluster(
                f"127.0.0.1:{kafka_port}",
                f"http://127.0.0.1:{controller}",
                f"http://127.0.0.1:{broker}",
                registry_url,
            )
    finally:
        _run("pinot.sh", "stop", pinot_env, 180)
        _run("kafka.sh", "stop", kafka_env, 120)
        app.close()
        shutil.rmtree(root, ignore_errors=True)
