"""The chart with security.jwt.keys.format url: the four services fetch the identity provider's
JWKS (EGRET_JWT_JWKS_URL, EGRET_JWT_JWKS_CACHE_S) instead of mounting a keys Secret, and their
NetworkPolicies let them reach the provider (networkPolicy.identityProvider)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from deploy.k8s.render import CHART_DIR, Manifest, render
from kit.env import Env
from kit.settings import SecuritySettings
from tests.support.chart import CRD_GROUPS, KUBE_VERSIONS, OUTSIDE, SERVICES, RenderObjects, endpoint, env_of
from tests.support.k8s import Endpoint, of_kind, pod_template, services_deployments
from tests.support.k8s import network_allows as allows

JWKS_URL = "https://idp.example.org/realms/egret/protocol/openid-connect/certs"
IDP = Endpoint({}, external=True, ip="192.0.2.2")  # the chart's placeholder address
ELSEWHERE = Endpoint({}, external=True, ip="10.9.9.9")
FILE_SETTINGS = {"EGRET_JWT_JWKS_FILE", "EGRET_JWT_PUBLIC_KEY_FILE"}


def url_values(**jwt: Any) -> dict[str, Any]:
    return {"security": {"jwt": {"keys": {"format": "url"}, "jwksUrl": JWKS_URL, **jwt}}}


def containers_by_service(manifests: list[Manifest]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for deployment in services_deployments(manifests):
        _, spec = pod_template(deployment)
        service = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        found.setdefault(service, []).append(spec)
    return found


@pytest.mark.parametrize("sharded", [False, True], ids=["one-rules", "rules-shards"])
def test_the_services_get_the_url_and_cache_lifetime_and_no_keys_volume(
    render_objects: RenderObjects, sharded: bool
) -> None:
    values = url_values(jwksCacheSeconds=600)
    if sharded:
        values["services"] = {"rules": {"shards": 2}}
    specs = containers_by_service(render_objects(values))
    assert sorted(specs) == sorted(SERVICES)
    assert len(specs["rules"]) == (2 if sharded else 1)
    for service, pod_specs in specs.items():
        for spec in pod_specs:
            (container,) = spec["containers"]
            env = env_of(container)
            assert (env["EGRET_JWT_JWKS_URL"], env["EGRET_JWT_JWKS_CACHE_S"]) == (JWKS_URL, "600"), service
            assert not FILE_SETTINGS & set(env), service
            assert "jwt" not in {v["name"] for v in spec["volumes"]}, service
            assert "jwt" not in {m["name"] for m in container["volumeMounts"]}, service
            assert not any(m["mountPath"].endswith("/jwt") for m in container["volumeMounts"]), service


def test_the_rendered_settings_are_what_the_services_accept(render_objects: RenderObjects) -> None:
    """The JWT part of each service's environment, read by kit.settings as a service reads it."""
    for service, (spec, *_) in containers_by_service(render_objects(url_values())).items():
        env = env_of(spec["containers"][0])
        jwt_env = {k: str(v) for k, v in env.items() if k.startswith("EGRET_JWT_")}
        read = Env({**jwt_env, "EGRET_INSECURE": "false"})
        settings = SecuritySettings.read(read)
        assert read.problems == [], service
        assert (settings.jwt_jwks_url, settings.jwt_jwks_cache_s) == (JWKS_URL, 300.0), service
        assert (settings.jwt_jwks_file, settings.jwt_public_key_file) == (None, None), service


def test_the_default_still_mounts_the_jwks_file(render_objects: RenderObjects) -> None:
    for service, (spec, *_) in containers_by_service(render_objects({})).items():
        env = env_of(spec["containers"][0])
        assert env["EGRET_JWT_JWKS_FILE"] == "/var/run/secrets/egret/jwt/jwks.json", service
        assert not {"EGRET_JWT_JWKS_URL", "EGRET_JWT_JWKS_CACHE_S"} & set(env), service
        assert "jwt" in {v["name"] for v in spec["volumes"]}, service


def test_helm_lint_strict_is_clean_with_format_url() -> None:
    report = helm.lint(CHART_DIR, url_values(), strict=True, kube_version="v1.35.0")
    assert ([m for m in report["messages"] if m["severity"] >= 2], report["errors"]) == ([], [])


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_is_valid_kubernetes_with_format_url(
    render_objects: RenderObjects, kube_version: str
) -> None:
    manifests = render_objects(url_values(jwksCacheSeconds=60))
    assert len(manifests) > 20
    for manifest in manifests:
        if not manifest["apiVersion"].startswith(CRD_GROUPS):
            kubernetes_validate.validate(manifest, kube_version, strict=True)


def test_each_services_policy_lets_it_reach_the_identity_provider_only_with_format_url(
    render_objects: RenderObjects,
) -> None:
    fetching = of_kind(render_objects(url_values()), "NetworkPolicy")
    mounted = of_kind(render_objects({}), "NetworkPolicy")
    for service in SERVICES:
        pod = endpoint(service)
        assert allows(fetching, pod, IDP, 443), service
        assert not allows(fetching, pod, ELSEWHERE, 443), service
        assert not allows(fetching, pod, IDP, 80), service  # the provider's ports only
        assert not allows(mounted, pod, IDP, 443), service
    # Each service's own policy carries the rule (the policies select one component each).
    for policy in fetching:
        component = policy["metadata"]["labels"].get("app.kubernetes.io/component")
        if component in SERVICES:
            peers = [peer for rule in policy["spec"]["egress"] for peer in rule.get("to", [])]
            assert {"ipBlock": {"cidr": "192.0.2.2/32"}} in peers, component
    # The migration Jobs never verify tokens.
    assert not allows(fetching, endpoint("migrate"), IDP, 443)


def test_identity_provider_peers_and_ports_are_the_portals(render_objects: RenderObjects) -> None:
    keycloak = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keycloak"}}}
    values = url_values()
    values["networkPolicy"] = {"identityProvider": {"cidrs": [], "to": [keycloak], "ports": [8443]}}
    values["portal"] = {"enabled": False}
    policies = of_kind(render_objects(values), "NetworkPolicy")
    for service in SERVICES:
        assert allows(policies, endpoint(service), OUTSIDE, 8443), service
        assert not allows(policies, endpoint(service), OUTSIDE, 443), service


def test_no_provider_egress_in_insecure_mode(render_objects: RenderObjects) -> None:
    values = url_values()
    values["security"]["insecure"] = True
    policies = of_kind(render_objects(values), "NetworkPolicy")
    for service in SERVICES:
        assert not allows(policies, endpoint(service), IDP, 443), service


def test_the_notes_say_the_keys_come_from_the_url() -> None:
    notes = render(url_values(jwksCacheSeconds=900))["egret/templates/NOTES.txt"]
    assert f"JWKS at {JWKS_URL}, fetched again every 900 s" in notes
    assert "egret-jwt-keys" not in notes
    assert "the services cannot fetch the JWKS" in notes  # the placeholder provider address
    default = render(None)["egret/templates/NOTES.txt"]
    assert "egret-jwt-keys (Secret): jwks.json" in default
    assert "the services cannot fetch the JWKS" not in default


@pytest.mark.parametrize(
    ("jwt", "complaint"),
    [
        ({"keys": {"format": "url"}}, "jwksUrl"),  # no URL: the default is empty
        ({"keys": {"format": "url"}, "jwksUrl": "http://idp.example.org/certs"}, "jwksUrl"),
        ({"keys": {"format": "url"}, "jwksUrl": "idp.example.org/certs"}, "jwksUrl"),
        ({"keys": {"format": "url"}, "jwksUrl": JWKS_URL, "jwksCacheSeconds": 0}, "jwksCacheSeconds"),
        ({"keys": {"format": "url"}, "jwksUrl": JWKS_URL, "jwksCacheSeconds": 86401}, "jwksCacheSeconds"),
        ({"keys": {"format": "url"}, "jwksUrl": JWKS_URL, "jwksCacheSeconds": 2.5}, "jwksCacheSeconds"),
        ({"keys": {"format": "url"}, "jwksUrl": JWKS_URL, "jwksCacheSeconds": "300"}, "jwksCacheSeconds"),
        ({"keys": {"format": "url"}, "jwksURL": JWKS_URL}, "jwksURL"),
    ],
)
def test_the_schema_refuses_a_missing_or_plain_http_url_and_bad_lifetimes(
    render_objects: RenderObjects, jwt: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(helm.HelmError, match=complaint):
        render_objects({"security": {"jwt": jwt}})


def test_the_lifetime_bounds_are_accepted(render_objects: RenderObjects) -> None:
    for seconds in (1, 86400):
        specs = containers_by_service(render_objects(url_values(jwksCacheSeconds=seconds)))
        assert env_of(specs["score"][0]["containers"][0])["EGRET_JWT_JWKS_CACHE_S"] == str(seconds)


def test_a_provider_anywhere_fails_the_render_without_the_portal_too(render_objects: RenderObjects) -> None:
    values = url_values()
    values["portal"] = {"enabled": False}
    values["networkPolicy"] = {"identityProvider": {"cidrs": [], "to": []}}
    with pytest.raises(helm.HelmRenderError, match="identityProvider"):
        render_objects(values)
    # With the keys mounted, the services never reach the provider: nothing to refuse.
    values["security"] = {}
    assert render_objects(values)
