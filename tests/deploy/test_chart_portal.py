"""The portal's objects in the chart: its Deployment, Service and PDB, its certificate, token and
secrets, its settings, its Ingress or HTTPRoute, and leaving it out."""

from __future__ import annotations

from typing import Any

import yaml

from deploy.k8s.render import CHART_DIR, Manifest
from tests.support.chart import RenderObjects, env_of, load_values
from tests.support.k8s import matches, named, of_kind, pod_template, portal_deployments


def portal_of(manifests: list[Manifest]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(pod spec, container, env) of the portal's Deployment."""
    (deployment,) = portal_deployments(manifests)
    _, spec = pod_template(deployment)
    (container,) = spec["containers"]
    return spec, container, env_of(container)


def test_the_portal_runs_from_the_image_with_http_probes_a_service_and_a_pdb(
    rendered: list[Manifest],
) -> None:
    (deployment,) = portal_deployments(rendered)
    metadata, spec = pod_template(deployment)
    container = spec["containers"][0]
    assert [*container["command"], *container["args"]] == ["python", "-m", "services.portal", "serve"]
    (port,) = container["ports"]
    assert port["name"] == "http"
    assert env_of(container)["EGRET_LISTEN_ADDRESS"] == f"0.0.0.0:{port['containerPort']}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Plain HTTP inside the pod network: the kubelet's own probe, on the portal's /healthz.
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    (service,) = [
        s for s in of_kind(rendered, "Service") if matches(s["spec"]["selector"], metadata["labels"])
    ]
    assert service["metadata"]["name"] == "egret-portal"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert [
        p
        for p in of_kind(rendered, "PodDisruptionBudget")
        if matches(p["spec"]["selector"], metadata["labels"])
    ]
    assert spec["serviceAccountName"] == "egret-portal"


def test_the_portal_calls_the_services_with_its_certificate_and_token(render_objects: RenderObjects) -> None:
    spec, container, env = portal_of(render_objects({}))
    assert (env["EGRET_QUERY_ADDRESS"], env["EGRET_SCORE_ADDRESS"], env["EGRET_RULES_ADDRESS"]) == (
        "egret-query:50054",
        "egret-score:50053",
        "egret-rules:50052",
    )
    assert env["EGRET_INSECURE"] == "false"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    files = {
        "EGRET_TLS_CA_FILE": ("tls", "egret-portal-tls", "ca.crt"),
        "EGRET_TLS_CERT_FILE": ("tls", "egret-portal-tls", "tls.crt"),
        "EGRET_TLS_KEY_FILE": ("tls", "egret-portal-tls", "tls.key"),
        "EGRET_SERVICE_TOKEN_FILE": ("service-token", "egret-portal-token", "token"),
        "EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE": ("oidc-client-secret", "egret-portal-oidc", "client-secret"),
        "EGRET_PORTAL_SESSION_SECRET_FILE": ("session-secret", "egret-portal-session", "session-secret"),
    }
    for setting, (volume, secret, key) in files.items():
        assert env[setting] == f"{mounts[volume]['mountPath']}/{key}", setting
        assert mounts[volume]["readOnly"] is True, setting
        assert volumes[volume]["secret"]["secretName"] == secret, setting
        assert key in {i["key"] for i in volumes[volume]["secret"]["items"]}, setting
    # Sign-in at the issuer whose tokens the services accept, unless told otherwise.
    assert env["EGRET_PORTAL_OIDC_ISSUER"] == "https://idp.example.org/realms/egret"
    assert env["EGRET_PORTAL_PUBLIC_URL"] == "https://credit.example.org"
    assert "EGRET_PORTAL_OIDC_CA_FILE" not in env
    # It verifies no token and reads no database: none of the services' keys reach it.
    assert not {n for n in env if n.startswith(("EGRET_JWT_", "EGRET_DATABASE", "EGRET_SUBJECT_KEY"))}
    assert env["OTEL_SERVICE_NAME"] == "egret-portal"

    sharded = portal_of(render_objects({"services": {"rules": {"shards": 3}}}))[2]
    assert sharded["EGRET_RULES_ADDRESS"] == "egret-rules-0:50052"


def test_the_portals_settings_follow_its_values(render_objects: RenderObjects) -> None:
    spec, container, env = portal_of(
        render_objects(load_values(CHART_DIR / "ci" / "existing-secrets-values.yaml"))
    )
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["oidc-client-secret"]["secret"]["secretName"] == "egret-portal-client"
    assert env["EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE"].endswith("/secret")
    assert volumes["session-secret"]["secret"]["secretName"] == "egret-portal-cookies"
    assert env["EGRET_PORTAL_SESSION_SECRET_FILE"].endswith("/keys")
    assert volumes["tls"]["secret"]["secretName"] == "egret-portal-client-cert"
    assert volumes["service-token"]["secret"]["secretName"] == "egret-portal-svc-token"
    assert env["EGRET_SERVICE_TOKEN_FILE"].endswith("/jwt")
    assert env["EGRET_PORTAL_OIDC_CLIENT_ID"] == "credit-website"
    # The provider's private CA from a ConfigMap.
    assert volumes["oidc-ca"]["configMap"]["name"] == "city-root-ca"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "oidc-ca"]
    assert env["EGRET_PORTAL_OIDC_CA_FILE"] == f"{mount['mountPath']}/root.pem"

    _, _, env = portal_of(render_objects(load_values(CHART_DIR / "ci" / "portal-gateway-values.yaml")))
    assert env["EGRET_PORTAL_OIDC_ISSUER"] == "https://login.city.example/realms/residents"
    assert env["EGRET_PORTAL_PUBLIC_URL"] == "https://credit.city.example"  # no trailing slash
    assert (env["EGRET_PORTAL_ROLE_CLAIM"], env["EGRET_PORTAL_SUBJECT_CLAIM"]) == (
        "realm_access.roles",
        "egret_subject",
    )
    assert env["EGRET_PORTAL_OIDC_SCOPE"] == "openid profile email"

    _, _, env = portal_of(render_objects({"portal": {"env": {"EGRET_PORTAL_DEFAULT_LANGUAGE": "en"}}}))
    assert env["EGRET_PORTAL_DEFAULT_LANGUAGE"] == "en"
    assert "EGRET_PORTAL_TRUSTED_PROXIES" not in env  # the portal's default: loopback only

    # Behind an ingress: the controller's pods name the client in X-Forwarded-For.
    _, _, env = portal_of(render_objects({"portal": {"trustedProxies": ["10.42.0.0/16", "192.0.2.9"]}}))
    assert env["EGRET_PORTAL_TRUSTED_PROXIES"] == "10.42.0.0/16,192.0.2.9"


def test_the_portal_is_reached_by_ingress_or_http_route_at_its_public_host(
    render_objects: RenderObjects,
) -> None:
    manifests = render_objects(load_values(CHART_DIR / "ci" / "high-availability-values.yaml"))
    service = named(manifests, "Service", "egret-portal")
    (ingress,) = of_kind(manifests, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [
        {"hosts": ["credit.city.example"], "secretName": "credit-city-example-tls"}
    ]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "credit.city.example"
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert of_kind(manifests, "HTTPRoute") == []

    manifests = render_objects(load_values(CHART_DIR / "ci" / "portal-gateway-values.yaml"))
    (route,) = of_kind(manifests, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [
        {"name": "city-gateway", "namespace": "gateway-system", "sectionName": "https"}
    ]
    assert route["spec"]["hostnames"] == ["credit.city.example"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"name": "egret-portal", "port": service["spec"]["ports"][0]["port"]}]
    assert route["metadata"]["annotations"] == {"example.org/owner": "city-web"}
    assert of_kind(manifests, "Ingress") == []
    assert of_kind(render_objects({}), "Ingress") == of_kind(render_objects({}), "HTTPRoute") == []


def test_the_portal_can_be_left_out(render_objects: RenderObjects) -> None:
    manifests = render_objects({"portal": {"enabled": False}, "secrets": {"create": False}})
    assert not [m for m in manifests if "portal" in m["metadata"]["name"]]
    text = yaml.safe_dump_all(manifests)
    assert "component: portal" not in text
    args = named(manifests, "Pod", "egret-test-health")["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("http://")]
    # Without a portal, development needs no portal secrets.
    development = load_values(CHART_DIR / "ci" / "development-values.yaml")
    del development["secrets"]["portal"]
    assert not portal_deployments(render_objects(development | {"portal": {"enabled": False}}))
