"""The chart's config-apply Job (templates/config-apply-job.yaml): a post-install and
post-upgrade hook running `python -m services.configapply` with the files the services mount,
its own certificate and token, a checksum of the content it applies, and a network path to
rules and score only; gone when configApply.enabled is false."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from deploy.k8s.render import Manifest, render
from kit.principal import SERVICE_SCOPES
from services.configapply.apply import Step, parse_policy
from services.configapply.settings import ConfigApplySettings
from tests.support.chart import OUTSIDE, RenderObjects, endpoint, env_of
from tests.support.k8s import Endpoint, named, network_allows, of_kind, pod_template

JOB = "egret-config-apply"
RULE_SET = "name: city\nversion: 1\nrules: []\n"


def job(manifests: list[Manifest]) -> Manifest:
    return named(manifests, "Job", JOB)


def checksum(render_objects: RenderObjects, values: dict[str, Any]) -> str:
    manifest = job(render_objects(values))
    return str(manifest["metadata"]["annotations"]["checksum/config-apply"])


def test_the_job_is_a_post_install_upgrade_and_rollback_hook_kept_until_the_next(
    render_objects: RenderObjects,
) -> None:
    manifests = render_objects({"configApply": {"backoffLimit": 5, "activeDeadlineSeconds": 1200}})
    manifest = job(manifests)
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    annotations = manifest["metadata"]["annotations"]
    # A rollback applies the values of the release it returns to.
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade,post-rollback"
    # Not deleted on success: its log is what it did (docs/deploy.md).
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert (manifest["spec"]["backoffLimit"], manifest["spec"]["activeDeadlineSeconds"]) == (5, 1200)
    _, spec = pod_template(manifest)
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "services.configapply"]
    env = env_of(container)
    assert env["EGRET_RULES_ADDRESS"] == "egret-rules:50052"
    assert env["EGRET_SCORE_ADDRESS"] == "egret-score:50053"
    assert env["EGRET_ACTIVATE_POLICY_DEADLINE_SECONDS"] == "1200"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "egret-config-apply-tls"
    assert volumes["service-token"]["secret"]["secretName"] == "egret-config-apply-token"
    assert container["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}


def test_the_job_reads_the_files_the_services_mount_and_its_settings_check_passes(
    render_objects: RenderObjects, tmp_path: Path
) -> None:
    """The Job's environment, its mount paths mapped to the rendered ConfigMaps' files (and
    stand-ins for the Secrets), passes the command's own settings check."""
    manifests = render_objects(
        {"config": {"rulesets": {"city.yaml": RULE_SET}, "activeRuleset": "city.yaml"}}
    )
    _, spec = pod_template(job(manifests))
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    paths: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            continue  # /tmp
        assert mount["readOnly"] is True
        directory = tmp_path / mount["name"]
        directory.mkdir()
        if "configMap" in volume:
            data = named(manifests, "ConfigMap", volume["configMap"]["name"])["data"]
        else:
            data = {item["path"]: "stand-in" for item in volume["secret"]["items"]}
        for name, text in data.items():
            (directory / name).write_text(text, encoding="utf-8")
        paths[mount["mountPath"]] = directory

    def local(value: str) -> str:
        for mount_path, directory in paths.items():
            if value.startswith(mount_path + "/"):
                return str(directory / value.removeprefix(mount_path + "/"))
        return value

    env = {name: local(value) for name, value in env_of(container).items()}
    settings = ConfigApplySettings.from_env(env)
    assert settings.ruleset_file.read_text(encoding="utf-8") == RULE_SET
    assert not isinstance(parse_policy(settings.policy_file.read_text(encoding="utf-8")), Step)
    assert (
        settings.benefits_file.read_text(encoding="utf-8")
        == named(manifests, "ConfigMap", "egret-benefits")["data"]["benefits.yaml"]
    )
    assert settings.rules == ("egret-rules:50052",)
    assert settings.security.service_token_file is not None


def test_the_checksum_follows_the_active_rule_set_the_policy_and_the_benefits(
    render_objects: RenderObjects,
) -> None:
    two = {"a.yaml": RULE_SET, "b.yaml": RULE_SET.replace("version: 1", "version: 2")}
    base = {"config": {"rulesets": two, "activeRuleset": "a.yaml"}}
    before = checksum(render_objects, base)
    assert checksum(render_objects, base) == before
    changed = {"config": {"rulesets": {**two, "a.yaml": RULE_SET.replace("rules: []", "rules: [] # edited")}}}
    assert checksum(render_objects, {"config": {**base["config"], **changed["config"]}}) != before
    # Another file of the map, not the active one: nothing to apply.
    other = {**two, "b.yaml": "name: other\nversion: 9\nrules: []\n"}
    assert checksum(render_objects, {"config": {**base["config"], "rulesets": other}}) == before
    assert checksum(render_objects, {"config": {**base["config"], "activeRuleset": "b.yaml"}}) != before
    assert checksum(render_objects, {"config": {**base["config"], "policy": "version: x\n"}}) != before
    assert checksum(render_objects, {"config": {**base["config"], "benefits": "benefits: []\n"}}) != before


def test_the_job_applies_to_every_rules_shard(render_objects: RenderObjects) -> None:
    _, spec = pod_template(job(render_objects({"services": {"rules": {"shards": 3}}})))
    env = env_of(spec["containers"][0])
    assert "EGRET_RULES_ADDRESS" not in env
    assert env["EGRET_RULES_ADDRESSES"] == "egret-rules-0:50052,egret-rules-1:50052,egret-rules-2:50052"


def test_the_job_reaches_rules_and_score_only(render_objects: RenderObjects) -> None:
    policies = of_kind(render_objects({}), "NetworkPolicy")
    source = endpoint("config-apply")
    assert network_allows(policies, source, endpoint("rules"), 50052)
    assert network_allows(policies, source, endpoint("score"), 50053)
    assert network_allows(policies, source, OUTSIDE, 53, "UDP")
    for destination, port in (("ingest", 50051), ("query", 50054)):
        assert not network_allows(policies, source, endpoint(destination), port), destination
    assert not network_allows(policies, source, OUTSIDE, 443)
    assert not network_allows(policies, source, Endpoint({}, external=True, ip="192.0.2.1"), 5432)
    assert not network_allows(policies, endpoint("ingest"), source, 50051)


def test_insecure_runs_the_job_without_certificate_or_token(render_objects: RenderObjects) -> None:
    _, spec = pod_template(job(render_objects({"security": {"insecure": True}})))
    env = env_of(spec["containers"][0])
    assert env["EGRET_INSECURE"] == "true"
    assert not {v["name"] for v in spec["volumes"]} & {"tls", "service-token"}
    assert not [name for name in env if name.startswith(("EGRET_TLS_", "EGRET_SERVICE_TOKEN"))]


def test_the_install_notes_name_the_jobs_secrets_and_its_tokens_scope() -> None:
    notes = render(None)["egret/templates/NOTES.txt"]
    scope = " ".join(SERVICE_SCOPES["config-apply"])
    assert (
        f'egret-config-apply-token: token (config-apply\'s bearer token, role "service", scope "{scope}"'
        in notes
    )
    assert "egret-config-apply-tls: tls.crt, tls.key, ca.crt" in notes
    disabled = render({"configApply": {"enabled": False}})["egret/templates/NOTES.txt"]
    assert "config-apply" not in disabled


@pytest.mark.parametrize("network_policy", [True, False])
def test_disabled_renders_no_job_and_opens_no_path(
    render_objects: RenderObjects, network_policy: bool
) -> None:
    manifests = render_objects(
        {"configApply": {"enabled": False}, "networkPolicy": {"enabled": network_policy}}
    )
    assert not [m for m in manifests if m["metadata"]["name"] == JOB]
    policies = of_kind(manifests, "NetworkPolicy")
    if network_policy:
        assert not network_allows(policies, endpoint("config-apply"), endpoint("rules"), 50052)
        assert not network_allows(policies, endpoint("config-apply"), endpoint("score"), 50053)
    else:
        assert policies == []


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"configApply": {"enable": True}}, "enable"),
        ({"configApply": {"backoffLimit": -1}}, "backoffLimit"),
        ({"configApply": {"activeDeadlineSeconds": 0}}, "activeDeadlineSeconds"),
        ({"configApply": {"tokenSecretName": 3}}, "tokenSecretName"),
    ],
)
def test_the_schema_refuses_bad_config_apply_values(
    render_objects: RenderObjects, values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(helm.HelmError, match=complaint):
        render_objects(values)
