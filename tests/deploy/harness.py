"""Runs rendered Kubernetes workloads as local processes: the nearest thing to `helm install`
that a machine without a container runtime or a cluster allows.

For each Deployment (one pod each) the harness does what the kubelet would do, on loopback:

- volumes: configMap and secret volumes become directories holding the rendered keys (items
  and subPath honoured), emptyDir a fresh directory; every path under a mountPath that appears
  in the command, the args, the environment or a mounted Envoy config is rewritten to it;
- ports: each containerPort gets a free local port; an environment variable `*_PORT` whose value
  is that containerPort is set to the local port (that is how the process learns where to bind);
- Services: `name`, `name.ns`, `name.ns.svc`, `name.ns.svc.<clusterDomain>` resolve to
  127.0.0.1 and the local port behind the Service's targetPort (hostname mapping);
- environment: value, secretKeyRef, configMapKeyRef and fieldRef resolved from the rendered
  objects, on top of the image's ENV from the Dockerfile, as the kubelet does;
- command: resolved on a PATH like the image's (/opt/venv/bin -> this venv, plus `envoy`);
- probes: the rendered startup/readiness/liveness probes are executed (grpc.health.v1 Check
  with the probe's service name, or HTTP GET) against the local port.

Nothing is changed in the rendered objects themselves; every rewrite is one of the mappings above.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port
from tests.deploy.tools import REPO, envoy_binary

DOCKERFILE = REPO / "Dockerfile"


class PodFailed(AssertionError):
    """A local pod exited or never became ready; the message carries its log tail."""


def dockerfile_env() -> dict[str, str]:
    """ENV of the image's final stage (PATH excluded: the harness sets its own)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM\s", text, flags=re.M)
    env: dict[str, str] = {}
    for line in stages[-1].splitlines():
        if line.startswith("ENV "):
            for name, value in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", line[4:]):
                if name != "PATH":
                    env[name] = value
    return env


def dockerfile_workdir() -> str:
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM\s", text, flags=re.M)
    found = re.findall(r"^WORKDIR\s+(\S+)", stages[-1], flags=re.M)
    return found[-1] if found else "/"


@dataclass
class LocalPod:
    name: str
    component: str
    spec: dict[str, Any]
    container: dict[str, Any]
    root: Path
    volume_root: Path
    ports: dict[str, int] = field(default_factory=dict)  # port name -> local port
    port_numbers: dict[int, int] = field(default_factory=dict)  # containerPort -> local port
    mounts: dict[str, Path] = field(default_factory=dict)  # mountPath -> local path
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    sidecars: list[LocalPod] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.root / "pod.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def local_port(self, port: int | str) -> int:
        if isinstance(port, str) and not port.isdigit():
            return self.ports[port]
        return self.port_numbers[int(port)]


class Cluster:
    """The rendered objects of one release, and the local pods started from them."""

    def __init__(
        self,
        objects: list[dict[str, Any]],
        workdir: Path,
        *,
        namespace: str,
        cluster_domain: str = "cluster.local",
        extra_secrets: list[dict[str, Any]] = (),  # type: ignore[assignment]
    ) -> None:
        self.objects = [*objects, *extra_secrets]
        self.workdir = workdir
        self.namespace = namespace
        self.cluster_domain = cluster_domain
        self.pods: dict[str, LocalPod] = {}
        self.closed_port = free_port()  # nothing listens here: endpoints that do not run
        self.bin_dir = workdir / "bin"
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        (self.bin_dir / "envoy").unlink(missing_ok=True)
        (self.bin_dir / "envoy").symlink_to(envoy_binary())

    # -- lookups -------------------------------------------------------------------------

    def objects_of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def find(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.objects_of(kind):
            if o["metadata"]["name"] == name:
                return o
        raise KeyError(f"{kind}/{name} is referenced but not rendered (nor given by the test)")

    def secret_value(self, name: str, key: str) -> str:
        secret = self.find("Secret", name)
        if key in secret.get("stringData", {}):
            return str(secret["stringData"][key])
        if key not in secret.get("data", {}):
            raise KeyError(f"Secret/{name} has no key {key!r}")
        return base64.b64decode(secret["data"][key]).decode()

    def configmap_value(self, name: str, key: str) -> str:
        return str(self.find("ConfigMap", name)["data"][key])

    def host_map(self) -> dict[str, int]:
        """Service DNS name:port -> local port of the pod behind it."""
        mapping: dict[str, int] = {}
        for service in self.objects_of("Service"):
            selector = service["spec"].get("selector", {})
            pod = next(
                (p for p in self.pods.values() if _matches(selector, p.spec)),
                None,
            )
            if pod is None:
                continue
            name = service["metadata"]["name"]
            ns = self.namespace
            for port in service["spec"]["ports"]:
                local = pod.local_port(port.get("targetPort", port["port"]))
                for host in (
                    name,
                    f"{name}.{ns}",
                    f"{name}.{ns}.svc",
                    f"{name}.{ns}.svc.{self.cluster_domain}",
                ):
                    mapping[f"{host}:{port['port']}"] = local
        return mapping

    # -- preparing pods ------------------------------------------------------------------

    def prepare(self, workload: dict[str, Any]) -> LocalPod:
        """One local process per container; the containers of a pod share its ports (one
        network namespace) and its volumes. Returns the first container's; the others are
        in `self.pods` as `<name>/<container>` and in `LocalPod.sidecars`."""
        name = workload["metadata"]["name"]
        template = workload["spec"]["template"]
        ports: dict[str, int] = {}
        numbers: dict[int, int] = {}
        for container in template["spec"]["containers"]:
            for port in container.get("ports", []):
                local = free_port()
                ports[port["name"]] = local
                numbers[int(port["containerPort"])] = local
        made: list[LocalPod] = []
        for index, container in enumerate(template["spec"]["containers"]):
            key = name if index == 0 else f"{name}/{container['name']}"
            pod = LocalPod(
                name=key,
                component=workload["metadata"]["labels"]["app.kubernetes.io/component"],
                spec=template,
                container=container,
                root=self.workdir / name / container["name"],
                volume_root=self.workdir / name / "volumes",
                ports=ports,
                port_numbers=numbers,
            )
            pod.root.mkdir(parents=True, exist_ok=True)
            self._volumes(pod, template["spec"].get("volumes", []))
            self.pods[key] = pod
            made.append(pod)
        made[0].sidecars = made[1:]
        return made[0]

    def _volumes(self, pod: LocalPod, volumes: list[dict[str, Any]]) -> None:
        by_name = {v["name"]: v for v in volumes}
        for mount in pod.container.get("volumeMounts", []):
            volume = by_name[mount["name"]]
            path = pod.volume_root / mount["name"]
            if not path.exists():
                path.mkdir(parents=True)
                self._fill(volume, path)
            target = path / mount["subPath"] if mount.get("subPath") else path
            pod.mounts[mount["mountPath"]] = target

    def _fill(self, volume: dict[str, Any], path: Path) -> None:
        if "emptyDir" in volume:
            return
        if "configMap" in volume:
            cm = self.find("ConfigMap", volume["configMap"]["name"])
            files = {k: v.encode() for k, v in cm.get("data", {}).items()}
            files |= {k: base64.b64decode(v) for k, v in cm.get("binaryData", {}).items()}
            items = volume["configMap"].get("items")
        elif "secret" in volume:
            secret = self.find("Secret", volume["secret"]["secretName"])
            files = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
            files |= {k: v.encode() for k, v in secret.get("stringData", {}).items()}
            items = volume["secret"].get("items")
        else:
            raise AssertionError(f"volume kind not supported by the harness: {volume}")
        if items:
            files = {item["path"]: files[item["key"]] for item in items}
        for key, content in files.items():
            (path / key).parent.mkdir(parents=True, exist_ok=True)
            (path / key).write_bytes(content)

    def _rewrite(self, pod: LocalPod, text: str) -> str:
        """Mount paths -> local directories; Service host:port -> 127.0.0.1:local port."""
        # One pass each, longest first, so that a replacement is never rewritten again.
        if pod.mounts:
            paths = sorted(pod.mounts, key=len, reverse=True)
            pattern = "|".join(re.escape(p) for p in paths)
            text = re.sub(
                rf"(?<![\w.\-])({pattern})(?![\w.\-])",
                lambda m: str(pod.mounts[m.group(1)]),
                text,
            )
        hosts = self.host_map()
        if hosts:
            pattern = "|".join(re.escape(h) for h in sorted(hosts, key=len, reverse=True))
            text = re.sub(
                rf"(?<![\w.\-])({pattern})(?!\d)", lambda m: f"127.0.0.1:{hosts[m.group(1)]}", text
            )
        return text

    def _environment(self, pod: LocalPod) -> dict[str, str]:
        env = {
            "PATH": f"{self.bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
            "HOME": str(pod.root / "home"),
            "LANG": "C.UTF-8",
        }
        (pod.root / "home").mkdir(exist_ok=True)
        for passthrough in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "PYTHONFAULTHANDLER"):
            if passthrough in os.environ:
                env[passthrough] = os.environ[passthrough]
        image_env = dockerfile_env()
        container_ports = {str(p["containerPort"]) for p in pod.container.get("ports", [])}
        for item in pod.container.get("env", []):
            value = self._env_value(pod, item)
            if value is None:  # optional key that is not there: the kubelet leaves it unset
                continue
            if item["name"].endswith("_PORT") and value in container_ports:
                value = str(pod.port_numbers[int(value)])
            image_env[item["name"]] = value
        # Only what the image and the manifest set is mapped; the harness's own PATH is not.
        return env | {k: self._rewrite(pod, v) for k, v in image_env.items()}

    def _env_value(self, pod: LocalPod, item: dict[str, Any]) -> str | None:
        if "value" in item:
            return str(item["value"])
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            try:
                return self.secret_value(ref["name"], ref["key"])
            except KeyError:
                if ref.get("optional"):
                    return None
                raise
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return self.configmap_value(ref["name"], ref["key"])
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            return {"metadata.namespace": self.namespace, "metadata.name": pod.name}.get(
                path, "127.0.0.1"
            )
        raise AssertionError(f"env source not supported by the harness: {item}")

    def _envoy_configs(self, pod: LocalPod) -> None:
        """Envoy configs in the pod's volumes: listener and admin ports to local ports,
        upstream Service names to 127.0.0.1 and their pods' local ports, other hosts (external
        endpoints that do not run here) to a closed local port."""
        for local in pod.mounts.values():
            for path in [local] if local.is_file() else local.rglob("*.yaml"):
                if path.suffix not in (".yaml", ".yml"):
                    continue
                config = yaml.safe_load(path.read_text())
                if not isinstance(config, dict) or "static_resources" not in config:
                    continue
                extra: dict[int, int] = {}
                self._remap(config, pod, self.host_map(), extra)
                text = self._rewrite(pod, yaml.safe_dump(config, sort_keys=False))
                path.write_text(text)
                for original, local_port in extra.items():
                    pod.ports[f"unexposed-{original}"] = local_port

    def _remap(
        self, node: Any, pod: LocalPod, hosts: dict[str, int], extra: dict[int, int]
    ) -> None:
        if isinstance(node, list):
            for value in node:
                self._remap(value, pod, hosts, extra)
            return
        if not isinstance(node, dict):
            return
        address = node.get("socket_address")
        if isinstance(address, dict):
            host, port = str(address["address"]), int(address["port_value"])
            if host in ("0.0.0.0", "127.0.0.1", "::"):
                if port in pod.port_numbers:
                    address["port_value"] = pod.port_numbers[port]
                else:  # admin: not a containerPort
                    address["port_value"] = extra.setdefault(port, free_port())
            elif f"{host}:{port}" in hosts:
                address["address"] = "127.0.0.1"
                address["port_value"] = hosts[f"{host}:{port}"]
            else:
                address["address"] = "127.0.0.1"
                address["port_value"] = self.closed_port
        for value in node.values():
            self._remap(value, pod, hosts, extra)

    # -- running -------------------------------------------------------------------------

    def start(self, pod: LocalPod) -> None:
        self._envoy_configs(pod)
        pod.env = self._environment(pod)
        argv = [*pod.container.get("command", []), *pod.container.get("args", [])]
        assert argv, f"{pod.name}: the harness needs an explicit command (the chart sets one)"
        pod.argv = [
            str(pod.port_numbers[int(a)])
            if a.isdigit() and int(a) in pod.port_numbers
            else self._rewrite(pod, a)
            for a in argv
        ]
        workdir = pod.container.get("workingDir") or dockerfile_workdir()
        pod.cwd = pod.mounts.get(workdir) or pod.root
        log = pod.log_path.open("ab")
        pod.process = subprocess.Popen(
            pod.argv,
            env=pod.env,
            cwd=pod.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def run_to_completion(self, pod: LocalPod, timeout: float) -> int:
        """A Job's container: start it, wait for the exit code."""
        self.start(pod)
        assert pod.process is not None
        try:
            return pod.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.stop(pod)
            raise PodFailed(f"{pod.name} did not finish in {timeout} s:\n{pod.log_tail()}") from exc

    def stop(self, pod: LocalPod, grace: float = 20.0) -> None:
        process = pod.process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop_all(self, grace: float = 20.0) -> None:
        """SIGTERM to every pod at once (as a namespace deletion does), then wait."""
        running = [p for p in self.pods.values() if p.process and p.process.poll() is None]
        for pod in running:
            assert pod.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for pod in running:
            assert pod.process is not None
            try:
                pod.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.process.pid, signal.SIGKILL)
                pod.process.wait(timeout=10)

    # -- probes --------------------------------------------------------------------------

    def probe(self, pod: LocalPod, kind: str) -> tuple[bool, str]:
        spec = pod.container.get(kind)
        if spec is None:
            return True, f"no {kind}"
        timeout = float(spec.get("timeoutSeconds", 1)) + 1.0
        if "grpc" in spec:
            port = pod.local_port(spec["grpc"]["port"])
            service = spec["grpc"].get("service", "")
            return grpc_health(f"127.0.0.1:{port}", service, timeout)
        if "httpGet" in spec:
            port = pod.local_port(spec["httpGet"]["port"])
            url = f"http://127.0.0.1:{port}{spec['httpGet'].get('path', '/')}"
            try:
                status = httpx.get(url, timeout=timeout).status_code
            except httpx.HTTPError as exc:
                return False, f"GET {url}: {exc}"
            return 200 <= status < 400, f"GET {url}: {status}"
        if "tcpSocket" in spec:
            port = pod.local_port(spec["tcpSocket"]["port"])
            try:
                socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
            except OSError as exc:
                return False, f"tcp 127.0.0.1:{port}: {exc}"
            return True, f"tcp 127.0.0.1:{port}: open"
        raise AssertionError(f"{pod.name}: probe kind not supported: {spec}")

    def wait_ready(self, pods: list[LocalPod], timeout: float) -> dict[str, str]:
        """Startup then readiness probe of every pod, like the kubelet; returns the last
        readiness result per pod."""
        deadline = time.monotonic() + timeout
        pending = {p.name: p for p in pods}
        results: dict[str, str] = {}
        while pending:
            for name, pod in list(pending.items()):
                assert pod.process is not None
                if pod.process.poll() is not None:
                    raise PodFailed(
                        f"{name} exited with {pod.process.returncode} before it was ready:\n"
                        f"{' '.join(pod.argv)}\n{pod.log_tail()}"
                    )
                started, _ = self.probe(pod, "startupProbe")
                if not started:
                    continue
                ready, detail = self.probe(pod, "readinessProbe")
                if ready:
                    results[name] = detail
                    del pending[name]
            if pending and time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- {n}: {self.probe(p, 'readinessProbe')[1]}\n{p.log_tail(1500)}"
                    for n, p in pending.items()
                )
                raise PodFailed(f"not ready in {timeout} s: {sorted(pending)}\n{tails}")
            time.sleep(0.25)
        return results


def grpc_health(target: str, service: str, timeout: float) -> tuple[bool, str]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"grpc health {target} {service!r}: {exc.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, (
        f"grpc health {target} {service!r}: {status}"
    )


def _matches(selector: dict[str, str], pod_template: dict[str, Any]) -> bool:
    labels = pod_template.get("metadata", {}).get("labels", {})
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def iter_workloads(objects: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    yield from (o for o in objects if o["kind"] == kind)
