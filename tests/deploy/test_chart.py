"""The chart: helm lint --strict, helm template of every ci/ shape, Kubernetes schema
validation of every rendered object, and the conventions the chart promises (STYLE.md item 14).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.mesh import PROCESSOR_HOSTS
from tests.deploy import tools

pytestmark = pytest.mark.deploy

SHAPES = [p.name.removesuffix("-values.yaml") for p in tools.CI_VALUES]
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
GRPC_COMPONENTS = ("ingestion", "query", "aggregation", "compliance", "prediction")
SCHEMAS = Path(__file__).parent / "schemas"


def test_ci_shapes_exist() -> None:
    assert {"minimal", "production"} <= set(SHAPES)


def test_staged_chart_differs_only_in_dependencies(staged_chart: Path) -> None:
    """What lint and template see is the chart itself, minus `dependencies:` (see
    tools.staged_chart: the dependency charts cannot be fetched here)."""
    original = yaml.safe_load((tools.CHART / "Chart.yaml").read_text())
    staged = yaml.safe_load((staged_chart / "Chart.yaml").read_text())
    assert {k: v for k, v in original.items() if k != "dependencies"} == staged
    for path in tools.CHART.rglob("*"):
        if path.is_file() and path.name != "Chart.yaml":
            copy = staged_chart / path.relative_to(tools.CHART)
            assert copy.read_bytes() == path.read_bytes(), path


def test_unstaged_chart_fails_only_for_the_missing_dependency_charts(helm: Path) -> None:
    """Documents why the chart is staged: helm refuses declared-but-absent dependencies even
    when disabled. Any other error here would be a real one."""
    done = tools.subprocess_run([helm, "template", "x", tools.CHART])
    assert done.returncode != 0
    assert "missing in charts/ directory: kafka, postgresql, redis, pinot" in done.stderr


def test_dependencies_are_optional_and_pinned() -> None:
    chart = yaml.safe_load((tools.CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((tools.CHART / "values.yaml").read_text())
    names = {d["name"] for d in chart["dependencies"]}
    assert names == {"kafka", "postgresql", "redis", "pinot"}
    for dep in chart["dependencies"]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", dep["version"]), dep
        assert dep["condition"] == f"{dep['name']}.enabled"
        assert values[dep["name"]]["enabled"] is False, "off by default"
        external = "external" + dep["name"][0].upper() + dep["name"][1:]
        assert external in values, f"{dep['name']}: no external endpoint values"
    for shape in SHAPES:
        ci = tools.ci_values(shape)
        assert all(ci.get(n, {}).get("enabled") is False for n in names), (
            f"ci/{shape}: dependencies must be off to render without the vendored charts"
        )


@pytest.mark.parametrize("shape", SHAPES)
def test_helm_lint_strict(helm: Path, staged_chart: Path, shape: str) -> None:
    out = tools.run(
        [
            helm,
            "lint",
            "--strict",
            staged_chart,
            "--values",
            tools.CHART / "ci" / f"{shape}-values.yaml",
        ]
    ).stdout
    assert "0 chart(s) failed" in out, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_helm_lint_strict_default_values(helm: Path, staged_chart: Path) -> None:
    out = tools.run([helm, "lint", "--strict", staged_chart]).stdout
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_rendered_objects_match_kubernetes_schemas(
    rendered: dict[str, tools.Rendered], shape: str, kube_version: str
) -> None:
    """Every object against the Kubernetes OpenAPI schemas (strict: no unknown fields); the
    ServiceMonitor against the Prometheus Operator's CRD schema."""
    for obj in rendered[shape].objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            validate_service_monitor(obj)
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{shape} {obj['kind']}/{obj['metadata']['name']} on {kube_version}: {exc}"
            ) from exc


def validate_service_monitor(obj: dict[str, Any]) -> None:
    schema = json.loads((SCHEMAS / "servicemonitor-v1.json").read_text())
    jsonschema.validate(obj, schema)


def test_values_are_documented_camel_case_and_in_the_schema() -> None:
    """Every key of values.yaml: camelCase, a `# --` comment, and a typed entry in
    values.schema.json (whose other objects forbid unknown keys)."""
    text = (tools.CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((tools.CHART / "values.schema.json").read_text())
    documented = _documented_paths(text)
    free_form = {
        "resources",
        "podSecurityContext",
        "containerSecurityContext",
        "affinity",
        "nodeSelector",
        "podAnnotations",
        "podLabels",
        "annotations",
        "labels",
        "resourceAttributes",
        "clientConfig",
        "metricsClients",
    }

    def walk(node: Any, path: str, node_schema: dict[str, Any]) -> None:
        key = path.rsplit(".", 1)[-1]
        assert re.fullmatch(r"[a-z][a-zA-Z0-9]*", key), f"{path}: not camelCase"
        grouping = isinstance(node, dict) and node and key not in free_form
        if not grouping:  # helm-docs convention: a group is documented by its keys
            assert path in documented, f"{path}: no `# --` comment in values.yaml"
            assert node_schema.get("description"), f"{path}: no description in the schema"
        if grouping:
            for child, value in node.items():
                assert child in node_schema.get("properties", {}), f"{path}.{child}: not in schema"
                walk(value, f"{path}.{child}", node_schema["properties"][child])

    for key, value in values.items():
        walk(value, key, schema["properties"][key])
    assert schema["additionalProperties"] is False


def _documented_paths(text: str) -> set[str]:
    documented: set[str] = set()
    stack: list[tuple[int, str]] = []
    pending = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = True
            continue
        if stripped.startswith("#"):
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_.\-]+):", line)
        if not match or not stripped:
            pending = pending and stripped != ""
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if pending:
            documented.add(".".join(k for _, k in stack))
        pending = False
    return documented


def test_schema_refuses_unknown_and_bad_values(helm: Path, staged_chart: Path) -> None:
    for bad in ("services.ingestion.replicas=3", "platform.eventLog=kinesis", "grpc.port=0"):
        done = tools.subprocess_run([helm, "template", "x", staged_chart, "--set", bad])
        assert done.returncode != 0, bad
        assert (
            "values don't meet the specifications of the schema" in done.stderr
            or "at '/" in done.stderr
        ), done.stderr


@pytest.mark.parametrize("shape", SHAPES)
def test_workload_conventions(rendered: dict[str, tools.Rendered], shape: str) -> None:
    """Standard labels with one component each, pinned images, non-root, read-only root
    filesystem, resources, probes on long-running containers, no API token mounted."""
    components: set[str] = set()
    for obj in tools.workloads(rendered[shape].objects):
        name = f"{shape} {obj['kind']}/{obj['metadata']['name']}"
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by", "component", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels, f"{name}: label {key}"
        component = labels["app.kubernetes.io/component"]
        assert component not in components, f"{name}: component {component} twice"
        components.add(component)
        pod = obj["spec"]["template"]
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == component
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        for container in spec["containers"]:
            image = container["image"]
            assert re.search(r"(:[\w][\w.\-]{0,127}|@sha256:[a-f0-9]{64})$", image), image
            assert not image.endswith(":latest"), image
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"] and container["resources"]["limits"], name
            if obj["kind"] == "Deployment":
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in container, f"{name}: {probe}"
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: no writable /tmp"
        if obj["kind"] == "Deployment":
            selector = obj["spec"]["selector"]["matchLabels"]
            assert all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("shape", SHAPES)
def test_grpc_services_use_native_grpc_probes(
    rendered: dict[str, tools.Rendered], shape: str
) -> None:
    services = tools.grpc_service_names()
    for component in GRPC_COMPONENTS:
        deployment = rendered[shape].get("Deployment", f"{tools.RELEASE}-{component}")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        port = next(p for p in container["ports"] if p["name"] == "grpc")["containerPort"]
        assert container["readinessProbe"]["grpc"] == {"port": port, "service": services[component]}
        assert container["livenessProbe"]["grpc"] == {"port": port}
        assert container["startupProbe"]["grpc"] == {"port": port}


@pytest.mark.parametrize("shape", SHAPES)
def test_services_select_their_pods_and_ports(
    rendered: dict[str, tools.Rendered], shape: str
) -> None:
    objects = rendered[shape]
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in objects.of_kind("Deployment")}
    for service in objects.of_kind("Service"):
        selector = service["spec"]["selector"]
        matched = [
            t
            for t in pods.values()
            if all(t["metadata"]["labels"].get(k) == v for k, v in selector.items())
        ]
        assert len(matched) == 1, f"{service['metadata']['name']} selects {len(matched)} pod kinds"
        names = {p["name"] for c in matched[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"{service['metadata']['name']}: {port}"


@pytest.mark.parametrize("shape", SHAPES)
def test_autoscalers_and_budgets_target_rendered_deployments(
    rendered: dict[str, tools.Rendered], shape: str
) -> None:
    objects = rendered[shape]
    deployments = {d["metadata"]["name"]: d for d in objects.of_kind("Deployment")}
    for hpa in objects.of_kind("HorizontalPodAutoscaler"):
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "the HPA owns replicas"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for pdb in objects.of_kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(
            all(
                d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()
            )
            for d in deployments.values()
        ), pdb["metadata"]["name"]
    if shape == "production":
        assert {
            h["spec"]["scaleTargetRef"]["name"] for h in objects.of_kind("HorizontalPodAutoscaler")
        } == set(deployments)
        assert len(objects.of_kind("PodDisruptionBudget")) == len(deployments)


@pytest.mark.parametrize("shape", SHAPES)
def test_network_policies_admit_only_gateway_and_mesh(
    rendered: dict[str, tools.Rendered], shape: str
) -> None:
    """Every gRPC service pod is selected by a policy whose gRPC rule admits the release's
    pods (gateway included) and the configured extra clients, nothing else."""
    objects = rendered[shape]
    values = tools.ci_values(shape)
    extra = values.get("networkPolicy", {}).get("extraGrpcClients", [])
    policies = objects.of_kind("NetworkPolicy")
    gateway_labels = objects.get("Deployment", f"{tools.RELEASE}-gateway")["spec"]["template"][
        "metadata"
    ]["labels"]
    for component in GRPC_COMPONENTS:
        labels = objects.get("Deployment", f"{tools.RELEASE}-{component}")["spec"]["template"][
            "metadata"
        ]["labels"]
        selecting = [
            p
            for p in policies
            if all(labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())
        ]
        assert len(selecting) == 1, component
        policy = selecting[0]["spec"]
        assert policy["policyTypes"] == ["Ingress"]
        grpc_rules = [
            r for r in policy["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]
        ]
        assert len(grpc_rules) == 1
        peers = grpc_rules[0]["from"]
        mesh = peers[0]["podSelector"]["matchLabels"]
        assert all(gateway_labels.get(k) == v for k, v in mesh.items()), "gateway admitted"
        assert peers[1:] == extra


def test_descriptor_configmap_is_the_generated_descriptor_set(
    rendered: dict[str, tools.Rendered],
) -> None:
    generated = (tools.REPO / "gen" / "descriptors" / "bilten_analytics.binpb").read_bytes()
    for shape, objects in rendered.items():
        cm = objects.get("ConfigMap", f"{tools.RELEASE}-descriptors")
        assert base64.b64decode(cm["binaryData"]["bilten_analytics.binpb"]) == generated, shape


@pytest.mark.parametrize("shape", SHAPES)
def test_secret_references_resolve(rendered: dict[str, tools.Rendered], shape: str) -> None:
    """Every secretKeyRef names the chart's Secret (or the existing one) and a documented key;
    a chart-managed Secret holds every required key."""
    objects = rendered[shape]
    values = tools.ci_values(shape)
    existing = values.get("secrets", {}).get("existingSecret", "")
    managed = {s["metadata"]["name"]: s for s in objects.of_kind("Secret")}
    referenced: set[str] = set()
    for workload in tools.workloads(objects.objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if not ref:
                    continue
                referenced.add(ref["key"])
                if existing:
                    assert ref["name"] == existing
                else:
                    secret = managed[ref["name"]]
                    assert ref["key"] in secret["data"] or ref.get("optional"), ref
    known = set(tools.EXISTING_SECRET_KEYS) | set(tools.OPTIONAL_SECRET_KEYS)
    assert referenced <= known, referenced - known
    if not existing:
        (secret,) = managed.values()
        assert set(tools.EXISTING_SECRET_KEYS) <= set(secret["data"])


def test_existing_secret_keys_are_documented() -> None:
    doc = (tools.REPO / "docs" / "deploy.md").read_text()
    for key in (*tools.EXISTING_SECRET_KEYS, *tools.OPTIONAL_SECRET_KEYS):
        assert f"`{key}`" in doc, key


def test_secret_is_kept_across_upgrades(helm: Path, staged_chart: Path) -> None:
    """Given keys win, and the template reuses the previous Secret's (lookup) before
    generating: checked on the template text, since lookup needs a cluster."""
    text = (staged_chart / "templates" / "secret.yaml").read_text()
    assert 'lookup "v1" "Secret"' in text
    objects = tools.helm_template(
        staged_chart, sets={"secrets.jwtSecret": "given-jwt-key-0123456789"}
    )
    secret = next(o for o in objects if o["kind"] == "Secret")
    assert base64.b64decode(secret["data"]["jwt-secret"]).decode() == "given-jwt-key-0123456789"


def test_registry_on_sqlite_refuses_more_than_one_replica(helm: Path, staged_chart: Path) -> None:
    done = tools.subprocess_run(
        [helm, "template", "x", staged_chart, "--set", "schemaRegistry.replicaCount=2"]
    )
    assert done.returncode != 0 and "more than one replica needs PostgreSQL" in done.stderr


def test_registry_dsn_from_external_postgresql(staged_chart: Path) -> None:
    objects = tools.helm_template(
        staged_chart,
        sets={
            "externalPostgresql.host": "db.example",
            "externalPostgresql.password": "p@ss word/1",
            "externalPostgresql.sslMode": "require",
        },
    )
    secret = next(o for o in objects if o["kind"] == "Secret")
    dsn = base64.b64decode(secret["data"]["schema-registry-storage"]).decode()
    assert dsn == "postgresql://bilten:p%40ss%20word%2F1@db.example:5432/bilten?sslmode=require"
    import psycopg.conninfo

    parsed = psycopg.conninfo.conninfo_to_dict(dsn)
    assert parsed["host"] == "db.example" and parsed["dbname"] == "bilten"
    assert parsed["password"] == "p@ss word/1"


def test_gateway_tls_mounts_the_certificate(rendered: dict[str, tools.Rendered]) -> None:
    values = tools.ci_values("production")
    gateway = rendered["production"].get("Deployment", f"{tools.RELEASE}-gateway")
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == values["gateway"]["tls"]["existingSecret"]
    config = yaml.safe_load(
        rendered["production"].get("ConfigMap", f"{tools.RELEASE}-gateway")["data"]["envoy.yaml"]
    )
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2", "http/1.1"]


@pytest.mark.parametrize("shape", SHAPES)
def test_helm_install_dry_run(helm: Path, staged_chart: Path, shape: str) -> None:
    """`helm install --dry-run=client`: the install action without a cluster (schema check,
    render, hook ordering, NOTES.txt). Needs no kubeconfig."""
    out = tools.run(
        [
            helm,
            "install",
            tools.RELEASE,
            staged_chart,
            "--namespace",
            tools.NAMESPACE,
            "--dry-run=client",
            "--values",
            tools.CHART / "ci" / f"{shape}-values.yaml",
        ]
    ).stdout
    assert "STATUS: pending-install" in out, out[-2000:]
    assert "HOOKS:" in out and "helm.sh/hook: post-install,post-upgrade" in out
    assert (
        f"Bilten Analytics {yaml.safe_load((tools.CHART / 'Chart.yaml').read_text())['appVersion']}"
        in out
    )


TOGGLES: dict[str, dict[str, Any]] = {
    "everything-off": {
        "gateway.enabled": False,
        "schemaRegistry.enabled": False,
        "bootstrap.enabled": False,
        "networkPolicy.enabled": False,
        "serviceAccount.create": False,
        "metrics.podAnnotations": False,
        "services.prediction.enabled": False,
    },
    "no-aggregation": {"services.aggregation.enabled": False},
    "processor-and-otlp-http": {
        "processor.enabled": True,
        "platform.eventLog": "kafka",
        "externalKafka.bootstrapServers": "kafka:9092",
        "opentelemetry.endpoint": "http://collector:4318",
        "opentelemetry.protocol": "http/protobuf",
    },
    "digest-and-own-envoy": {
        "image.digest": "sha256:" + "a" * 64,
        "gateway.image.repository": "envoyproxy/envoy",
        "gateway.image.tag": "v1.36.2",
        "gateway.websocketBridge.enabled": False,
    },
}


@pytest.mark.parametrize("name", sorted(TOGGLES))
def test_value_toggles_render_valid_objects(staged_chart: Path, name: str) -> None:
    sets = TOGGLES[name]
    objects = tools.helm_template(staged_chart, sets=sets)
    for obj in objects:
        if not obj["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    if name == "everything-off":
        assert not any(k == "NetworkPolicy" or k == "ServiceAccount" for k, _ in kinds)
        assert ("Deployment", f"{tools.RELEASE}-gateway") not in kinds
    if name == "no-aggregation":
        gateway = next(
            o
            for o in objects
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-gateway")
        )
        assert "AggregationService" not in gateway["data"]["envoy.yaml"]
        assert "websocket" not in gateway["data"]["envoy.yaml"]
    if name == "digest-and-own-envoy":
        images = {
            c["image"]
            for o in tools.workloads(objects)
            for c in o["spec"]["template"]["spec"]["containers"]
        }
        assert "envoyproxy/envoy:v1.36.2" in images
        assert f"ghcr.io/bilten/bilten-analytics@sha256:{'a' * 64}" in images


REDIS_SHAPES = {
    "no-redis": ({}, ""),
    "external": (
        {"externalRedis.url": "redis://cache.data:6379/2", "externalRedis.password": "p@ss"},
        "redis://cache.data:6379/2",
    ),
    "subchart": (
        {"redis.enabled": True},
        f"redis://{tools.RELEASE}-redis-master.{tools.NAMESPACE}.svc.cluster.local:6379/0",
    ),
}


# Every gRPC component: besides the rate limit and the alert bus, compliance announces
# API key revocations and every pod drops them from its key cache.
REDIS_READERS = ("ingestion", "query", "aggregation", "compliance", "prediction")


@pytest.mark.parametrize("name", sorted(REDIS_SHAPES))
def test_ingestion_shares_its_rate_limit_through_redis(staged_chart: Path, name: str) -> None:
    """Ingestion (rate limit), prediction and aggregation (the anomaly alert bus) and every
    pod (API key revocations) read Redis (BILTEN_REDIS_URL); the password comes from the
    Secret."""
    sets, url = REDIS_SHAPES[name]
    objects = tools.helm_template(staged_chart, sets=sets)
    secret = next(o for o in objects if o["kind"] == "Secret")
    for component in GRPC_COMPONENTS:
        deployment = next(
            o
            for o in objects
            if o["kind"] == "Deployment" and o["metadata"]["name"] == f"{tools.RELEASE}-{component}"
        )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        if component not in REDIS_READERS or not url:
            assert "BILTEN_REDIS_URL" not in env and "BILTEN_REDIS_PASSWORD" not in env
            continue
        assert env["BILTEN_REDIS_URL"]["value"] == url
        ref = env["BILTEN_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "redis-password")
        assert "redis-password" in secret["data"]
        if name == "external":
            assert base64.b64decode(secret["data"]["redis-password"]).decode() == "p@ss"


METADATA_SHAPES = {
    "no-postgresql": ({}, None),
    "external": (
        {"externalPostgresql.host": "db.example", "externalPostgresql.password": "p@ss word/1"},
        ("db.example", "bilten_metadata"),
    ),
    "subchart-default-schema": (
        {"postgresql.enabled": True, "metadataStore.schema": ""},
        (f"{tools.RELEASE}-postgresql.{tools.NAMESPACE}.svc.cluster.local", ""),
    ),
}


@pytest.mark.parametrize("name", sorted(METADATA_SHAPES))
def test_services_share_the_metadata_store_on_postgresql(staged_chart: Path, name: str) -> None:
    """With PostgreSQL every platform workload (not Envoy) reads BILTEN_METADATA_STORE_URL
    from the Secret: one metadata database for all pods, the password never inline."""
    sets, expected = METADATA_SHAPES[name]
    objects = tools.helm_template(staged_chart, sets=sets)
    secret = next(o for o in objects if o["kind"] == "Secret")
    readers = set()
    for workload in tools.workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            if "BILTEN_METADATA_STORE_URL" not in env:
                continue
            item = env["BILTEN_METADATA_STORE_URL"]
            assert "value" not in item
            ref = item["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "metadata-store-url")
            readers.add(workload["metadata"]["labels"]["app.kubernetes.io/component"])
    if expected is None:
        assert not readers and "metadata-store-url" not in secret["data"]
        return
    assert readers >= {*GRPC_COMPONENTS, "schema-registry"}
    assert "gateway" not in readers
    import psycopg.conninfo

    url = base64.b64decode(secret["data"]["metadata-store-url"]).decode()
    parsed = psycopg.conninfo.conninfo_to_dict(url)
    host, schema = expected
    assert parsed["host"] == host and parsed["dbname"] == "bilten"
    assert parsed.get("options", "") == (f"-csearch_path={schema}" if schema else "")
    if name == "external":
        assert parsed["password"] == "p@ss word/1"


@pytest.mark.parametrize("shape", SHAPES)
def test_no_platform_process_writes_dev_credentials(
    rendered: dict[str, tools.Rendered], shape: str
) -> None:
    """The one-machine default writes a dev tenant, write key and admin token to the data
    dir; every platform container of the chart turns that off."""
    seen = 0
    for obj in tools.workloads(rendered[shape].objects):
        for container in obj["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if "BILTEN_DATA_DIR" not in env:
                continue  # Envoy
            seen += 1
            name = f"{shape} {obj['kind']}/{obj['metadata']['name']}/{container['name']}"
            assert env.get("BILTEN_CREATE_DEV_CREDENTIALS") == "false", name
    assert seen >= 6


def test_every_processor_host_pod_reads_every_partition(staged_chart: Path) -> None:
    """The gRPC components that host a stream processor (services/mesh.py PROCESSOR_HOSTS)
    fill their pod's own store, so each pod is its own consumer group; the others run no
    processor and get no group id."""
    objects = tools.helm_template(
        staged_chart,
        sets={"platform.eventLog": "kafka", "externalKafka.bootstrapServers": "kafka:9092"},
    )
    for component in GRPC_COMPONENTS:
        deployment = next(
            o
            for o in objects
            if o["kind"] == "Deployment" and o["metadata"]["name"] == f"{tools.RELEASE}-{component}"
        )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        if component in PROCESSOR_HOSTS:
            ref = env["BILTEN_PROCESSOR_GROUP_ID"]["valueFrom"]["fieldRef"]
            assert ref["fieldPath"] == "metadata.name"
        else:
            assert "BILTEN_PROCESSOR_GROUP_ID" not in env
