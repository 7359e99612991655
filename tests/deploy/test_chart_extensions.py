"""The chart's extension points land where documented, its README and Artifact Hub metadata are current,
and it packages into an archive that lints and renders like the chart directory.

ci/platform-extensions-values.yaml sets every extension point; test_chart.py lints, validates and
hardening-checks it with the other CI values files. Here: where each value lands.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from deploy.k8s import chart_docs
from deploy.k8s.render import CHART_DIR, CI_VALUES_DIR, RELEASE, Manifest, hooks, objects, render
from tests.support.chart import KUBE_VERSIONS, SERVICES, load_values
from tests.support.k8s import named, of_kind, pod_template, pods

EXTENSIONS = load_values(CI_VALUES_DIR / "platform-extensions-values.yaml")


@pytest.fixture(scope="module")
def extended() -> list[Manifest]:
    return objects(render(EXTENSIONS))


def workloads(manifests: list[Manifest]) -> dict[str, tuple[Manifest, dict[str, Any], dict[str, Any]]]:
    """kind/name → (object, pod metadata, pod spec) of every pod the chart runs."""
    return {f"{m['kind']}/{m['metadata']['name']}": (m, meta, spec) for m, meta, spec in pods(manifests)}


def egret_containers(manifests: list[Manifest]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """kind/name → (pod spec, container) of every Egret service, portal and migration container."""
    found = {}
    for where, (manifest, _, spec) in workloads(manifests).items():
        if manifest["kind"] == "Pod":
            continue  # the `helm test` pod gets pod metadata and scheduling only
        (container,) = spec["containers"]
        found[where] = (spec, container)
    return found


def all_pods_expected() -> set[str]:
    names = {f"Deployment/egret-{s}" for s in (*SERVICES, "portal")}
    jobs = {f"Job/egret-{s}-migrate" for s in SERVICES} | {"Job/egret-config-apply"}
    return names | jobs | {"Pod/egret-test-health"}


def test_the_extension_values_render_valid_kubernetes(extended: list[Manifest]) -> None:
    for kube_version in KUBE_VERSIONS:
        for manifest in extended:
            if not manifest["apiVersion"].startswith("gateway.networking.k8s.io/"):
                kubernetes_validate.validate(manifest, kube_version, strict=True)


def test_chart_wide_pod_metadata_and_scheduling_reach_every_pod(extended: list[Manifest]) -> None:
    pods_by_name = workloads(extended)
    assert set(pods_by_name) == all_pods_expected()
    for where, (_, metadata, spec) in pods_by_name.items():
        assert metadata["annotations"]["backup.velero.io/backup-volumes-excludes"] == "tmp,data", where
        assert "cost-centre" in metadata["labels"], where
        assert spec["nodeSelector"] == {"node.city.example/pool": "egret"}, where
        assert {"key": "dedicated", "operator": "Equal", "value": "egret", "effect": "NoSchedule"} in spec[
            "tolerations"
        ], where
        assert spec["affinity"] == EXTENSIONS["affinity"], where
        assert spec["imagePullSecrets"] == [{"name": "registry-city"}, {"name": "registry-mirror"}], where
        assert spec["priorityClassName"], where


def test_chart_wide_env_and_volumes_reach_every_egret_container(extended: list[Manifest]) -> None:
    containers = egret_containers(extended)
    assert len(containers) == 10  # four services, the portal, four migration Jobs, config-apply
    for where, (spec, container) in containers.items():
        env = {e["name"]: e for e in container["env"]}
        assert env["HTTPS_PROXY"]["value"] == "http://proxy.city.example:3128", where
        assert "NO_PROXY" in env, where
        # Appended after the chart's own settings, which stay.
        names = [e["name"] for e in container["env"]]
        assert names.index("HTTPS_PROXY") > max(
            i for i, name in enumerate(names) if name.startswith("EGRET_")
        )
        assert container["envFrom"] == [
            {"configMapRef": {"name": "city-proxy-settings", "optional": True}}
        ], where
        assert {"name": "city-secrets", "mountPath": "/mnt/city-secrets", "readOnly": True} in container[
            "volumeMounts"
        ], where
        assert [v for v in spec["volumes"] if v["name"] == "city-secrets"] == EXTENSIONS["extraVolumes"], (
            where
        )
        assert "tmp" in {v["name"] for v in spec["volumes"]}, where  # the chart's own volumes stay


def test_a_component_refines_the_chart_wide_values(extended: list[Manifest]) -> None:
    pods_by_name = workloads(extended)
    _, score_meta, score = pods_by_name["Deployment/egret-score"]
    _, ingest_meta, ingest = pods_by_name["Deployment/egret-ingest"]
    # Maps merge with the component winning, lists append, priorityClassName is replaced.
    assert (score_meta["labels"]["cost-centre"], ingest_meta["labels"]["cost-centre"]) == (
        "civic-score",
        "civic-platform",
    )
    assert [t["key"] for t in score["tolerations"]] == ["dedicated", "score-only"]
    assert [t["key"] for t in ingest["tolerations"]] == ["dedicated"]
    assert (score["priorityClassName"], ingest["priorityClassName"]) == ("egret-critical", "egret-standard")
    (score_container,) = score["containers"]
    assert score_container["env"][-1]["name"] == "EXTRA_FROM_SECRET"
    assert "EXTRA_FROM_SECRET" not in {e["name"] for e in ingest["containers"][0]["env"]}
    # A component's spread constraints replace the default spread over nodes and zones.
    _, _, query = pods_by_name["Deployment/egret-query"]
    assert query["topologySpreadConstraints"] == EXTENSIONS["services"]["query"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in ingest["topologySpreadConstraints"]] == [
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    ]


def test_a_migration_job_takes_its_services_values_then_the_migrations(extended: list[Manifest]) -> None:
    pods_by_name = workloads(extended)
    for service in SERVICES:
        job, metadata, spec = pods_by_name[f"Job/egret-{service}-migrate"]
        assert "pre-install" in hooks(job)
        assert metadata["annotations"]["sidecar.istio.io/inject"] == "false", service
        assert spec["priorityClassName"] == "egret-batch", service
        assert "topologySpreadConstraints" not in spec, service
    _, _, score_job = pods_by_name["Job/egret-score-migrate"]
    assert score_job["containers"][0]["env"][-1]["name"] == "EXTRA_FROM_SECRET"
    assert [t["key"] for t in score_job["tolerations"]] == ["dedicated", "score-only"]
    # Only the Jobs take the migrations' values.
    _, score_meta, _ = pods_by_name["Deployment/egret-score"]
    assert "sidecar.istio.io/inject" not in score_meta["annotations"]


def test_services_and_service_accounts_carry_their_annotations_and_labels(extended: list[Manifest]) -> None:
    services = of_kind(extended, "Service")
    assert {s["metadata"]["name"] for s in services} == {f"egret-{s}" for s in (*SERVICES, "portal")}
    owners = {
        s["metadata"]["name"]: s["metadata"]["annotations"]["service.city.example/owner"] for s in services
    }
    assert owners == {
        "egret-ingest": "civic-platform",
        "egret-rules": "civic-platform",
        "egret-score": "civic-platform",
        "egret-query": "civic-query",
        "egret-portal": "civic-portal",
    }
    assert all(s["metadata"]["labels"]["city.example/exposed"] == "false" for s in services)
    accounts = {a["metadata"]["name"]: a["metadata"] for a in of_kind(extended, "ServiceAccount")}
    assert all(a["labels"]["azure.workload.identity/use"] == "true" for a in accounts.values())
    # Workload identity per component: the score and portal accounts only.
    identities = {
        name: (meta.get("annotations") or {}).get("azure.workload.identity/client-id")
        for name, meta in accounts.items()
    }
    assert identities == {
        "egret-ingest": None,
        "egret-rules": None,
        "egret-score": "00000000-0000-0000-0000-000000000001",
        "egret-query": None,
        "egret-portal": "00000000-0000-0000-0000-000000000002",
    }
    # The migration Job runs as its service's account, so it has the same identity.
    assert (
        pod_template(named(extended, "Job", "egret-score-migrate"))[1]["serviceAccountName"] == "egret-score"
    )


def test_every_rules_shard_gets_the_rules_extensions() -> None:
    values = {"services": {"rules": {"shards": 3, "serviceAnnotations": {"a": "b"}, "podLabels": {"x": "y"}}}}
    manifests = objects(render(values))
    shards = [f"egret-rules-{n}" for n in range(3)]
    for name in shards:
        assert named(manifests, "Service", name)["metadata"]["annotations"] == {"a": "b"}
        assert pod_template(named(manifests, "Deployment", name))[0]["labels"]["x"] == "y"


def test_default_values_render_no_extension() -> None:
    manifests = objects(render())
    for where, (_, metadata, spec) in workloads(manifests).items():
        assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"} & set(
            spec
        ), where
        assert set(metadata.get("annotations") or {}) <= {
            "checksum/config",
            "helm.sh/hook",
            "helm.sh/hook-delete-policy",
            "helm.sh/hook-weight",
        }, where
        for container in spec["containers"]:
            assert "envFrom" not in container, where
    for kind in ("Service", "ServiceAccount"):
        assert all("annotations" not in m["metadata"] for m in of_kind(manifests, kind)), kind


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"extraEnv": {"HTTPS_PROXY": "x"}}, "extraEnv"),
        ({"extraEnv": [{"value": "x"}]}, "name"),
        ({"extraEnv": [{"name": "A", "value": 1}]}, "value"),
        # The chart's own settings go in env, where they replace the chart's values instead of
        # adding a second variable of the same name.
        ({"services": {"query": {"extraEnv": [{"name": "EGRET_LOG_LEVEL", "value": "debug"}]}}}, "name"),
        ({"extraEnvFrom": [{"secret": {"name": "x"}}]}, "secret"),
        ({"extraVolumes": [{"csi": {"driver": "d"}}]}, "name"),
        ({"extraVolumeMounts": [{"name": "v"}]}, "mountPath"),
        ({"extraVolumeMounts": [{"name": "v", "mountPath": "relative"}]}, "mountPath"),
        ({"podAnnotations": {"a": 1}}, "podAnnotations"),
        ({"nodeSelector": ["pool"]}, "nodeSelector"),
        ({"tolerations": {"key": "x"}}, "tolerations"),
        ({"priorityClassName": 5}, "priorityClassName"),
        ({"serviceAnnotations": {"a": True}}, "serviceAnnotations"),
        ({"serviceAccount": {"name": "mine"}}, "name"),
        ({"services": {"score": {"serviceAccount": {"annotations": {"a": 1}}}}}, "annotations"),
        ({"portal": {"extraVolumeMounts": "x"}}, "extraVolumeMounts"),
        ({"migrations": {"topologySpreadConstraints": []}}, "topologySpreadConstraints"),
        ({"image": {"pullSecrets": [{"secret": "x"}]}}, "pullSecrets"),
    ],
)
def test_the_schema_refuses_wrong_extension_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmError, match=complaint):
        render(values)


# -- README, Artifact Hub metadata, package ---------------------------------------------------


def test_the_chart_readme_is_generated_from_the_values_comments() -> None:
    assert (CHART_DIR / "README.md").read_text() == chart_docs.readme(), (
        "run `python -m deploy.k8s.chart_docs`"
    )


def test_every_value_is_documented_in_the_readme() -> None:
    text = (CHART_DIR / "values.yaml").read_text()
    table = chart_docs.rows(yaml.safe_load(text), chart_docs.documented_keys(text))
    assert [key for key, _, _, description in table if not description] == []
    keys = {key for key, *_ in table}
    for extension in (
        "extraEnv",
        "extraVolumeMounts",
        "serviceAccount.annotations",
        "services.query.extraEnvFrom",
    ):
        assert extension in keys


def test_chart_yaml_carries_artifact_hub_metadata_matching_the_chart() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    annotations = chart["annotations"]
    assert annotations["artifacthub.io/license"]
    links = yaml.safe_load(annotations["artifacthub.io/links"])
    assert links
    assert all(set(link) == {"name", "url"} and link["url"].startswith("https://") for link in links)
    changes = yaml.safe_load(annotations["artifacthub.io/changes"])
    kinds = {"added", "changed", "deprecated", "removed", "fixed", "security"}
    assert changes
    assert all(change["kind"] in kinds and change["description"] for change in changes)
    assert annotations["artifacthub.io/containsSecurityUpdates"] in ("true", "false")
    # The image listed is the one the chart deploys by default.
    (image,) = yaml.safe_load(annotations["artifacthub.io/images"])
    deployment = named(objects(render()), "Deployment", f"{RELEASE}-ingest")
    assert image["image"] == pod_template(deployment)[1]["containers"][0]["image"]


def test_helm_package_makes_an_archive_that_lints_and_renders_like_the_chart(tmp_path: Path) -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    archive = Path(helm.package(CHART_DIR, destination=tmp_path))
    assert archive == tmp_path / f"{chart['name']}-{chart['version']}.tgz"
    with tarfile.open(archive) as packed:
        names = set(packed.getnames())
    assert {"egret/Chart.yaml", "egret/values.yaml", "egret/values.schema.json", "egret/README.md"} <= names
    assert not any(name.startswith("egret/ci/") for name in names)  # .helmignore keeps CI values out
    report = helm.lint(archive, EXTENSIONS, strict=True, kube_version="v1.35.0")
    assert ([m for m in report["messages"] if m["severity"] >= 2], report["errors"]) == ([], [])
    with helm.Chart.load(archive) as packaged:
        rendered = packaged.render(EXTENSIONS, name=RELEASE, namespace="egret", is_install=True)
    assert objects(rendered) == objects(render(EXTENSIONS))
