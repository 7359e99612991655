"""The Helm chart is valid, hardened and wired as documented, for every CI values file.

Everything renders offline through helm-python-sdk (Helm's Go SDK in-process) and is
validated against the Kubernetes OpenAPI schemas that kubernetes-validate ships.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from deploy.k8s.render import CHART_DIR, REPO_ROOT, Manifest, drift, hooks, objects, render
from kit.principal import SERVICE_SCOPES
from tests.deploy.conftest import load_values
from tests.deploy.k8s import (
    Endpoint,
    matches,
    named,
    network_allows,
    of_kind,
    pod_template,
    pods,
    portal_deployments,
    services_deployments,
)

# The newest Kubernetes whose schemas kubernetes-validate ships, and the oldest the chart
# supports (Chart.yaml kubeVersion): every object must be valid on both.
KUBE_VERSIONS = (kubernetes_validate.latest_version(), "1.30.0")
SERVICES = ("ingest", "rules", "score", "query")
RELEASE_LABELS = {"app.kubernetes.io/name": "egret", "app.kubernetes.io/instance": "egret"}
# Pod Security "restricted": the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}

RenderObjects = Callable[[dict[str, Any]], list[Manifest]]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def component(labels: dict[str, str]) -> str:
    return labels["app.kubernetes.io/component"]


def migration_jobs(manifests: list[Manifest]) -> list[Manifest]:
    """The migration Jobs (not the config-apply Job: test_chart_config_apply.py)."""
    return [j for j in of_kind(manifests, "Job") if component(j["metadata"]["labels"]) == "migrate"]


# -- lint, schema, validity -----------------------------------------------------------------


def test_helm_lint_strict_reports_no_warning_or_error(values_file: Path) -> None:
    report = helm.lint(CHART_DIR, load_values(values_file), strict=True, kube_version="v1.35.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert (problems, report["errors"]) == ([], [])


# Kinds from CRDs whose schemas kubernetes-validate does not ship (Gateway API's HTTPRoute):
# test_the_portals_http_route_attaches_to_the_gateway_and_serves_the_public_host checks them.
CRD_GROUPS = ("gateway.networking.k8s.io/",)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(rendered: list[Manifest], kube_version: str) -> None:
    assert len(rendered) > 20
    for manifest in rendered:
        if manifest["apiVersion"].startswith(CRD_GROUPS):
            continue
        kubernetes_validate.validate(manifest, kube_version, strict=True)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"services": {"ingest": {"replica": 2}}}, "replica"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"env": {"DATABASE_URL": "x"}}, "DATABASE_URL"),
        ({"services": {"rules": {"shards": 0}}}, "shards"),
        ({"otel": {"endpoint": "collector:4317"}}, "endpoint"),
        ({"security": {"insecure": "no"}}, "insecure"),
        ({"security": {"tls": {"secretName": "x"}}}, "secretName"),
        ({"security": {"jwt": {"keys": {"format": "der"}}}}, "format"),
        ({"security": {"jwt": {"algorithms": ["HS256"]}}}, "algorithms"),
        ({"security": {"jwt": {"issuer": ""}}}, "issuer"),
        ({"networkPolicy": {"database": {"cidrs": ["pg.example.org"]}}}, "cidrs"),
        ({"secrets": {"auditKey": {"keyId": "a 1"}}}, "keyId"),
        ({"portal": {"publicUrl": "http://credit.example.org"}}, "publicUrl"),
        ({"portal": {"publicUrl": "https://credit.example.org/portal"}}, "publicUrl"),
        ({"portal": {"ingress": {"host": "x"}}}, "host"),
        ({"portal": {"oidc": {"scope": "profile"}}}, "scope"),
        ({"portal": {"trustedProxies": ["ingress-nginx"]}}, "trustedProxies"),
        ({"portal": {"oidc": {"issuer": "http://idp.example.org"}}}, "issuer"),
        ({"secrets": {"portal": {"sessionSecret": {"key": "a/b"}}}}, "key"),
    ],
)
def test_values_schema_rejects_unknown_keys_and_bad_values(
    render_objects: RenderObjects, values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(helm.HelmError, match=complaint):
        render_objects(values)


@pytest.mark.parametrize(
    "values",
    [
        {"services": {"rules": {"replicas": 2}}},
        {"services": {"rules": {"autoscaling": {"enabled": True}}}},
        {"secrets": {"create": True}},
        {"config": {"rulesets": {"city.yaml": "x: 1"}, "activeRuleset": "other.yaml"}},
        # Nowhere to send the database traffic would mean anywhere on its ports.
        {"networkPolicy": {"database": {"cidrs": [], "to": []}}},
        {"secrets": {"create": True, "subjectKey": {"value": "x" * 32}}},
        # The portal: an HTTPRoute attached to nothing, an identity provider anywhere, a
        # guessable session key, a missing client secret.
        {"portal": {"httpRoute": {"enabled": True}}},
        {"networkPolicy": {"identityProvider": {"cidrs": [], "to": []}}},
        {
            "secrets": {
                "create": True,
                "subjectKey": {"value": "k" * 32},
                "auditKey": {"value": "a" * 32},
                "portal": {"oidcClientSecret": {"value": "client"}, "sessionSecret": {"value": "short"}},
            }
        },
        {
            "secrets": {
                "create": True,
                "subjectKey": {"value": "k" * 32},
                "auditKey": {"value": "a" * 32},
                "portal": {"sessionSecret": {"value": "s" * 32}},
            }
        },
    ],
)
def test_values_the_schema_cannot_express_fail_the_render(
    render_objects: RenderObjects, values: dict[str, Any]
) -> None:
    with pytest.raises(helm.HelmRenderError):
        render_objects(values)


def _leaves(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values:
        return [leaf for key, value in values.items() for leaf in _leaves(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def _normalise(path: str) -> str:
    # services.rules/score/query have ingest's shape and share its documentation.
    return re.sub(r"^services\.(rules|score|query)(\.|$)", r"services.ingest\2", path)


def test_every_value_is_documented_in_values_yaml() -> None:
    """Every leaf value has a `# --` comment above it or above the object it belongs to."""
    text = (CHART_DIR / "values.yaml").read_text()
    documented: set[str] = set()
    path: list[tuple[int, str]] = []
    previous_is_doc = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            previous_is_doc = previous_is_doc or stripped.startswith("# --")
            continue
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if match:
            indent = len(match.group(1))
            path = [(i, k) for i, k in path if i < indent] + [(indent, match.group(2))]
            if previous_is_doc:
                documented.add(_normalise(".".join(k for _, k in path)))
        previous_is_doc = False

    def covered(leaf: str) -> bool:
        parts = _normalise(leaf).split(".")
        return any(".".join(parts[:n]) in documented for n in range(1, len(parts) + 1))

    leaves = _leaves(yaml.safe_load(text))
    assert len(leaves) > 80
    assert [leaf for leaf in leaves if not covered(leaf)] == []


# -- hardening -------------------------------------------------------------------------------


def test_every_pod_meets_pod_security_restricted(rendered: list[Manifest]) -> None:
    checked = 0
    for manifest, _, spec in pods(rendered):
        where = f"{manifest['kind']}/{manifest['metadata']['name']}"
        pod_context = spec.get("securityContext", {})
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec.get("enableServiceLinks") is False, where
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, (where, volume)
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container.get("securityContext", {})
            non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
            user = context.get("runAsUser", pod_context.get("runAsUser"))
            seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
            assert non_root is True, (where, container["name"])
            assert user not in (None, 0), (where, container["name"])
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert not context.get("privileged"), where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert set(context["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert not any(p.get("hostPort") for p in container.get("ports", [])), where
            checked += 1
    assert checked >= 5  # four services and the test pod, at least


def test_service_accounts_do_not_mount_tokens(rendered: list[Manifest]) -> None:
    accounts = of_kind(rendered, "ServiceAccount")
    assert {a["metadata"]["name"] for a in accounts} == {f"egret-{s}" for s in (*SERVICES, "portal")}
    assert all(a["automountServiceAccountToken"] is False for a in accounts)


def test_every_service_has_grpc_probes_resources_a_service_and_a_pdb(rendered: list[Manifest]) -> None:
    deployments = services_deployments(rendered)
    assert {component(d["metadata"]["labels"]) for d in deployments} == set(SERVICES)
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        metadata, spec = pod_template(deployment)
        (container,) = spec["containers"]
        assert [port["name"] for port in container["ports"]] == ["grpc", "admin"]
        assert "EGRET_LISTEN_ADDRESS" in env_of(container), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # The kubelet's own HTTP probe of the plain-HTTP admin port (test_chart_metrics.py
            # checks the paths): the gRPC port's TLS is not the kubelet's to speak.
            assert container[probe]["httpGet"]["port"] == "admin", (name, probe)
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert "memory" in resources["limits"], name
        assert matches(deployment["spec"]["selector"], metadata["labels"]), name
        (pdb,) = [
            p
            for p in of_kind(rendered, "PodDisruptionBudget")
            if matches(p["spec"]["selector"], metadata["labels"])
        ]
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]), name
        (service,) = [
            s for s in of_kind(rendered, "Service") if matches(s["spec"]["selector"], metadata["labels"])
        ]
        assert service["spec"]["ports"][0]["targetPort"] == "grpc", name
        assert int(spec["terminationGracePeriodSeconds"]) > int(
            env_of(container)["EGRET_SHUTDOWN_GRACE_SECONDS"]
        )


def test_autoscaled_services_leave_replicas_to_their_hpa(rendered: list[Manifest]) -> None:
    scaled = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(rendered, "HorizontalPodAutoscaler")}
    for deployment in services_deployments(rendered):
        name = deployment["metadata"]["name"]
        assert ("replicas" in deployment["spec"]) == (name not in scaled), name
    for name, hpa in scaled.items():
        named(rendered, "Deployment", name)
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_high_availability_autoscales_ingest_and_query(render_objects: RenderObjects) -> None:
    values = load_values(CHART_DIR / "ci" / "high-availability-values.yaml")
    scaled = {
        h["spec"]["scaleTargetRef"]["name"]
        for h in of_kind(render_objects(values), "HorizontalPodAutoscaler")
    }
    assert scaled == {"egret-ingest", "egret-query", "egret-portal"}


# -- secrets and configuration -------------------------------------------------------------


def secret_refs(manifests: list[Manifest]) -> set[tuple[str, str]]:
    """(Secret name, key) of every env secretKeyRef and secret volume item."""
    refs: set[tuple[str, str]] = set()
    for _, _, spec in pods(manifests):
        for container in spec["containers"]:
            for value in env_of(container).values():
                if isinstance(value, dict) and "secretKeyRef" in value:
                    refs.add((value["secretKeyRef"]["name"], value["secretKeyRef"]["key"]))
        for volume in spec.get("volumes", []):
            secret = volume.get("secret")
            for item in (secret or {}).get("items", []):
                refs.add((secret["secretName"], item["key"]))
    return refs


def test_secrets_are_referenced_never_inlined_by_default(render_objects: RenderObjects) -> None:
    manifests = render_objects({})
    assert of_kind(manifests, "Secret") == []
    assert secret_refs(manifests) == {
        ("egret-database", "ingest-url"),
        ("egret-database", "rules-url"),
        ("egret-database", "score-url"),
        ("egret-database", "score-readonly-url"),
        ("egret-database", "query-url"),
        ("egret-subject-key", "subject-key"),
        ("egret-audit-key", "audit-key"),
        *((f"egret-{name}-tls", key) for name in (*SERVICES, "test") for key in TLS_KEYS),
        ("egret-jwt-keys", "jwks.json"),
        ("egret-ingest-token", "token"),
        ("egret-rules-token", "token"),
        ("egret-query-token", "token"),
        # The portal: its client certificate, its token for the public pages, its two secrets.
        *(("egret-portal-tls", key) for key in TLS_KEYS),
        ("egret-portal-token", "token"),
        ("egret-portal-oidc", "client-secret"),
        ("egret-portal-session", "session-secret"),
        # The config-apply Job: its client certificate and its token.
        *(("egret-config-apply-tls", key) for key in TLS_KEYS),
        ("egret-config-apply-token", "token"),
    }
    text = yaml.safe_dump_all(manifests)
    assert "postgresql" not in text


def test_existing_secrets_are_referenced_by_the_given_names(render_objects: RenderObjects) -> None:
    manifests = render_objects(load_values(CHART_DIR / "ci" / "existing-secrets-values.yaml"))
    assert {n for n, _ in secret_refs(manifests)} == {
        "egret-pg-urls",
        "egret-hmac",
        "egret-audit-key",
        "egret-ingest-cert",
        "egret-rules-cert",
        "egret-score-cert",
        "egret-query-cert",
        "egret-smoke-test-cert",
        "egret-ingest-svc-token",
        "egret-rules-svc-token",
        "egret-query-svc-token",
        "egret-portal-client-cert",
        "egret-portal-svc-token",
        "egret-portal-client",
        "egret-portal-cookies",
        "egret-config-apply-cert",
        "egret-config-apply-svc-token",
    }
    ingest = named(manifests, "Deployment", "egret-ingest")
    _, spec = pod_template(ingest)
    env = env_of(spec["containers"][0])
    assert env["EGRET_SUBJECT_KEY_ID"] == "k2"
    # The IdP's key as a PEM public key in a ConfigMap (public keys are no secret).
    (jwt,) = [v for v in spec["volumes"] if v["name"] == "jwt"]
    assert jwt["configMap"]["name"] == "city-idp-signing-key"
    assert env["EGRET_JWT_PUBLIC_KEY_FILE"] == "/var/run/secrets/egret/jwt/signing.pem"
    assert "EGRET_JWT_JWKS_FILE" not in env
    assert (env["EGRET_JWT_ISSUER"], env["EGRET_JWT_AUDIENCE"], env["EGRET_JWT_ALGORITHMS"]) == (
        "https://login.city.example/realms/egret",
        "egret-api",
        "ES256",
    )
    assert env["EGRET_SERVICE_TOKEN_FILE"] == "/var/run/secrets/egret/service-token/jwt"
    # Departments must present client certificates to ingest; query stays server-TLS only.
    assert env["EGRET_TLS_CLIENT_CA_FILE"] == "/var/run/secrets/egret/tls/ca.crt"
    query = env_of(pod_template(named(manifests, "Deployment", "egret-query"))[1]["containers"][0])
    assert "EGRET_TLS_CLIENT_CA_FILE" not in query
    assert (query["EGRET_RATE_LIMIT_PER_SECOND"], query["EGRET_RATE_LIMIT_BURST"]) == ("50", "100")


def test_created_secrets_exist_before_the_migration_hooks(render_objects: RenderObjects) -> None:
    manifests = render_objects(
        load_values(CHART_DIR / "ci" / "development-values.yaml") | {"migrations": {"enabled": True}}
    )
    every = {s["metadata"]["name"]: s for s in of_kind(manifests, "Secret")}
    assert set(every) == {
        "egret-database",
        "egret-subject-key",
        "egret-audit-key",
        "egret-portal-oidc",
        "egret-portal-session",
    }
    # The portal's are release objects: no hook Job reads them.
    assert not hooks(every.pop("egret-portal-oidc")) | hooks(every.pop("egret-portal-session"))
    secrets = list(every.values())
    for secret in secrets:
        assert "pre-install" in hooks(secret)
        assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0
    assert set(secrets[0]["stringData"]) == {
        "ingest-url",
        "rules-url",
        "score-url",
        "score-readonly-url",
        "query-url",
    }


def test_config_files_are_mounted_where_the_settings_point(rendered: list[Manifest]) -> None:
    config_maps = {c["metadata"]["name"]: c for c in of_kind(rendered, "ConfigMap")}
    file_settings = set(SECURITY_FILES) | {
        "EGRET_CATALOGUE_FILE",
        "EGRET_RULESET_FILE",
        "EGRET_POLICY_FILE",
        "EGRET_BENEFITS_FILE",
        "EGRET_PURPOSES_FILE",
        "EGRET_SUBJECT_KEY_FILE",
    }
    for deployment in services_deployments(rendered):
        _, spec = pod_template(deployment)
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for name, value in env_of(container).items():
            if name not in file_settings:
                continue
            (mount,) = [m for m in container["volumeMounts"] if value.startswith(m["mountPath"] + "/")]
            file = value.removeprefix(mount["mountPath"] + "/")
            volume = volumes[mount["name"]]
            assert mount.get("readOnly") is True, (name, value)
            if "configMap" in volume and volume["configMap"]["name"] in config_maps:
                assert file in config_maps[volume["configMap"]["name"]]["data"], (name, value)
            else:
                source = volume.get("secret") or volume["configMap"]
                assert file in {i["path"] for i in source["items"]}, (name, value)


def test_config_change_rolls_the_pods(render_objects: RenderObjects) -> None:
    def checksum(values: dict[str, Any]) -> str:
        metadata, _ = pod_template(named(render_objects(values), "Deployment", "egret-score"))
        return str(metadata["annotations"]["checksum/config"])

    assert checksum({}) != checksum({"config": {"policy": "version: x\n"}})


def test_every_config_file_is_mounted_for_the_services_that_read_it(render_objects: RenderObjects) -> None:
    manifests = render_objects({})
    bundled = (CHART_DIR / "files" / "benefits.yaml").read_text()
    assert named(manifests, "ConfigMap", "egret-benefits")["data"] == {"benefits.yaml": bundled}
    purposes = (CHART_DIR / "files" / "purposes.yaml").read_text()
    assert named(manifests, "ConfigMap", "egret-purposes")["data"] == {"purposes.yaml": purposes}
    settings = {
        "ingest": {"EGRET_CATALOGUE_FILE"},
        # Backtests split reports by the catalogue's cohorts (and score with score's active
        # policy, no file); a backtest or a dead-letter listing names subjects only for a
        # stated purpose.
        "rules": {"EGRET_RULESET_FILE", "EGRET_CATALOGUE_FILE", "EGRET_PURPOSES_FILE"},
        # The policy seeds score's policy store on its first start; VerifyScores names
        # subjects only for a stated purpose.
        "score": {"EGRET_POLICY_FILE", "EGRET_PURPOSES_FILE"},
        "query": {"EGRET_POLICY_FILE", "EGRET_BENEFITS_FILE", "EGRET_PURPOSES_FILE"},
    }
    config = {
        "EGRET_CATALOGUE_FILE",
        "EGRET_RULESET_FILE",
        "EGRET_POLICY_FILE",
        "EGRET_BENEFITS_FILE",
        "EGRET_PURPOSES_FILE",
    }
    for service, expected in settings.items():
        env = env_of(pod_template(named(manifests, "Deployment", f"egret-{service}"))[1]["containers"][0])
        assert {name for name in env if name in config} == expected, service
    score = env_of(pod_template(named(manifests, "Deployment", "egret-score"))[1]["containers"][0])
    assert score["EGRET_SWEEP_INTERVAL_SECONDS"] == "60"

    custom = render_objects({"config": {"benefits": "benefits: []\n"}})
    assert named(custom, "ConfigMap", "egret-benefits")["data"] == {"benefits.yaml": "benefits: []\n"}


# -- security ------------------------------------------------------------------------------

TLS_KEYS = ("tls.crt", "tls.key", "ca.crt")  # a kubernetes.io/tls Secret as cert-manager writes it
SECURITY_FILES = (
    "EGRET_TLS_CERT_FILE",
    "EGRET_TLS_KEY_FILE",
    "EGRET_TLS_CA_FILE",
    "EGRET_TLS_CLIENT_CA_FILE",
    "EGRET_JWT_JWKS_FILE",
    "EGRET_JWT_PUBLIC_KEY_FILE",
    "EGRET_SERVICE_TOKEN_FILE",
)
# Every service serves TLS and checks tokens; these two call another service with a token;
# these two are called only by services and require client certificates (mutual TLS).
EVERY_SERVICE = {
    "EGRET_INSECURE",
    "EGRET_TLS_CERT_FILE",
    "EGRET_TLS_KEY_FILE",
    "EGRET_TLS_CA_FILE",
    "EGRET_JWT_ISSUER",
    "EGRET_JWT_AUDIENCE",
    "EGRET_JWT_ALGORITHMS",
    "EGRET_JWT_JWKS_FILE",
    "EGRET_RATE_LIMIT_PER_SECOND",
    "EGRET_RATE_LIMIT_BURST",
}
CALLERS = {"ingest", "rules", "query"}
INTERNAL = {"rules", "score"}


def security_env(env: dict[str, Any]) -> set[str]:
    return {n for n in env if re.match(r"^EGRET_(INSECURE|TLS_|JWT_|SERVICE_TOKEN|RATE_LIMIT)", n)}


def test_every_service_gets_every_security_variable(rendered: list[Manifest]) -> None:
    for deployment in services_deployments(rendered):
        name = deployment["metadata"]["name"]
        env = env_of(pod_template(deployment)[1]["containers"][0])
        if env["EGRET_INSECURE"] == "true":
            continue  # development-values.yaml: see test_insecure_mode_is_explicit_and_loud
        service = component(deployment["metadata"]["labels"])
        expected = set(EVERY_SERVICE)
        if service in CALLERS:
            expected.add("EGRET_SERVICE_TOKEN_FILE")
        if service in INTERNAL or env.get("EGRET_TLS_CLIENT_CA_FILE"):
            expected.add("EGRET_TLS_CLIENT_CA_FILE")
        if "EGRET_JWT_PUBLIC_KEY_FILE" in env:
            expected = (expected - {"EGRET_JWT_JWKS_FILE"}) | {"EGRET_JWT_PUBLIC_KEY_FILE"}
        assert security_env(env) == expected, name
        assert env["EGRET_INSECURE"] == "false", name
        assert all(env[n] for n in expected), name


def test_insecure_is_off_by_default() -> None:
    assert load_values(CHART_DIR / "values.yaml")["security"]["insecure"] is False
    rendered = render(None)
    for deployment in services_deployments(objects(rendered)):
        env = env_of(pod_template(deployment)[1]["containers"][0])
        assert env["EGRET_INSECURE"] == "false", deployment["metadata"]["name"]
    assert "INSECURE" not in rendered["egret/templates/NOTES.txt"]


def test_the_install_notes_name_each_callers_token_scope_as_the_services_check_it() -> None:
    notes = render(None)["egret/templates/NOTES.txt"]
    for caller in ("ingest", "rules", "query", "portal"):
        scope = " ".join(SERVICE_SCOPES[caller])
        assert f'{caller}\'s bearer token, role "service", scope "{scope}"' in notes, caller


def test_rules_and_score_require_client_certificates(
    rendered: list[Manifest], render_objects: RenderObjects
) -> None:
    for deployment in services_deployments(rendered):
        env = env_of(pod_template(deployment)[1]["containers"][0])
        if component(deployment["metadata"]["labels"]) in INTERNAL and env["EGRET_INSECURE"] == "false":
            # Mutual TLS against the services' CA; the callers present their own certificates.
            assert env["EGRET_TLS_CLIENT_CA_FILE"] == env["EGRET_TLS_CA_FILE"], deployment["metadata"]["name"]
    defaults = render_objects({})
    for service in ("ingest", "query"):
        env = env_of(pod_template(named(defaults, "Deployment", f"egret-{service}"))[1]["containers"][0])
        assert "EGRET_TLS_CLIENT_CA_FILE" not in env, service  # departments and readers: server TLS


def test_pods_mount_tls_and_keys_read_only_from_cert_manager_shaped_secrets(rendered: list[Manifest]) -> None:
    checked = 0
    for manifest, _, spec in pods(rendered):
        where = f"{manifest['kind']}/{manifest['metadata']['name']}"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "emptyDir" not in volume and mount["name"] != "audit-anchors":
                    assert mount.get("readOnly") is True, (where, mount["name"])
                if mount["name"] == "tls":
                    assert mount["mountPath"] == "/var/run/secrets/egret/tls", where
                    items = volume["secret"]["items"]
                    assert [(i["key"], i["path"]) for i in items] == [(k, k) for k in TLS_KEYS], where
                    assert volume["secret"]["defaultMode"] == 0o440, where
                    checked += 1
    if is_insecure(rendered):
        assert checked == 0
    else:
        assert checked >= 5  # every service and the test pod


def is_insecure(manifests: list[Manifest]) -> bool:
    modes = {
        env_of(pod_template(d)[1]["containers"][0])["EGRET_INSECURE"] for d in services_deployments(manifests)
    }
    assert len(modes) == 1
    return modes == {"true"}


def test_helm_test_pod_speaks_tls_with_the_mounted_certificates(
    render_objects: RenderObjects,
) -> None:
    manifests = render_objects({})
    test_pod = named(manifests, "Pod", "egret-test-health")
    (container,) = test_pod["spec"]["containers"]
    env = env_of(container)
    assert env["EGRET_TLS_CA_FILE"] == "/var/run/secrets/egret/tls/ca.crt"
    assert {env["EGRET_TLS_CERT_FILE"], env["EGRET_TLS_KEY_FILE"]} == {
        "/var/run/secrets/egret/tls/tls.crt",
        "/var/run/secrets/egret/tls/tls.key",
    }
    assert "ssl_channel_credentials" in container["command"][2]
    (tls,) = [v for v in test_pod["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "egret-test-tls"


def test_insecure_mode_is_explicit_and_loud() -> None:
    rendered = render({"security": {"insecure": True}})
    manifests = objects(rendered)
    for deployment in services_deployments(manifests):
        container = pod_template(deployment)[1]["containers"][0]
        env = env_of(container)
        assert security_env(env) == {
            "EGRET_INSECURE",
            "EGRET_RATE_LIMIT_PER_SECOND",
            "EGRET_RATE_LIMIT_BURST",
        }
        assert env["EGRET_INSECURE"] == "true"
        assert not {"tls", "jwt", "service-token"} & {m["name"] for m in container["volumeMounts"]}
    (portal,) = portal_deployments(manifests)
    container = pod_template(portal)[1]["containers"][0]
    assert security_env(env_of(container)) == {"EGRET_INSECURE"}
    assert env_of(container)["EGRET_INSECURE"] == "true"
    assert not {"tls", "service-token"} & {m["name"] for m in container["volumeMounts"]}
    assert "WARNING: INSECURE MODE" in rendered["egret/templates/NOTES.txt"]
    assert {n for n, _ in secret_refs(manifests)} == {
        "egret-database",
        "egret-subject-key",
        "egret-audit-key",
        "egret-portal-oidc",
        "egret-portal-session",
    }


def test_migration_jobs_need_no_tls_or_token_keys(render_objects: RenderObjects) -> None:
    for job in migration_jobs(render_objects({})):
        container = pod_template(job)[1]["containers"][0]
        assert security_env(env_of(container)) == set(), job["metadata"]["name"]
        assert not {"tls", "jwt", "service-token"} & {m["name"] for m in container["volumeMounts"]}


# -- wiring ----------------------------------------------------------------------------------


def test_migrations_run_in_hook_jobs_and_the_services_do_not_migrate(render_objects: RenderObjects) -> None:
    manifests = render_objects({})
    jobs = {j["metadata"]["name"]: j for j in migration_jobs(manifests)}
    assert set(jobs) == {
        "egret-ingest-migrate",
        "egret-rules-migrate",
        "egret-score-migrate",
        "egret-query-migrate",
    }
    for job in jobs.values():
        assert hooks(job) == {"pre-install", "pre-upgrade"}
        _, spec = pod_template(job)
        assert spec["containers"][0]["args"] == ["migrate"]
    for deployment in services_deployments(manifests):
        assert env_of(pod_template(deployment)[1]["containers"][0])["EGRET_MIGRATE_ON_START"] == "false"

    without = render_objects({"migrations": {"enabled": False}})
    assert migration_jobs(without) == []
    for deployment in services_deployments(without):
        assert env_of(pod_template(deployment)[1]["containers"][0])["EGRET_MIGRATE_ON_START"] == "true"


def test_every_service_gets_the_audit_key_and_its_own_anchor_file(render_objects: RenderObjects) -> None:
    rotated = {
        "secrets": {"auditKey": {"keyId": "a2", "key": "key-2", "oldKeys": [{"keyId": "a1", "key": "key-1"}]}}
    }
    for values in ({}, load_values(CHART_DIR / "ci" / "sharded-rules-values.yaml"), rotated):
        manifests = render_objects(values)
        anchor_files = []
        for deployment in services_deployments(manifests):
            _, spec = pod_template(deployment)
            container = spec["containers"][0]
            env = env_of(container)
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            key_dir = mounts["audit-key"]["mountPath"]
            assert mounts["audit-key"]["readOnly"] is True
            items = [i["key"] for i in volumes["audit-key"]["secret"]["items"]]
            assert volumes["audit-key"]["secret"]["secretName"] == "egret-audit-key"
            if values is rotated:
                assert (env["EGRET_AUDIT_KEY_FILE"], env["EGRET_AUDIT_KEY_ID"]) == (f"{key_dir}/key-2", "a2")
                assert env["EGRET_AUDIT_OLD_KEY_FILES"] == f"a1={key_dir}/key-1"
                assert items == ["key-2", "key-1"]
            else:
                assert (env["EGRET_AUDIT_KEY_FILE"], env["EGRET_AUDIT_KEY_ID"]) == (
                    f"{key_dir}/audit-key",
                    "a1",
                )
                assert "EGRET_AUDIT_OLD_KEY_FILES" not in env
            # Anchors: a file per workload (one chain each) on the anchor volume, never the database.
            anchors = mounts["audit-anchors"]["mountPath"]
            assert env["EGRET_AUDIT_ANCHOR_FILE"] == f"{anchors}/{deployment['metadata']['name']}.anchors"
            assert volumes["audit-anchors"] == {
                "name": "audit-anchors",
                "persistentVolumeClaim": {"claimName": "egret-audit-anchors"},
            }
            assert env["EGRET_AUDIT_ANCHOR_SECONDS"] == "300"
            anchor_files.append(env["EGRET_AUDIT_ANCHOR_FILE"])
        assert len(set(anchor_files)) == len(anchor_files) >= 4
        # The migration Jobs re-key (kit.rekey) and record it in the chain: the keys, no anchors.
        for job in migration_jobs(manifests):
            env = env_of(pod_template(job)[1]["containers"][0])
            audit_env = {name for name in env if name.startswith("EGRET_AUDIT_")}
            assert {"EGRET_AUDIT_KEY_FILE", "EGRET_AUDIT_KEY_ID"} <= audit_env, job["metadata"]["name"]
            assert "EGRET_AUDIT_ANCHOR_FILE" not in audit_env


def test_subject_key_rotations_reach_every_service_and_migration_job(render_objects: RenderObjects) -> None:
    """The root key only where raw ids are hashed; the rotations list everywhere, rules
    included, and in the migration Jobs that re-key (docs/security.md)."""
    plain = render_objects({})
    rotated = render_objects({"secrets": {"subjectKey": {"rotationsKey": "subject-key-rotations"}}})
    for manifests, rotations in ((plain, False), (rotated, True)):
        for workload in [*services_deployments(manifests), *migration_jobs(manifests)]:
            name = workload["metadata"]["name"]
            _, spec = pod_template(workload)
            env = env_of(spec["containers"][0])
            hashes = not name.startswith("egret-rules")
            assert env["EGRET_SUBJECT_KEY_ID"] == "k1", name
            assert ("EGRET_SUBJECT_KEY_FILE" in env) is hashes, name
            volumes = {v["name"]: v for v in spec["volumes"]}
            items = [
                i["key"] for i in volumes.get("subject-key", {"secret": {"items": []}})["secret"]["items"]
            ]
            assert ("subject-key" in items) is hashes, name
            assert ("subject-key-rotations" in items) is rotations, name
            if rotations:
                mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
                assert (
                    env["EGRET_SUBJECT_KEY_ROTATIONS_FILE"]
                    == f"{mounts['subject-key']}/subject-key-rotations"
                )
            else:
                assert "EGRET_SUBJECT_KEY_ROTATIONS_FILE" not in env


def test_otlp_export_is_tls_by_default_with_the_collectors_ca(render_objects: RenderObjects) -> None:
    for deployment in services_deployments(render_objects({"otel": {"enabled": True}})):
        env = env_of(pod_template(deployment)[1]["containers"][0])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("https://")
        assert env["OTEL_EXPORTER_OTLP_INSECURE"] == "false"
        assert "OTEL_EXPORTER_OTLP_CERTIFICATE" not in env  # the system's roots
    ha = render_objects(load_values(CHART_DIR / "ci" / "high-availability-values.yaml"))
    for deployment in services_deployments(ha):
        _, spec = pod_template(deployment)
        container = spec["containers"][0]
        env = env_of(container)
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "otel-ca"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "otel-ca"]
        assert volume["configMap"]["name"] == "observability-ca"
        assert env["OTEL_EXPORTER_OTLP_CERTIFICATE"] == f"{mount['mountPath']}/ca.crt"
        assert env["OTEL_EXPORTER_OTLP_INSECURE"] == "false"


def test_otel_variables_point_at_the_configured_collector(render_objects: RenderObjects) -> None:
    values = load_values(CHART_DIR / "ci" / "high-availability-values.yaml")
    for deployment in services_deployments(render_objects(values)):
        env = env_of(pod_template(deployment)[1]["containers"][0])
        service = component(deployment["metadata"]["labels"])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == values["otel"]["endpoint"]
        assert env["OTEL_SERVICE_NAME"] == f"egret-{service}"
        assert (env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"]) == (
            "parentbased_traceidratio",
            "0.25",
        )
        assert "deployment.environment=production" in env["OTEL_RESOURCE_ATTRIBUTES"]
        assert "OTEL_TRACES_EXPORTER" not in env
    for deployment in services_deployments(render_objects({})):
        env = env_of(pod_template(deployment)[1]["containers"][0])
        assert env["OTEL_TRACES_EXPORTER"] == "none"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env


def test_rules_shards_get_a_deployment_service_pdb_and_migration_each(render_objects: RenderObjects) -> None:
    manifests = render_objects({"services": {"rules": {"shards": 3}}})
    shards = [d for d in services_deployments(manifests) if component(d["metadata"]["labels"]) == "rules"]
    assert [d["metadata"]["name"] for d in shards] == ["egret-rules-0", "egret-rules-1", "egret-rules-2"]
    for index, deployment in enumerate(shards):
        metadata, spec = pod_template(deployment)
        env = env_of(spec["containers"][0])
        assert (env["EGRET_RULES_SHARD"], env["EGRET_RULES_SHARDS"]) == (str(index), "3")
        assert env["EGRET_DATABASE_URL"]["secretKeyRef"]["key"] == f"rules-url-{index}"
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        selecting = [
            s["metadata"]["name"]
            for s in of_kind(manifests, "Service")
            if matches(s["spec"]["selector"], metadata["labels"])
        ]
        assert selecting == [f"egret-rules-{index}"]
        assert [
            p
            for p in of_kind(manifests, "PodDisruptionBudget")
            if matches(p["spec"]["selector"], metadata["labels"])
        ]
    ingest_env = env_of(pod_template(named(manifests, "Deployment", "egret-ingest"))[1]["containers"][0])
    assert (
        ingest_env["EGRET_RULES_ADDRESSES"] == "egret-rules-0:50052,egret-rules-1:50052,egret-rules-2:50052"
    )
    assert "EGRET_RULES_ADDRESS" not in ingest_env  # one source of truth for the routing
    assert {j["metadata"]["name"] for j in of_kind(manifests, "Job")} >= {
        f"egret-rules-{i}-migrate" for i in range(3)
    }
    test_pod = named(manifests, "Pod", "egret-test-health")
    assert {f"egret-rules-{i}:50052" for i in range(3)} <= set(test_pod["spec"]["containers"][0]["args"])


def test_helm_test_pod_checks_every_service_through_its_service(rendered: list[Manifest]) -> None:
    (test_pod,) = [p for p in of_kind(rendered, "Pod") if "test" in hooks(p)]
    addresses = test_pod["spec"]["containers"][0]["args"][1:]
    expected = {
        # gRPC health of each service, the portal's /healthz over HTTP.
        f"http://{name}:{port}/healthz" if s["spec"]["ports"][0]["name"] == "http" else f"{name}:{port}"
        for s in of_kind(rendered, "Service")
        for name, port in [(s["metadata"]["name"], s["spec"]["ports"][0]["port"])]
    }
    assert set(addresses) == expected


def endpoint(service: str) -> Endpoint:
    return Endpoint({**RELEASE_LABELS, "app.kubernetes.io/component": service})


OUTSIDE = Endpoint({}, external=True)
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


# -- image and rendered manifests ------------------------------------------------------------


def test_dockerfile_is_hadolint_clean_and_runs_as_the_charts_user() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [hadolint, "Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    values = load_values(CHART_DIR / "values.yaml")
    assert (
        f"USER {values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
        in dockerfile
    )
    assert "grpc_tools.protoc" in dockerfile  # stubs are generated in the build, never copied
    # The portal's catalogues compiled into the installed package by its own command (one way).
    assert "python -P -m services.portal compile-translations" in dockerfile
    ignored = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") :].count("!gen/") == 0  # the context never carries a local gen/


def test_plain_manifests_and_chart_config_have_not_drifted() -> None:
    assert drift() == [], "run `make manifests`"


# -- the portal ------------------------------------------------------------------------------


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
