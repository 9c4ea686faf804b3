"""The rendered Envoy config passes `envoy --mode validate` with the gateway container's own
args, the descriptor set from the rendered ConfigMap and, with TLS, a certificate in the
mounted Secret's place; Envoy reports no deprecated field. Its routes cover every enabled
service and its upstreams are the rendered headless Services."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import tools

pytestmark = pytest.mark.deploy

SHAPES = [p.name.removesuffix("-values.yaml") for p in tools.CI_VALUES]


def _materialize(objects: tools.Rendered, workdir: Path) -> tuple[Path, list[str]]:
    """The gateway pod's volumes as files, as tests/deploy/harness.py lays them out (a
    TLS Secret the chart only references gets a throwaway self-signed pair); returns the config
    path and the container's args pointing at those files."""
    from tests.deploy.harness import Cluster
    from tests.deploy.test_smoke_install import self_signed_tls

    gateway = objects.get("Deployment", f"{tools.RELEASE}-gateway")
    extra = []
    for volume in gateway["spec"]["template"]["spec"]["volumes"]:
        name = volume.get("secret", {}).get("secretName")
        if name and not any(
            o["kind"] == "Secret" and o["metadata"]["name"] == name for o in objects.objects
        ):
            data, _ = self_signed_tls(workdir)
            extra.append({"kind": "Secret", "metadata": {"name": name}, "data": data})
    cluster = Cluster(objects.objects, workdir, namespace=tools.NAMESPACE, extra_secrets=extra)
    pod = cluster.prepare(gateway)
    config = pod.mounts["/etc/envoy/config"] / "envoy.yaml"
    config.write_text(cluster._rewrite(pod, config.read_text()))
    return config, [cluster._rewrite(pod, a) for a in pod.container["args"]]


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_envoy_config_validates(
    envoy: Path, rendered: dict[str, tools.Rendered], shape: str, tmp_path: Path
) -> None:
    config, args = _materialize(rendered[shape], tmp_path)
    assert str(config) in args
    done = subprocess.run(
        [str(envoy), *args, "--mode", "validate"], capture_output=True, text=True, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "OK" in done.stdout
    assert "Deprecated field" not in output, output[-3000:]


@pytest.mark.parametrize("shape", SHAPES)
def test_routes_and_upstreams_cover_the_services(
    rendered: dict[str, tools.Rendered], shape: str
) -> None:
    objects = rendered[shape]
    config: dict[str, Any] = yaml.safe_load(
        objects.get("ConfigMap", f"{tools.RELEASE}-gateway")["data"]["envoy.yaml"]
    )
    grpc_names = tools.grpc_service_names()
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    by_prefix = {r["match"]["prefix"]: r["route"]["cluster"] for r in routes}
    transcoder = hcm["http_filters"][0]["typed_config"]
    assert "match_incoming_request_route" not in transcoder
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    services = {s["metadata"]["name"]: s for s in objects.of_kind("Service")}
    for component, full_name in grpc_names.items():
        assert by_prefix[f"/{full_name}/"] == component
        assert full_name in transcoder["services"]
        cluster = clusters[component]
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        address = endpoint["address"]["socket_address"]
        service_name = address["address"].split(".")[0]
        service = services[service_name]
        assert service["spec"]["clusterIP"] == "None", "per-request balancing needs pod IPs"
        assert address["address"] == f"{service_name}.{tools.NAMESPACE}.svc.cluster.local"
        assert address["port_value"] in {p["port"] for p in service["spec"]["ports"]}
        assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == full_name
    gateway = objects.get("Deployment", f"{tools.RELEASE}-gateway")
    ports = {
        p["name"]: p["containerPort"]
        for p in gateway["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    listeners = {
        listener["name"]: listener["address"]["socket_address"]["port_value"]
        for listener in config["static_resources"]["listeners"]
    }
    assert listeners == {"gateway": ports["gateway"], "health": ports["health"]}
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
