"""The chart's names shared by the deploy tests: its services and labels, the Kubernetes versions it
must be valid on, its values files, and readers of what its pods are given."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml

from deploy.k8s.render import Manifest
from tests.support.k8s import Endpoint, of_kind

# The newest Kubernetes whose schemas kubernetes-validate ships, and the oldest the chart
# supports (Chart.yaml kubeVersion): every object must be valid on both.
KUBE_VERSIONS = (kubernetes_validate.latest_version(), "1.30.0")
# Kinds from CRDs whose schemas kubernetes-validate does not ship (Gateway API's HTTPRoute):
# test_the_portal_is_reached_by_ingress_or_http_route_at_its_public_host checks them.
CRD_GROUPS = ("gateway.networking.k8s.io/",)
SERVICES = ("ingest", "rules", "score", "query")
RELEASE_LABELS = {"app.kubernetes.io/name": "egret", "app.kubernetes.io/instance": "egret"}
OUTSIDE = Endpoint({}, external=True)

RenderObjects = Callable[[dict[str, Any]], list[Manifest]]


def load_values(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    return dict(loaded) if loaded else {}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def component(labels: dict[str, str]) -> str:
    return labels["app.kubernetes.io/component"]


def migration_jobs(manifests: list[Manifest]) -> list[Manifest]:
    """The migration Jobs (not the config-apply Job: test_chart_config_apply.py)."""
    return [j for j in of_kind(manifests, "Job") if component(j["metadata"]["labels"]) == "migrate"]


def endpoint(service: str) -> Endpoint:
    """A pod of one of the release's components, as a NetworkPolicy sees it."""
    return Endpoint({**RELEASE_LABELS, "app.kubernetes.io/component": service})
