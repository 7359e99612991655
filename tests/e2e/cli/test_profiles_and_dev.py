"""`egret profile` and `egret dev token` against a real local cluster: which profile is in
use, tokens minted only for a local cluster, and a minted token accepted by the services."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from egret.query.v1 import query_service_pb2
from egret_client import Connection, load_profile
from egret_client.tokens import TokenFile
from tests.support.cli import Egret


def test_profile_list_marks_the_current_one_and_show_names_its_files(egret: Egret) -> None:
    listed = egret("profile", "list")
    assert listed.code == 0, listed.stderr
    rows = {line.split()[-1]: line for line in listed.stdout.splitlines() if line.strip()}
    assert {"department", "reviewer", "auditor", "admin", "subject", "benefit-provider"} <= set(rows)
    assert rows["reviewer"].lstrip().startswith("*")

    shown = egret("-p", "department", "profile", "show", "-o", "json").json()
    assert shown["name"] == "department"
    assert shown["endpoints"]["ingest"] == egret.cluster.address("ingest")
    assert shown["token"].endswith("tokens/department.token")


def test_a_minted_token_is_accepted_by_the_services(egret: Egret, tmp_path: Path) -> None:
    target = tmp_path / "auditor.token"
    minted = egret(
        "-p", "admin", "dev", "token", "--role", "auditor", "--subject", "audit-7", "-w", str(target)
    )
    assert minted.code == 0, minted.stderr
    assert target.stat().st_mode & 0o777 == 0o600

    async def read_distribution() -> int:
        profile = load_profile("auditor", egret.config)
        async with Connection(profile, TokenFile(target)) as connection:
            reply = await connection.query.GetTierDistribution(query_service_pb2.GetTierDistributionRequest())
            return len(reply.by_kind)

    assert asyncio.run(read_distribution()) >= 0
    as_json = egret("-p", "admin", "dev", "token", "--role", "reviewer", "-o", "json").json()
    assert as_json["role"] == "reviewer"
    assert as_json["token"].count(".") == 2


def test_dev_token_refuses_a_profile_that_is_not_a_local_cluster(egret: Egret, tmp_path: Path) -> None:
    document = yaml.safe_load(egret.config.read_text())
    remote = document["profiles"]["admin"]
    remote["endpoints"] = dict.fromkeys(remote["endpoints"], "egret.city.example:443")
    remote["token-file"] = str(egret.config.parent / remote["token-file"])
    document["profiles"] = {"production": remote}
    config = tmp_path / "remote.yaml"
    config.write_text(yaml.safe_dump(document))
    refused = egret("--config", str(config), "-p", "production", "dev", "token", "--role", "admin")
    assert refused.code == 3
    assert "not a local cluster" in refused.stderr
    assert "egret.city.example:443" in refused.stderr
    assert refused.stdout == ""


def test_config_problems_exit_3_with_the_place_named(egret: Egret, tmp_path: Path) -> None:
    missing = egret("--config", str(tmp_path / "absent.yaml"), "profile", "show")
    assert missing.code == 3
    assert "no config file" in missing.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"profiles": {"x": {"endpoints": {"query": "no-port"}}}}))
    invalid = egret("--config", str(bad), "profile", "show")
    assert invalid.code == 3
    assert "profiles/x/endpoints/query" in invalid.stderr

    unknown = egret("-p", "nobody", "profile", "show")
    assert unknown.code == 3
    assert "no profile 'nobody'" in unknown.stderr
