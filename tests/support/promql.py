"""The metrics Egret's services export, and the PromQL the chart's alerts and dashboard ask of them.

METRICS_BY_SERVICE is the catalogue of docs/operations.md ("What is exported"), by the service
whose admin port serves each metric, named as PromQL names them: counters with their `_total`,
histograms by their base name (Prometheus stores `<name>_bucket`, `_sum` and `_count`).
`referenced_metrics` reads the metric names out of one expression; `alert_expressions` and
`dashboard_expressions` give every expression the chart ships, so a test can hold them against
the catalogue (tests/deploy/test_chart_metrics.py) or against a live scrape of the services.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import promql_parser
import yaml

from deploy.k8s.render import CHART_DIR, render

HISTOGRAMS = frozenset(
    {
        "rpc_server_duration_milliseconds",
        "egret_db_query_duration_seconds",
        "egret_rules_batch_duration_seconds",
        "egret_rules_backtest_duration_seconds",
    }
)

_EVERY_SERVICE = frozenset(
    {
        "rpc_server_duration_milliseconds",
        "egret_ready",
        "egret_tls_certificate_not_after_seconds",
        "db_client_connections_usage_connections",
        "egret_db_query_duration_seconds",
        "process_cpu_time_seconds_total",
        "process_memory_usage_bytes",
        "cpython_gc_collections_total",
        "egret_audit_chain_intact",
    }
)
_OUTBOX = frozenset(
    {
        "egret_outbox_waiting",
        "egret_outbox_oldest_age_seconds",
        "egret_outbox_sent_total",
        "egret_outbox_send_failures_total",
        "egret_outbox_retries_total",
    }
)

METRICS_BY_SERVICE: Mapping[str, frozenset[str]] = {
    # ingest's outbox carries accepted events to rules.
    "ingest": _EVERY_SERVICE | _OUTBOX | {"egret_ingest_events_total"},
    # rules' outbox carries outcomes and reversals to score.
    "rules": _EVERY_SERVICE
    | _OUTBOX
    | {
        "egret_rules_batches_total",
        "egret_rules_batch_duration_seconds",
        "egret_rules_firings_total",
        "egret_rules_dead_letters_parked_total",
        "egret_rules_dead_letters_redriven_total",
        "egret_rules_dead_letters_waiting",
        "egret_rules_active_version",
        "egret_rules_window_cache_subjects",
        "egret_rules_window_cache_memory_bytes",
        "egret_rules_window_cache_reads_total",
        "egret_rules_backtests_running",
        "egret_rules_backtest_duration_seconds",
    },
    "score": _EVERY_SERVICE
    | {
        "egret_score_outcomes_applied_total",
        "egret_score_reversals_total",
        "egret_score_subjects",
        "egret_score_disputes_open",
        "egret_score_disputes_overdue",
        "egret_score_repairs_overdue",
    },
    "query": _EVERY_SERVICE
    | {
        "egret_query_reads_total",
        "egret_query_access_log_written_total",
        "egret_query_access_log_failed_total",
    },
}

EXPORTED_METRICS: frozenset[str] = frozenset().union(*METRICS_BY_SERVICE.values())

# Series Prometheus writes itself for every target it scrapes: no service exports them, so
# referenced_metrics leaves them out.
SCRAPE_SERIES = frozenset({"up"})

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Grafana's interval variables are not PromQL; each stands for a duration when the panel runs.
_GRAFANA_INTERVALS = re.compile(
    r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}"
)
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*[A-Za-z_][A-Za-z0-9_]*\)$")


def referenced_metrics(expr: str) -> set[str]:
    """The metric names an expression selects: a histogram's `_bucket`/`_sum`/`_count` series by
    the histogram's name, Prometheus's own scrape series (`up`) left out. A selector without a
    metric name is refused: every expression the chart ships names what it reads."""
    names: set[str] = set()
    unnamed: list[str] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name is None:
                unnamed.append(str(node.matchers))
            else:
                names.add(base_name(node.name))

    promql_parser.walk(promql_parser.parse(expr), visit)
    if unnamed:
        raise ValueError(f"selector without a metric name in {expr!r}: {unnamed}")
    return names - SCRAPE_SERIES


def base_name(series: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in HISTOGRAMS:
            return series.removesuffix(suffix)
    return series


def alert_expressions(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Alert name → its `expr`, from the chart's PrometheusRule rendered with `values` (default:
    the chart's defaults with metrics.prometheusRule.enabled)."""
    chosen = dict(values) if values is not None else {"metrics": {"prometheusRule": {"enabled": True}}}
    rendered = render(chosen)
    (rule,) = [
        doc
        for doc in yaml.safe_load_all(rendered["egret/templates/prometheusrule.yaml"])
        if doc and doc["kind"] == "PrometheusRule"
    ]
    return {
        r["alert"]: str(r["expr"]) for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r
    }


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard the chart ships (files/dashboards/egret.json)."""
    loaded: dict[str, Any] = json.loads((CHART_DIR / "files" / "dashboards" / "egret.json").read_text())
    return loaded


def dashboard_expressions() -> dict[str, str]:
    """ "<panel title> <refId>" → the target's PromQL, and "variable <name>" → the series selector
    a query variable's label_values() reads, with Grafana's $__rate_interval (and kin) as 5m. The
    template variables in label matchers ("$namespace") stay: they are strings to PromQL."""
    found: dict[str, str] = {}
    board = dashboard()
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.match(str(query).strip())
        if match is None:
            raise ValueError(
                f"variable {variable['name']}: not a label_values(selector, label) query: {query!r}"
            )
        found[f"variable {variable['name']}"] = match["selector"]
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found[f"{panel['title']} {target['refId']}"] = _GRAFANA_INTERVALS.sub("5m", target["expr"])
    return found
