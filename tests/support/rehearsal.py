"""A cluster rehearsal: run the rendered manifests' pods as local processes, wired as Kubernetes would.

Everything a pod gets comes from the manifests: the command and arguments, the environment
(plain values, $(VAR) expansion, downward API fields, secretKeyRefs), the mounted ConfigMaps
and Secrets (written to a per-pod directory), the ports, and which Service reaches which pod
(selectors, target ports). Only what a cluster provides is simulated, each the same way:

- each pod gets its own loopback address (127.0.1.N) as its pod IP, and "0.0.0.0" in a
  listen address means that pod IP;
- a Service's DNS name (short or qualified) resolves to the pod its selector picks, and its
  port to the container port its targetPort names;
- a mount path in a setting means that pod's copy of the mounted volume;
- `python` is this interpreter and the working directory is the repository (the image's
  /app, which holds the same config/ defaults); the image's ENV comes from the Dockerfile;
- the operator's Secrets are a dict the caller passes in (tests/support/pki.py adds the TLS,
  JWT-key and service-token ones, shaped by what the pods mount);
- a PersistentVolumeClaim is one directory per claim, shared by every pod that mounts it;
- a probe (every probe in the chart is an httpGet) is a GET of its path on the pod's IP and
  named or numbered port, within its timeoutSeconds, passing on 200-399 as the kubelet's.

So a wrong label, port, key, path or variable in the chart fails the rehearsal.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from deploy.k8s.render import MANIFESTS_DIR, REPO_ROOT, Manifest, hooks
from tests.support.k8s import container_port, matches, pod_template

NAMESPACE = "egret"


class RehearsalError(AssertionError):
    """The manifests cannot be run as written, or a pod misbehaved."""


def load_manifests(directory: Path = MANIFESTS_DIR) -> list[Manifest]:
    found: list[Manifest] = []
    for path in sorted(directory.glob("*.yaml")):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def image_env(dockerfile: Path = REPO_ROOT / "Dockerfile") -> dict[str, str]:
    """The ENV of the Dockerfile's last stage (PATH left to the host: `python` is mapped anyway)."""
    lines = dockerfile.read_text().replace("\\\n", " ").splitlines()
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    env: dict[str, str] = {}
    for line in lines[last_from:]:
        if line.upper().startswith("ENV "):
            for pair in shlex.split(line[4:]):
                name, _, value = pair.partition("=")
                env[name] = value
    env.pop("PATH", None)
    return env


@dataclass
class Pod:
    name: str
    manifest: Manifest
    metadata: dict[str, Any]
    spec: dict[str, Any]
    ip: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    mounts: dict[str, Path] = field(default_factory=dict)

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.spec["containers"]
        return dict(container)

    @property
    def log_path(self) -> Path:
        return self.directory / "log"

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name}:\n" + "\n".join(tail)


class Rehearsal:
    """The manifests' pods as processes; `secrets[(name, key)]` plays the operator's Secrets."""

    def __init__(self, manifests: list[Manifest], secrets: Mapping[tuple[str, str], str], root: Path) -> None:
        self.manifests = manifests
        self.secrets = dict(secrets)
        self.root = root
        self.base_env = image_env()
        self.services = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Service"}
        self.config_maps = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "ConfigMap"}
        self.pods: dict[str, Pod] = {}
        workloads = [m for m in manifests if m["kind"] in ("Deployment", "Job", "Pod")]
        for index, manifest in enumerate(workloads, start=1):
            metadata, spec = pod_template(manifest)
            name = manifest["metadata"]["name"]
            self.pods[name] = Pod(name, manifest, metadata, spec, f"127.0.1.{index}", root / name)

    # -- what the cluster would provide --------------------------------------------------

    def resolve(self, host: str, port: int) -> str:
        """A Service address (name[.namespace[.svc[.cluster.local]]]:port) → the selected pod's ip:port."""
        name = host.split(".", maxsplit=1)[0]
        service = self.services.get(name)
        if service is None or host not in dns_names(name):
            raise RehearsalError(f"no Service answers to {host!r}")
        (service_port,) = [p for p in service["spec"]["ports"] if int(p["port"]) == port] or [None]
        if service_port is None:
            raise RehearsalError(f"Service {name} has no port {port}")
        selected = [
            p
            for p in self.pods.values()
            if p.manifest["kind"] == "Deployment"
            and matches(service["spec"]["selector"], p.metadata["labels"])
        ]
        if len(selected) != 1:
            raise RehearsalError(
                f"Service {name} selects {[p.name for p in selected]}, not exactly one Deployment"
            )
        (pod,) = selected
        return f"{pod.ip}:{container_port(pod.spec, service_port['targetPort'])}"

    def service_address(self, service: str) -> str:
        port = int(self.services[service]["spec"]["ports"][0]["port"])
        return self.resolve(service, port)

    def _translate(self, pod: Pod, value: str) -> str:
        value = re.sub(r"\b0\.0\.0\.0:(\d+)\b", lambda m: f"{pod.ip}:{m.group(1)}", value)
        names = "|".join(re.escape(n) for n in sorted(self.services, key=len, reverse=True))
        if names:
            value = re.sub(
                rf"\b((?:{names})(?:\.[a-z0-9-]+(?:\.svc(?:\.cluster\.local)?)?)?):(\d+)\b",
                lambda m: self.resolve(m.group(1), int(m.group(2))),
                value,
            )
        for mount_path, local in sorted(pod.mounts.items(), key=lambda item: -len(item[0])):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(local) + value[len(mount_path) :]
        return value

    def _mount_volumes(self, pod: Pod) -> None:
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        for mount in pod.container.get("volumeMounts", []):
            if "subPath" in mount:
                raise RehearsalError(f"{pod.name}: subPath mounts are not rehearsed")
            volume = volumes[mount["name"]]
            local = pod.directory / "mounts" / mount["mountPath"].strip("/")
            if "persistentVolumeClaim" in volume:
                local = self.root / "claims" / volume["persistentVolumeClaim"]["claimName"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                config_map = self.config_maps.get(volume["configMap"]["name"])
                if config_map is None:
                    raise RehearsalError(f"{pod.name}: no ConfigMap {volume['configMap']['name']}")
                files = {i["key"]: i["path"] for i in volume["configMap"].get("items", [])} or {
                    k: k for k in config_map["data"]
                }
                for key, path in files.items():
                    (local / path).write_text(config_map["data"][key])
            elif "secret" in volume:
                secret = volume["secret"]
                for item in secret.get("items", []):
                    (local / item["path"]).write_text(self._secret(pod, secret["secretName"], item["key"]))
            elif "emptyDir" not in volume and "persistentVolumeClaim" not in volume:
                raise RehearsalError(
                    f"{pod.name}: volume {mount['name']} is of a kind the rehearsal does not know"
                )
            pod.mounts[mount["mountPath"]] = local

    def _secret(self, pod: Pod, name: str, key: str) -> str:
        if (name, key) not in self.secrets:
            raise RehearsalError(
                f"{pod.name} needs Secret {name} key {key}, which the operator was not told to create"
            )
        return self.secrets[(name, key)]

    def declared_env(self, pod: Pod) -> dict[str, str]:
        """The container's plain `value` settings as written in the manifest (no Secrets, untranslated)."""
        return {e["name"]: str(e["value"]) for e in pod.container.get("env", []) if "value" in e}

    def environment(self, pod: Pod) -> dict[str, str]:
        """The container's environment, as the kubelet would build it."""
        if pod.spec.get("enableServiceLinks", True):
            raise RehearsalError(f"{pod.name}: service links would inject *_SERVICE_HOST/_PORT variables")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.base_env}
        declared: dict[str, str] = {}
        fields = {"metadata.name": pod.name, "metadata.namespace": NAMESPACE}
        for entry in pod.container.get("env", []):
            name = entry["name"]
            if "value" in entry:
                value = re.sub(
                    r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                    lambda m: declared.get(m.group(1), m.group(0)),
                    str(entry["value"]),
                )
            elif "fieldRef" in entry["valueFrom"]:
                value = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in entry["valueFrom"]:
                ref = entry["valueFrom"]["secretKeyRef"]
                value = self._secret(pod, ref["name"], ref["key"])
            else:
                raise RehearsalError(f"{pod.name}: {name} comes from a source the rehearsal does not know")
            declared[name] = value
        env.update({name: self._translate(pod, value) for name, value in declared.items()})
        return env

    def command(self, pod: Pod) -> list[str]:
        return self.command_of(pod, [*pod.container.get("command", []), *pod.container.get("args", [])])

    def command_of(self, pod: Pod, argv: list[str]) -> list[str]:
        if not argv or argv[0] != "python":
            raise RehearsalError(f"{pod.name}: the image runs `python ...`, not {argv[:1]}")
        return [sys.executable, *(self._translate(pod, a) for a in argv[1:])]

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, name: str) -> Pod:
        pod = self.pods[name]
        pod.directory.mkdir(parents=True, exist_ok=True)
        self._mount_volumes(pod)
        pod.log = pod.log_path.open("ab")
        pod.process = subprocess.Popen(
            self.command(pod),
            cwd=REPO_ROOT,
            env=self.environment(pod),
            stdin=subprocess.DEVNULL,
            stdout=pod.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return pod

    def run_to_completion(self, name: str, timeout_s: float = 60.0) -> tuple[int, str]:
        pod = self.start(name)
        assert pod.process is not None
        try:
            code = pod.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RehearsalError(f"{name} still running after {timeout_s}s\n{pod.log_tail()}") from exc
        return code, pod.log_path.read_text(errors="replace")

    def hook_pods(self, hook: str) -> list[str]:
        """Names of the pods of one hook, in hook-weight order."""
        selected = [p for p in self.pods.values() if hook in hooks(p.manifest)]
        weight = lambda p: int(p.manifest["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))  # noqa: E731
        return [p.name for p in sorted(selected, key=weight)]

    def deployments(self) -> list[str]:
        return [p.name for p in self.pods.values() if p.manifest["kind"] == "Deployment"]

    def probe(
        self, name: str, kind: str = "readinessProbe", timeout_s: float | None = None
    ) -> tuple[int, str]:
        """Run one of the container's probes as the kubelet would: (0 pass or 1 fail, what it saw)."""
        pod = self.pods[name]
        probe = pod.container[kind]
        if "httpGet" not in probe:
            raise RehearsalError(f"{name}: {kind} is not an httpGet probe ({sorted(probe)})")
        get = probe["httpGet"]
        if get.get("scheme", "HTTP") != "HTTP" or "host" in get:
            raise RehearsalError(f"{name}: only plain HTTP probes of the pod's own IP are rehearsed")
        status, body = self.http_get(
            name, get["port"], get.get("path", "/"), timeout_s or float(probe.get("timeoutSeconds", 1))
        )
        url = f"http://{pod.ip}:{container_port(pod.spec, get['port'])}{get.get('path', '/')}"
        return (0 if 200 <= status < 400 else 1), f"{url}: HTTP {status}" if status else f"{url}: {body}"

    def http_get(self, name: str, port: int | str, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
        """GET `path` on a pod's own IP and (named) container port: (status, body); status 0 and
        the error when nothing answered."""
        pod = self.pods[name]
        url = f"http://{pod.ip}:{container_port(pod.spec, port)}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                return int(reply.status), reply.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)

    def wait_ready(self, name: str, timeout_s: float = 60.0) -> None:
        """Run the container's own readinessProbe until it passes."""
        pod = self.pods[name]
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if pod.process is None or pod.process.poll() is not None:
                raise RehearsalError(f"{name} exited while starting\n{pod.log_tail()}")
            code, last = self.probe(name, "readinessProbe")
            if code == 0:
                return
            time.sleep(0.2)
        raise RehearsalError(f"{name} not ready after {timeout_s}s (last: {last.strip()})\n{pod.log_tail()}")

    def stop(self) -> dict[str, int]:
        """SIGTERM every running pod, wait up to its terminationGracePeriodSeconds, SIGKILL the rest."""
        codes: dict[str, int] = {}
        running = [p for p in self.pods.values() if p.process is not None and p.process.poll() is None]
        for pod in running:
            assert pod.process is not None
            pod.process.send_signal(signal.SIGTERM)
        for pod in self.pods.values():
            if pod.process is None:
                continue
            grace = float(pod.spec.get("terminationGracePeriodSeconds", 30))
            try:
                codes[pod.name] = pod.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pod.process.kill()
                codes[pod.name] = pod.process.wait()
            if pod.log is not None:
                pod.log.close()
        return codes


def dns_names(name: str) -> set[str]:
    return {name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"}
