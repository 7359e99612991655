"""Small readers of rendered Kubernetes objects, shared by the chart tests and the rehearsal."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from deploy.k8s.render import Manifest, hooks

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "Pod")
PORTAL = "portal"


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    (found,) = [m for m in of_kind(manifests, kind) if m["metadata"]["name"] == name]
    return found


def pod_template(manifest: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod metadata, pod spec) of a workload object or a bare Pod."""
    if manifest["kind"] == "Pod":
        return manifest["metadata"], manifest["spec"]
    template = manifest["spec"]["template"]
    return template["metadata"], template["spec"]


def pods(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any], dict[str, Any]]]:
    """(object, pod metadata, pod spec) of every object that runs a pod."""
    for manifest in manifests:
        if manifest["kind"] in WORKLOAD_KINDS:
            metadata, spec = pod_template(manifest)
            yield manifest, metadata, spec


def component_of(manifest: Manifest) -> str:
    return str(manifest["metadata"]["labels"]["app.kubernetes.io/component"])


def services_deployments(manifests: list[Manifest]) -> list[Manifest]:
    """The gRPC services' Deployments (the portal, an HTTP front end, is checked on its own)."""
    return [m for m in of_kind(manifests, "Deployment") if not hooks(m) and component_of(m) != PORTAL]


def portal_deployments(manifests: list[Manifest]) -> list[Manifest]:
    return [m for m in of_kind(manifests, "Deployment") if component_of(m) == PORTAL]


def matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels form, or a plain map) selects `labels`."""
    if selector is None:
        return False
    if "matchExpressions" in selector:
        raise NotImplementedError("matchExpressions")
    wanted = selector.get("matchLabels", selector)
    return all(labels.get(k) == v for k, v in dict(wanted).items())


def container_port(spec: Mapping[str, Any], port: int | str) -> int:
    """A container port number from a number or a port name."""
    if isinstance(port, int):
        return port
    for container in spec["containers"]:
        for candidate in container.get("ports", []):
            if candidate.get("name") == port:
                return int(candidate["containerPort"])
    raise KeyError(f"no container port named {port!r}")


@dataclass(frozen=True)
class Endpoint:
    """A pod of the release, as a NetworkPolicy sees it."""

    labels: Mapping[str, str]
    external: bool = False  # outside the release's namespace pods (e.g. the database, a client)
    # An external endpoint's address, for ipBlock peers; None: one no ipBlock names.
    ip: str | None = None


def _peer_admits(peer: Mapping[str, Any], other: Endpoint) -> bool:
    if "podSelector" in peer and "namespaceSelector" not in peer:
        return not other.external and matches(peer["podSelector"], other.labels)
    if "ipBlock" in peer:
        if not other.external or other.ip is None:
            return False
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    # namespaceSelector peers stand for things outside the namespace here.
    return other.external


def _rule_admits(rule: Mapping[str, Any], peers_key: str, other: Endpoint, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if ports and not any(
        int(p["port"]) == port and p.get("protocol", "TCP") == protocol for p in ports if "port" in p
    ):
        return False
    peers = rule.get(peers_key)
    return not peers or any(_peer_admits(peer, other) for peer in peers)


def network_allows(
    policies: list[Manifest], source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP"
) -> bool:
    """Whether `source` may connect to `destination`:`port` (its egress and the ingress there)."""

    def direction(pod: Endpoint, policy_type: str, rules_key: str, peers_key: str, other: Endpoint) -> bool:
        if pod.external:
            return True  # not ours to police
        selecting = [
            p
            for p in policies
            if policy_type in p["spec"].get("policyTypes", ["Ingress"])
            and matches(p["spec"]["podSelector"], pod.labels)
        ]
        if not selecting:
            return True
        return any(
            _rule_admits(rule, peers_key, other, port, protocol)
            for p in selecting
            for rule in p["spec"].get(rules_key) or []
        )

    return direction(source, "Egress", "egress", "to", destination) and direction(
        destination, "Ingress", "ingress", "from", source
    )
