"""The Helm chart is valid, hardened and wired as documented, for every CI values file: lint, schema,
documented values, Pod Security, probes, autoscaling, configuration files, migrations, shards.

Everything renders offline through helm-python-sdk (Helm's Go SDK in-process) and is
validated against the Kubernetes OpenAPI schemas that kubernetes-validate ships. The security
wiring, the network policies and the portal have modules of their own (test_chart_*.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from deploy.k8s.render import CHART_DIR, REPO_ROOT, Manifest, drift, hooks
from tests.support.chart import (
    CRD_GROUPS,
    KUBE_VERSIONS,
    SERVICES,
    RenderObjects,
    component,
    env_of,
    load_values,
    migration_jobs,
)
from tests.support.k8s import matches, named, of_kind, pod_template, pods, services_deployments

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
# The security settings that name a mounted file (test_chart_security.py checks their Secrets).
SECURITY_FILES = (
    "EGRET_TLS_CERT_FILE",
    "EGRET_TLS_KEY_FILE",
    "EGRET_TLS_CA_FILE",
    "EGRET_TLS_CLIENT_CA_FILE",
    "EGRET_JWT_JWKS_FILE",
    "EGRET_JWT_PUBLIC_KEY_FILE",
    "EGRET_SERVICE_TOKEN_FILE",
)


# -- lint, schema, validity -----------------------------------------------------------------


def test_helm_lint_strict_reports_no_warning_or_error(values_file: Path) -> None:
    report = helm.lint(CHART_DIR, load_values(values_file), strict=True, kube_version="v1.35.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert (problems, report["errors"]) == ([], [])


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


# -- configuration -------------------------------------------------------------------------


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
