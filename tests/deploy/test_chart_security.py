"""The chart's security wiring: Secrets referenced never inlined, TLS and token files for every
service, mutual TLS inside, the audit and subject keys and their rotations, OTLP over TLS, and the
insecure mode, explicit and loud."""

from __future__ import annotations

import re
from typing import Any

import yaml

from deploy.k8s.render import CHART_DIR, Manifest, hooks, objects, render
from kit.principal import SERVICE_SCOPES
from tests.support.chart import SERVICES, RenderObjects, component, env_of, load_values, migration_jobs
from tests.support.k8s import named, of_kind, pod_template, pods, portal_deployments, services_deployments

TLS_KEYS = ("tls.crt", "tls.key", "ca.crt")  # a kubernetes.io/tls Secret as cert-manager writes it
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
