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


@pytest.mark.parametrize("shape", SHAPES)
def test_envoy_own_errors_are_json_status_like_up(
    rendered: dict[str, tools.Rendered], shape: str
) -> None:
    """The chart's gateway renders Envoy's own replies (transcoder refusals, unknown paths)
    as JSON google.rpc.Status bodies exactly as `up`'s gateway does."""
    from services.platform.gateway import render_envoy_config

    def local_replies(text: str) -> dict[str, Any]:
        config: dict[str, Any] = yaml.safe_load(text)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        replies: dict[str, Any] = hcm["typed_config"]["local_reply_config"]
        return replies

    chart = local_replies(
        rendered[shape].get("ConfigMap", f"{tools.RELEASE}-gateway")["data"]["envoy.yaml"]
    )
    up = local_replies(
        render_envoy_config(
            http_host="127.0.0.1",
            http_port=8080,
            admin_port=9901,
            grpc_host="127.0.0.1",
            grpc_port=50051,
        )
    )
    assert chart == up
    by_status = {
        m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]: m[
            "body_format_override"
        ]["json_format"]
        for m in chart["mappers"]
        if "status_code_filter" in m["filter"]
        and m["filter"]["status_code_filter"]["comparison"]["op"] == "EQ"
    }
    assert by_status[400] == {"code": 3, "message": "%LOCAL_REPLY_BODY%", "details": []}
    assert by_status[404]["code"] == 5
