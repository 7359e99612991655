"""The chart's NetworkPolicies: deny by default, the pipeline and its database, DNS and the
collector, the clients when named, the portal's way in and out, and turning them off."""

from __future__ import annotations

from deploy.k8s.render import CHART_DIR
from tests.support.chart import OUTSIDE, SERVICES, RenderObjects, endpoint, load_values
from tests.support.k8s import Endpoint, network_allows, of_kind

PIPELINE = [("ingest", "rules", 50052), ("rules", "score", 50053), ("query", "rules", 50052)]
FORBIDDEN = [
    ("ingest", "score", 50053),
    ("query", "score", 50053),
    ("rules", "ingest", 50051),
    ("score", "rules", 50052),
    ("score", "query", 50054),
    ("migrate", "rules", 50052),
]


def test_network_policy_denies_by_default_and_allows_the_pipeline(render_objects: RenderObjects) -> None:
    policies = of_kind(render_objects({}), "NetworkPolicy")
    for source, destination, port in PIPELINE:
        assert network_allows(policies, endpoint(source), endpoint(destination), port), (source, destination)
    for source, destination, port in FORBIDDEN:
        assert not network_allows(policies, endpoint(source), endpoint(destination), port), (
            source,
            destination,
        )
    for pod in (*SERVICES, "migrate"):
        # The database only at its configured addresses (the default is a placeholder).
        assert network_allows(policies, endpoint(pod), Endpoint({}, external=True, ip="192.0.2.1"), 5432), pod
        assert not network_allows(
            policies, endpoint(pod), Endpoint({}, external=True, ip="10.1.2.3"), 5432
        ), pod
        assert not network_allows(policies, endpoint(pod), OUTSIDE, 5432), pod
        assert network_allows(policies, endpoint(pod), OUTSIDE, 53, "UDP"), pod  # DNS
        assert not network_allows(policies, endpoint(pod), OUTSIDE, 443), pod
        assert not network_allows(policies, endpoint(pod), OUTSIDE, 4317), pod  # tracing is off
    # allowExternal: departments and readers reach ingest and query, nobody outside reaches the rest.
    assert network_allows(policies, OUTSIDE, endpoint("ingest"), 50051)
    assert network_allows(policies, OUTSIDE, endpoint("query"), 50054)
    assert not network_allows(policies, OUTSIDE, endpoint("ingest"), 50052)
    assert not network_allows(policies, OUTSIDE, endpoint("rules"), 50052)
    assert not network_allows(policies, OUTSIDE, endpoint("score"), 50053)
    for service, port in (("ingest", 50051), ("rules", 50052), ("score", 50053), ("query", 50054)):
        assert network_allows(policies, endpoint("test"), endpoint(service), port), service


def test_network_policy_allows_the_collector_and_restricts_clients_when_configured(
    render_objects: RenderObjects,
) -> None:
    policies = of_kind(
        render_objects(load_values(CHART_DIR / "ci" / "high-availability-values.yaml")), "NetworkPolicy"
    )
    for service in (*SERVICES, "migrate"):
        if service != "migrate":
            assert network_allows(policies, endpoint(service), OUTSIDE, 4317), service
        database, elsewhere = (Endpoint({}, external=True, ip=ip) for ip in ("10.20.7.9", "10.21.0.1"))
        assert network_allows(policies, endpoint(service), database, 5432), service
        assert not network_allows(policies, endpoint(service), elsewhere, 5432), service
    client = Endpoint({"egret-client": "true"})
    stranger = Endpoint({"app": "something-else"})
    assert network_allows(policies, client, endpoint("query"), 50054)
    assert not network_allows(policies, stranger, endpoint("query"), 50054)
    assert network_allows(policies, OUTSIDE, endpoint("ingest"), 50051)  # the departments namespace


def test_network_policies_can_be_turned_off(render_objects: RenderObjects) -> None:
    assert of_kind(render_objects({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []
    assert of_kind(render_objects({}), "NetworkPolicy")


# Ingest for the auditors' audit chain page only (its other RPCs refuse the portal's callers).
PORTAL_CALLS = [
    ("portal", "query", 50054),
    ("portal", "score", 50053),
    ("portal", "rules", 50052),
    ("portal", "ingest", 50051),
]


def test_network_policy_lets_the_portal_reach_the_services_and_the_identity_provider_only(
    render_objects: RenderObjects,
) -> None:
    policies = of_kind(render_objects({}), "NetworkPolicy")
    portal = endpoint("portal")
    for source, destination, port in PORTAL_CALLS:
        assert network_allows(policies, endpoint(source), endpoint(destination), port), destination
    assert not network_allows(policies, portal, endpoint("ingest"), 8080)  # a gRPC port only
    assert not network_allows(policies, portal, Endpoint({}, external=True, ip="192.0.2.1"), 5432)  # database
    assert network_allows(policies, portal, Endpoint({}, external=True, ip="192.0.2.2"), 443)  # the provider
    assert not network_allows(policies, portal, Endpoint({}, external=True, ip="10.9.9.9"), 443)
    assert network_allows(policies, portal, OUTSIDE, 53, "UDP")
    # People reach its HTTP port from anywhere by default, nothing else of it.
    assert network_allows(policies, OUTSIDE, portal, 8080)
    assert not network_allows(policies, OUTSIDE, portal, 50054)
    assert network_allows(policies, endpoint("test"), portal, 8080)
    # Nobody else gets the portal's way in to score and rules.
    assert not network_allows(policies, endpoint("ingest"), endpoint("score"), 50053)

    ha = of_kind(
        render_objects(load_values(CHART_DIR / "ci" / "high-availability-values.yaml")), "NetworkPolicy"
    )
    assert network_allows(ha, OUTSIDE, portal, 8080)  # the ingress controller's namespace
    assert not network_allows(ha, Endpoint({"app": "something-else"}), portal, 8080)
    assert network_allows(ha, endpoint("test"), portal, 8080)
    # query and ingest admit the portal when they admit only named clients.
    assert network_allows(ha, portal, endpoint("query"), 50054)
    assert network_allows(ha, portal, endpoint("ingest"), 50051)
    assert network_allows(ha, portal, Endpoint({}, external=True, ip="203.0.113.5"), 443)
    assert network_allows(ha, portal, OUTSIDE, 4317)  # the collector
