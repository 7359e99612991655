"""The config-apply command (services.configapply) against real rules and score services
with TLS and tokens, on SQLite and on PostgreSQL: it changes what is active only through
the services' RPCs, as its own principal, once per content; and rules' backtests score
with the policy score has active, whichever way it got there."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from structlog.testing import CapturingLogger

from contracts.score_store import ScoreAuditLog
from devtools.localpki import LocalPki, create_local_pki
from egret.rules.v1 import backtest_pb2 as bt
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.db import create_engine
from kit.interceptors import bearer_token
from kit.principal import Role
from services.configapply.apply import Step
from services.configapply.bootstrap import run
from services.configapply.settings import ConfigApplySettings
from services.rules import bootstrap as rules_bootstrap
from services.rules.settings import RulesSettings
from services.rules.stores.schema import RulesAuditLog
from services.score import bootstrap as score_bootstrap
from services.score.settings import ScoreSettings
from tests.support.backtests import POLICY, ROOT, SAMPLE, candidate_source, environment, history
from tests.support.servers import running

BENEFITS = ROOT / "config" / "benefits.yaml"
DEPLOYER = "egret-config-apply"


def new_policy(version: str) -> str:
    """The shipped policy under another version, with a higher base score."""
    text = POLICY.read_text(encoding="utf-8")
    assert text.count("base: 1000") == 2
    return text.replace('version: "2026.2"', f'version: "{version}"').replace("base: 1000", "base: 1010")


def renamed_policy(version: str) -> str:
    """The shipped policy under another version, its middle tier renamed: a report's tiers
    tell which of the two scored it."""
    text = POLICY.read_text(encoding="utf-8")
    for old, new in (
        ('version: "2026.2"', f'version: "{version}"'),
        ("{name: A, min: 960}", "{name: MID, min: 960}"),
    ):
        assert text.count(old) >= 1, old
        text = text.replace(old, new)
    return text


@dataclass
class Egret:
    """Rules relaying to score, both secured; stubs as a reviewer and as an admin, and the
    files and settings the config-apply Job would run with."""

    pki: LocalPki
    rules_address: str
    score_address: str
    reviewer: pb_grpc.RulesServiceAsyncStub
    ingest: pb_grpc.RulesServiceAsyncStub
    admin: score_grpc.ScoreServiceAsyncStub
    config: Path
    rules_url: str
    score_url: str

    def apply_settings(self) -> ConfigApplySettings:
        token = self.config / "deployer.token"
        token.write_text(self.pki.service_token("config-apply"), encoding="utf-8")
        return ConfigApplySettings.from_env(
            {
                "EGRET_RULES_ADDRESS": self.rules_address,
                "EGRET_SCORE_ADDRESS": self.score_address,
                "EGRET_RULESET_FILE": str(self.config / "ruleset.yaml"),
                "EGRET_POLICY_FILE": str(self.config / "policy.yaml"),
                "EGRET_BENEFITS_FILE": str(self.config / "benefits.yaml"),
                "EGRET_TLS_CA_FILE": str(self.pki.ca_file),
                "EGRET_TLS_CERT_FILE": str(self.pki.cert_file("operator")),
                "EGRET_TLS_KEY_FILE": str(self.pki.key_file("operator")),
                "EGRET_SERVICE_TOKEN_FILE": str(token),
                "EGRET_CONFIG_APPLY_WAIT_SECONDS": "20",
            }
        )

    def configure(self, *, rule_set: str | None = None, policy: str | None = None) -> None:
        if rule_set is not None:
            (self.config / "ruleset.yaml").write_text(rule_set, encoding="utf-8")
        if policy is not None:
            (self.config / "policy.yaml").write_text(policy, encoding="utf-8")

    async def apply(self) -> list[Step]:
        return await run(self.apply_settings())

    async def active(self) -> tuple[tuple[str, int], str]:
        rule_set = (await self.reviewer.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set
        policy = await self.admin.GetActivePolicy(score_pb.GetActivePolicyRequest())
        return (rule_set.name, rule_set.version), policy.version

    async def changes(self) -> list[pb.RuleSetChange]:
        page = await self.reviewer.ListRuleSetChanges(pb.ListRuleSetChangesRequest(page_size=500))
        return list(page.changes)

    async def policies(self) -> list[score_pb.PolicyActivation]:
        return list((await self.admin.ListPolicies(score_pb.ListPoliciesRequest())).activations)


@asynccontextmanager
async def egret(make_url: Callable[[str], str], tmp_path: Path) -> AsyncIterator[Egret]:
    pki = create_local_pki(tmp_path / "pki")
    config = tmp_path / "config"
    config.mkdir()
    (config / "benefits.yaml").write_text(BENEFITS.read_text(encoding="utf-8"), encoding="utf-8")
    rules_url, score_url = make_url("rules"), make_url("score")
    secure = {"EGRET_INSECURE": "false"}
    async with AsyncExitStack() as stack:
        score_settings = ScoreSettings.from_env(
            environment("score", score_url, tmp_path, **secure, **pki.env("score"))
        )
        score_address = await stack.enter_async_context(
            running(score_settings, score_bootstrap.build, score_bootstrap.MIGRATIONS)
        )
        rules_settings = RulesSettings.from_env(
            environment(
                "rules",
                rules_url,
                tmp_path,
                EGRET_RULESET_FILE=str(SAMPLE),
                EGRET_SCORE_ADDRESS=score_address,
                EGRET_RELAY_POLL_SECONDS="0.05",
                EGRET_CATALOGUE_FILE=str(ROOT / "config" / "catalogue.yaml"),
                EGRET_BACKTEST_WORKERS="1",
                **secure,
                **pki.env("rules"),
            )
        )
        rules_address = await stack.enter_async_context(
            running(rules_settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS)
        )

        def channel(address: str, token: str) -> grpc.aio.Channel:
            made = grpc.aio.secure_channel(address, pki.tls(), interceptors=bearer_token(token))
            stack.push_async_callback(made.close)
            return made

        yield Egret(
            pki,
            rules_address,
            score_address,
            reviewer=pb_grpc.RulesServiceStub(channel(rules_address, pki.token("reviewer-1", Role.REVIEWER))),
            ingest=pb_grpc.RulesServiceStub(channel(rules_address, pki.service_token("ingest"))),
            admin=score_grpc.ScoreServiceStub(channel(score_address, pki.token("admin-1", Role.ADMIN))),
            config=config,
            rules_url=rules_url,
            score_url=score_url,
        )


def audit_acts(url: str, table: type[RulesAuditLog] | type[ScoreAuditLog]) -> list[tuple[str, str, str]]:
    """(action, actor, role) of every record of a service's hash-chained audit log, in order."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(table.action, table.actor, table.role).order_by(table.seq))
            return [(action, actor, role) for action, actor, role in rows]
    finally:
        engine.dispose()


def outcomes(steps: list[Step]) -> list[tuple[str, str]]:
    return [(step.target.split(" on ")[0], step.outcome) for step in steps]


async def test_unchanged_content_does_nothing_and_changed_content_is_activated_as_the_deployer(
    database_url: str, database_url_factory: Callable[[str], str], tmp_path: Path
) -> None:
    async with egret(database_url_factory, tmp_path) as e:
        # What the services seeded themselves with at their first start: nothing to do.
        e.configure(rule_set=SAMPLE.read_text(encoding="utf-8"), policy=POLICY.read_text(encoding="utf-8"))
        seeded_changes, seeded_policies = await e.changes(), await e.policies()
        assert outcomes(await e.apply()) == [
            ("rule set", "unchanged"),
            ("policy", "unchanged"),
            ("benefits", "checked"),
        ]
        assert await e.changes() == seeded_changes
        assert await e.policies() == seeded_policies

        # Changed: a new rule-set version and a new policy version, activated through the RPCs.
        e.configure(rule_set=candidate_source(), policy=new_policy("2026.3"))
        # --dry-run: the plan, and nothing done.
        planned = await run(e.apply_settings(), dry_run=True)
        assert outcomes(planned) == [
            ("rule set", "would activate"),
            ("policy", "would activate"),
            ("benefits", "checked"),
        ]
        assert (await e.changes(), await e.policies()) == (seeded_changes, seeded_policies)
        steps = await e.apply()
        assert outcomes(steps) == [
            ("rule set", "activated"),
            ("policy", "activated"),
            ("benefits", "checked"),
        ]
        assert await e.active() == (("egret-sample", 3), "2026.3")
        new = (await e.changes())[len(seeded_changes) :]
        assert [(c.action, c.actor) for c in new] == [
            ("create_draft", DEPLOYER),
            ("publish", DEPLOYER),
            ("activate", DEPLOYER),
        ]
        activations = await e.policies()
        assert [(a.version, a.activated_by) for a in activations[len(seeded_policies) :]] == [
            ("2026.3", DEPLOYER)
        ]
        # In both hash-chained audit logs, as the deployer's service principal.
        deployer = [act for act in audit_acts(e.rules_url, RulesAuditLog) if act[1] == DEPLOYER]
        assert [(action, role) for action, _, role in deployer] == [
            ("ruleset.draft", "service"),
            ("ruleset.publish", "service"),
            ("ruleset.activate", "service"),
        ]
        assert ("policy.activate", DEPLOYER, "service") in audit_acts(e.score_url, ScoreAuditLog)

        # Applied again: nothing, and nothing recorded.
        changes, policies = await e.changes(), await e.policies()
        assert outcomes(await e.apply()) == [
            ("rule set", "unchanged"),
            ("policy", "unchanged"),
            ("benefits", "checked"),
        ]
        assert (await e.changes(), await e.policies()) == (changes, policies)

        # Back to the earlier rule set: its published version is activated again, no new draft.
        e.configure(rule_set=SAMPLE.read_text(encoding="utf-8"))
        assert outcomes(await e.apply())[0] == ("rule set", "activated")
        back = (await e.changes())[len(changes) :]
        assert [(c.action, c.actor, c.rule_set_id) for c in back] == [("activate", DEPLOYER, 1)]
        assert json.loads(back[0].detail_json)["version"] == 2


async def test_invalid_content_is_refused_with_its_problems_and_nothing_changes(
    database_url: str, database_url_factory: Callable[[str], str], tmp_path: Path
) -> None:
    async with egret(database_url_factory, tmp_path) as e:
        before = (await e.active(), await e.changes(), await e.policies())
        broken_rules = candidate_source().replace("    points: -40\n", "    points: {nope: 1}\n")
        # A valid new policy beside an invalid rule set is not activated either.
        e.configure(rule_set=broken_rules, policy=new_policy("2026.3"))
        steps = await e.apply()
        assert [(s.target.split(" on ")[0], s.outcome) for s in steps] == [("rule set", "refused")]
        assert any("points" in problem for problem in steps[0].problems), steps[0].problems

        # An invalid policy: refused with every problem, before any service is asked.
        e.configure(
            rule_set=candidate_source(), policy=new_policy("2026.3").replace("base: 1010", "base: high")
        )
        steps = await e.apply()
        assert [(s.target, s.outcome) for s in steps] == [("policy", "refused")]
        assert any("base" in problem for problem in steps[0].problems), steps[0].problems

        # Other content under a version already published: a version never changes.
        e.configure(rule_set=SAMPLE.read_text(encoding="utf-8").replace("points: -5\n", "points: -6\n", 1))
        e.configure(policy=POLICY.read_text(encoding="utf-8"))
        steps = await e.apply()
        assert [(s.target.split(" on ")[0], s.outcome) for s in steps] == [("rule set", "refused")]
        assert "raise the version" in steps[0].detail
        # The same policy version with other content.
        e.configure(rule_set=SAMPLE.read_text(encoding="utf-8"), policy=new_policy("2026.2"))
        steps = await e.apply()
        assert [(s.target.split(" on ")[0], s.outcome) for s in steps] == [("policy", "refused")]
        assert "raise the version" in steps[0].problems[0]

        assert (await e.active(), await e.changes(), await e.policies()) == before


async def test_a_token_without_the_deployer_scope_changes_nothing(
    database_url: str, database_url_factory: Callable[[str], str], tmp_path: Path
) -> None:
    async with egret(database_url_factory, tmp_path) as e:
        before = (await e.active(), await e.changes())
        e.configure(rule_set=candidate_source(), policy=POLICY.read_text(encoding="utf-8"))
        settings = e.apply_settings()
        assert settings.security.service_token_file is not None
        settings.security.service_token_file.write_text(e.pki.service_token("query"), encoding="utf-8")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await run(settings)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (await e.active(), await e.changes()) == before


async def test_backtests_score_with_the_policy_score_has_active(
    database_url: str, database_url_factory: Callable[[str], str], tmp_path: Path
) -> None:
    async with egret(database_url_factory, tmp_path) as e:
        for batch in history()[:10]:
            await e.ingest.EvaluateEvents(pb.EvaluateEventsRequest(events=batch))
        active = (await e.reviewer.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set.rule_set_id

        async def backtest() -> bt.BacktestRuleSetResponse:
            return await e.reviewer.BacktestRuleSet(bt.BacktestRuleSetRequest(rule_set_id=active))

        def tiers(report: bt.BacktestRuleSetResponse) -> set[str]:
            return {m.from_tier for m in report.overall.migrations} | {
                m.to_tier for m in report.overall.migrations
            }

        first = await backtest()
        assert first.policy_version == "2026.2"
        assert "A" in tiers(first)
        assert "MID" not in tiers(first)

        # Activated in score by an admin (no file changed anywhere): the next backtest uses it.
        await e.admin.ActivatePolicy(score_pb.ActivatePolicyRequest(policy_yaml=renamed_policy("2026.3-mid")))
        second = await backtest()
        assert second.policy_version == "2026.3-mid"
        assert "MID" in tiers(second)
        assert "A" not in tiers(second)
        assert second.overall.subjects == first.overall.subjects


async def test_rules_says_when_its_file_is_not_the_active_rule_set(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the Job, a changed EGRET_RULESET_FILE is not activated by a restart (the
    database decides), and rules says so at start instead of ignoring it silently."""
    warning = "EGRET_RULESET_FILE is not the active rule set"
    changed = tmp_path / "changed.yaml"
    changed.write_text(candidate_source(), encoding="utf-8")
    for ruleset_file, warned in ((SAMPLE, False), (SAMPLE, False), (changed, True)):
        settings = RulesSettings.from_env(
            environment("rules", database_url, tmp_path, EGRET_RULESET_FILE=str(ruleset_file))
        )
        # Rules' own logger, whatever renders it (JSON on stderr in a deployment; structlog caches
        # configured loggers, so capturing its output would depend on the tests that ran before).
        logged = CapturingLogger()
        monkeypatch.setattr(rules_bootstrap, "log", logged)
        async with AsyncExitStack() as stack:
            address = await stack.enter_async_context(
                running(settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS)
            )
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            active = await pb_grpc.RulesServiceStub(channel).GetActiveRuleSet(pb.GetActiveRuleSetRequest())
        assert (active.rule_set.name, active.rule_set.version) == ("egret-sample", 2)
        said = [call.args[0] for call in logged.calls if call.method_name == "warning"]
        assert any(warning in line for line in said) is warned, ruleset_file
