"""The chart's metrics wiring: the admin port and its probes, the Prometheus Operator objects, the
alerts and their runbooks, the Grafana dashboard, and the NetworkPolicy rule letting Prometheus in.

Everything renders offline (helm-python-sdk). Kubernetes' own kinds are checked with
kubernetes-validate; the Prometheus Operator's kinds with the hand-written schemas of
tests/support/monitoring_crds.py (its docstring says why). Every PromQL expression parses with
promql-parser and names only metrics of the catalogue (tests/support/promql.py); a live scrape of
the services checks that catalogue itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import pytest

from deploy.k8s.render import CHART_DIR, REPO_ROOT, Manifest
from tests.support.chart import SERVICES, RenderObjects
from tests.support.k8s import (
    Endpoint,
    container_port,
    matches,
    named,
    network_allows,
    of_kind,
    pod_template,
    services_deployments,
)
from tests.support.monitoring_crds import validate as validate_monitoring
from tests.support.promql import (
    EXPORTED_METRICS,
    alert_expressions,
    dashboard,
    dashboard_expressions,
    referenced_metrics,
)

ALERTS = {
    "EgretPipelineLagHigh",
    "EgretDeadLettersWaiting",
    "EgretHighErrorRatio",
    "EgretDisputesPastDeadline",
    "EgretRepairDecisionsOverdue",
    "EgretAuditChainBroken",
    "EgretCertificateExpiringSoon",
    "EgretNotReady",
}
OPERATIONS = REPO_ROOT / "docs" / "operations.md"
ALL_ON = {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}
WITH_SERVICE_MONITOR = {"metrics": {"serviceMonitor": {"enabled": True}, **ALL_ON}}
WITH_POD_MONITOR = {"metrics": {"podMonitor": {"enabled": True}, **ALL_ON}}
METRICS_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector with matchLabels and In/NotIn matchExpressions (tests.support.k8s.matches
    knows matchLabels only)."""
    if not matches({"matchLabels": selector.get("matchLabels", {})}, labels):
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        inside = value in expression["values"]
        if (expression["operator"], inside) in (("In", False), ("NotIn", True)):
            return False
    return True


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings (lower case, punctuation dropped, spaces as -)."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return anchors


# -- the admin port and the probes ----------------------------------------------------------


@pytest.mark.parametrize("port", [9464, 9500])
def test_probes_are_kubelet_http_gets_of_the_admin_port(render_objects: RenderObjects, port: int) -> None:
    manifests = render_objects({"metrics": {"port": port}, "services": {"rules": {"shards": 2}}})
    deployments = services_deployments(manifests)
    assert len(deployments) == 5  # rules in two shards
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        _, spec = pod_template(deployment)
        (container,) = spec["containers"]
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["admin"] == port, name
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["EGRET_ADMIN_ADDRESS"] == f"0.0.0.0:{port}", name
        # No interpreter per check: the kubelet asks /readyz (database reachable, not stopping)
        # before and while routing traffic, and /healthz (the process answers) to restart.
        paths = {
            kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        assert paths == {
            "startupProbe": {"path": "/readyz", "port": "admin"},
            "readinessProbe": {"path": "/readyz", "port": "admin"},
            "livenessProbe": {"path": "/healthz", "port": "admin"},
        }, name
        assert container_port(spec, "admin") == port
        assert not any("exec" in container[kind] for kind in paths), name


def test_the_admin_port_stays_off_the_grpc_services(render_objects: RenderObjects) -> None:
    """ingest's and query's Services may be LoadBalancers; the plain-HTTP admin port is not on them."""
    manifests = render_objects(WITH_SERVICE_MONITOR)
    for service in of_kind(manifests, "Service"):
        ports = {p["name"] for p in service["spec"]["ports"]}
        if service["metadata"]["name"].endswith("-metrics"):
            assert ports == {"admin"}
            assert service["spec"]["clusterIP"] == "None"
        else:
            assert "admin" not in ports, service["metadata"]["name"]


# -- the Prometheus Operator objects ---------------------------------------------------------


@pytest.mark.parametrize("values", [WITH_SERVICE_MONITOR, WITH_POD_MONITOR], ids=["service", "pod"])
def test_helm_lint_strict_passes_with_the_metrics_objects(values: dict[str, Any]) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, kube_version="v1.35.0")
    assert ([m for m in report["messages"] if m["severity"] >= 2], report["errors"]) == ([], [])


def test_no_metrics_object_renders_by_default(render_objects: RenderObjects) -> None:
    manifests = render_objects({})
    assert not [m for m in manifests if m["kind"] in METRICS_KINDS]
    assert not [m for m in of_kind(manifests, "Service") if m["metadata"]["name"].endswith("-metrics")]
    assert not [m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"] == "egret-dashboard"]


@pytest.mark.parametrize("values", [WITH_SERVICE_MONITOR, WITH_POD_MONITOR], ids=["service", "pod"])
def test_metrics_objects_are_valid(render_objects: RenderObjects, values: dict[str, Any]) -> None:
    manifests = render_objects(values)
    kinds = {m["kind"] for m in manifests}
    monitor = "ServiceMonitor" if "serviceMonitor" in values["metrics"] else "PodMonitor"
    assert {monitor, "PrometheusRule"} <= kinds
    assert not (METRICS_KINDS - {monitor, "PrometheusRule"}) & kinds
    for manifest in manifests:
        if manifest["kind"] in METRICS_KINDS:
            validate_monitoring(manifest)
        else:
            kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize(
    "broken",
    [
        # A misspelt key, a bad duration and a bad relabel action are caught, not passed over.
        lambda m: m["spec"]["endpoints"][0].update(scrapTimeout="10s"),
        lambda m: m["spec"]["endpoints"][0].update(interval="30 seconds"),
        lambda m: m["spec"]["endpoints"][0]["relabelings"][0].update(action="rename"),
    ],
)
def test_the_monitoring_schemas_refuse_what_the_operator_would(
    render_objects: RenderObjects, broken: Callable[[Manifest], None]
) -> None:
    (monitor,) = of_kind(render_objects(WITH_SERVICE_MONITOR), "ServiceMonitor")
    broken(monitor)
    with pytest.raises(jsonschema.ValidationError):
        validate_monitoring(monitor)


def test_the_service_monitor_reaches_every_pods_admin_port(render_objects: RenderObjects) -> None:
    manifests = render_objects({**WITH_SERVICE_MONITOR, "services": {"rules": {"shards": 3}}})
    (monitor,) = of_kind(manifests, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["scheme"]) == ("admin", "/metrics", "http")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["egret"]}
    scraped = [
        s
        for s in of_kind(manifests, "Service")
        if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    deployments = services_deployments(manifests)
    # One metrics Service per workload (each rules shard its own), each selecting its pods only.
    assert len(scraped) == len(deployments) == 6
    for service in scraped:
        (port,) = service["spec"]["ports"]
        (selected,) = [
            d for d in deployments if matches(service["spec"]["selector"], pod_template(d)[0]["labels"])
        ]
        assert container_port(pod_template(selected)[1], port["targetPort"]) == 9464
    assert endpoint["relabelings"][0] == {
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
        "targetLabel": "job",
        "replacement": "egret-$1",
    }


def test_the_pod_monitor_selects_the_four_services_pods_only(render_objects: RenderObjects) -> None:
    manifests = render_objects(WITH_POD_MONITOR)
    (monitor,) = of_kind(manifests, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "admin"
    chosen = {
        m["metadata"]["name"]
        for m in manifests
        if m["kind"] in ("Deployment", "Job", "Pod")
        and selects(monitor["spec"]["selector"], pod_template(m)[0]["labels"])
    }
    assert chosen == {f"egret-{s}" for s in SERVICES}


def test_monitor_values_land_where_documented(render_objects: RenderObjects) -> None:
    drop = {"sourceLabels": ["__name__"], "regex": "cpython_gc_.*", "action": "drop"}
    extra = {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
    settings: dict[str, Any] = {
        "interval": "15s",
        "scrapeTimeout": "5s",
        "labels": {"release": "kube-prometheus"},
    }
    settings |= {"relabelings": [extra], "metricRelabelings": [drop]}
    for key, kind, endpoints in (
        ("serviceMonitor", "ServiceMonitor", "endpoints"),
        ("podMonitor", "PodMonitor", "podMetricsEndpoints"),
    ):
        (monitor,) = of_kind(render_objects({"metrics": {key: {"enabled": True, **settings}}}), kind)
        validate_monitoring(monitor)
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
        (endpoint,) = monitor["spec"][endpoints]
        assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")
        # The chart's job relabeling first, the operator's own after it.
        assert [r.get("targetLabel") for r in endpoint["relabelings"]] == ["job", "node"]
        assert endpoint["metricRelabelings"] == [drop]


def test_both_monitors_at_once_are_refused(render_objects: RenderObjects) -> None:
    with pytest.raises(helm.HelmError, match="not both"):
        render_objects({"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}})


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "interval"),
        ({"metrics": {"prometheusRule": {"thresholds": {"errorRatio": 5}}}}, "errorRatio"),
        ({"metrics": {"prometheusRule": {"treshold": {}}}}, "treshold"),
        ({"metrics": {"dashboard": {"labels": {"grafana_dashboard": 1}}}}, "grafana_dashboard"),
        ({"metrics": {"port": 0}}, "port"),
    ],
)
def test_the_values_schema_checks_the_metrics_block(
    render_objects: RenderObjects, values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(helm.HelmError, match=complaint):
        render_objects(values)


# -- the alerts -------------------------------------------------------------------------------


def test_the_alerts_parse_and_read_only_exported_metrics() -> None:
    alerts = alert_expressions()
    assert set(alerts) == ALERTS
    for name, expr in alerts.items():
        promql_parser.parse(expr)
        used = referenced_metrics(expr)
        assert used, name
        assert used <= EXPORTED_METRICS, (name, used - EXPORTED_METRICS)


def test_every_alert_is_scoped_to_the_release_and_has_a_runbook(render_objects: RenderObjects) -> None:
    manifests = render_objects({"metrics": {"prometheusRule": {"enabled": True}}})
    (rule,) = of_kind(manifests, "PrometheusRule")
    anchors = github_anchors(OPERATIONS.read_text())
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            name = alert["alert"]
            assert alert["labels"]["severity"] in ("warning", "critical"), name
            assert alert["for"], name
            assert {"summary", "description", "runbook_url"} <= set(alert["annotations"]), name
            url, _, anchor = alert["annotations"]["runbook_url"].partition("#")
            assert url == "https://example.org/egret/docs/operations.md", name
            assert anchor == name.lower(), name
            assert anchor in anchors, name
            # Every selector names this release's namespace and services.
            for selector in re.findall(r"\{[^}]*\}", alert["expr"].replace("{{", "")):
                assert 'namespace="egret"' in selector, (name, selector)
                assert 'job=~"egret-(ingest|rules|score|query)"' in selector, (name, selector)


def test_thresholds_and_labels_reach_the_alerts() -> None:
    values = {
        "fullnameOverride": "city",
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "alertLabels": {"team": "platform"},
                "thresholds": {"pipelineLagSeconds": 120, "errorRatio": 0.01, "certificateDays": 7},
            }
        },
    }
    alerts = alert_expressions(values)
    assert alerts["EgretPipelineLagHigh"].endswith("> 120")
    assert alerts["EgretHighErrorRatio"].rstrip().endswith("> 0.01")
    assert alerts["EgretCertificateExpiringSoon"].endswith(f"< {7 * 86400}")
    assert 'job=~"city-(ingest|rules|score|query)"' in alerts["EgretNotReady"]


def test_additional_rule_groups_are_appended(render_objects: RenderObjects) -> None:
    extra = {"name": "city", "rules": [{"alert": "CityCustom", "expr": "egret_ready == 0", "for": "1m"}]}
    values = {"metrics": {"prometheusRule": {"enabled": True, "additionalGroups": [extra]}}}
    (rule,) = of_kind(render_objects(values), "PrometheusRule")
    validate_monitoring(rule)
    assert rule["spec"]["groups"][-1] == extra


# -- the dashboard ----------------------------------------------------------------------------


def test_the_dashboard_configmap_carries_the_sidecar_label_and_the_json(
    render_objects: RenderObjects,
) -> None:
    values = {"metrics": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "Egret"}}}}
    config_map = named(render_objects(values), "ConfigMap", "egret-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Egret"}
    assert json.loads(config_map["data"]["egret.json"]) == dashboard()


def test_the_dashboard_is_grafana_json_over_a_chosen_prometheus() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job"} <= set(variables)
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert len(rows) >= 6, rows
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Scoped to the chosen namespace and services.
            assert 'namespace="$namespace"' in target["expr"], panel["title"]
            assert 'job=~"$job"' in target["expr"], panel["title"]


def test_every_dashboard_query_parses_and_reads_only_exported_metrics() -> None:
    expressions = dashboard_expressions()
    assert len(expressions) > 30
    for where, expr in expressions.items():
        promql_parser.parse(expr)
        used = referenced_metrics(expr)
        assert used, where
        assert used <= EXPORTED_METRICS, (where, used - EXPORTED_METRICS)


def test_referenced_metrics_names_histograms_by_their_base_name() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le) (rate(rpc_server_duration_milliseconds_bucket[5m])))"
        " / rate(egret_outbox_sent_total[5m]) + on() group_left up"
    )
    assert referenced_metrics(expr) == {"rpc_server_duration_milliseconds", "egret_outbox_sent_total"}
    # Only a catalogued histogram loses its suffix; another _count stays a name of its own.
    assert referenced_metrics("x_count") == {"x_count"}
    with pytest.raises(ValueError, match="without a metric name"):
        referenced_metrics('{job="egret-ingest"}')


# -- the network policy -----------------------------------------------------------------------


def test_prometheus_reaches_the_admin_port_and_nothing_else_does(render_objects: RenderObjects) -> None:
    prometheus = Endpoint({"app.kubernetes.io/name": "prometheus"}, external=True)
    portal = Endpoint({"app.kubernetes.io/name": "egret", "app.kubernetes.io/instance": "egret",
                       "app.kubernetes.io/component": "portal"})  # fmt: skip
    manifests = render_objects({})
    policies = of_kind(manifests, "NetworkPolicy")
    for deployment in services_deployments(manifests):
        target = Endpoint(pod_template(deployment)[0]["labels"])
        assert network_allows(policies, prometheus, target, 9464), deployment["metadata"]["name"]
        assert not network_allows(policies, portal, target, 9464), deployment["metadata"]["name"]
    rules = Endpoint(pod_template(named(manifests, "Deployment", "egret-rules"))[0]["labels"])
    assert not network_allows(policies, prometheus, rules, 50052)  # the scrape rule opens the admin port only
    (scrape,) = [
        rule
        for policy in policies
        for rule in policy["spec"].get("ingress", [])
        if policy["metadata"]["name"] == "egret-rules"
        and rule["ports"] == [{"port": 9464, "protocol": "TCP"}]
    ]
    assert scrape["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    closed = of_kind(render_objects({"metrics": {"networkPolicy": {"from": []}}}), "NetworkPolicy")
    assert not network_allows(closed, prometheus, rules, 9464)
