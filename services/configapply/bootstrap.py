"""`python -m services.configapply [--dry-run]`: apply the configured rule set and policy.

Run by the chart's config-apply Job after every install and upgrade, with the files the
services mount and the deployer's own service token (scope egret.config.apply). Prints
one line per piece and service; exit status 0 when everything is active as configured,
1 when a piece was refused (nothing changed) or a service failed, 2 on bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from contextlib import AsyncExitStack

import grpc

from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.env import SettingsError
from kit.interceptors import open_channel
from kit.logging import configure_logging, get_logger
from kit.security import channel_credentials
from services.configapply.apply import Calls, Desired, Step, Targets, apply
from services.configapply.settings import ConfigApplySettings

log = get_logger("services.configapply")


async def run(settings: ConfigApplySettings, *, dry_run: bool = False) -> list[Step]:
    credentials = None if settings.security.insecure else channel_credentials(settings.security)
    desired = Desired(
        rule_set=settings.ruleset_file.read_text(encoding="utf-8"),
        policy=settings.policy_file.read_text(encoding="utf-8"),
        benefits_file=settings.benefits_file,
    )
    calls = Calls(
        deadline_s=settings.score.deadline_s,
        wait_s=settings.wait_s,
        activate_policy_s=settings.activate_policy_deadline_s,
    )
    async with AsyncExitStack() as stack:
        rules = []
        for address in settings.rules:
            channel = open_channel(address, credentials)
            stack.push_async_callback(channel.close)
            rules.append((address, rules_grpc.RulesServiceStub(channel)))
        channel = open_channel(settings.score.address, credentials)
        stack.push_async_callback(channel.close)
        targets = Targets(rules, (settings.score.address, score_grpc.ScoreServiceStub(channel)))
        return await apply(targets, desired, calls, dry_run=dry_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.configapply",
        description="Make the configured rule set (EGRET_RULESET_FILE) and policy (EGRET_POLICY_FILE) "
        "the active ones through rules' and score's RPCs, and check the benefit catalogue "
        "(EGRET_BENEFITS_FILE) against the policy. Unchanged content changes nothing.",
    )
    parser.add_argument("--dry-run", action="store_true", help="plan and print, change nothing")
    args = parser.parse_args(argv)
    try:
        settings = ConfigApplySettings.from_env()
    except SettingsError as exc:
        print(f"config-apply: {exc}", file=sys.stderr)
        return 2
    configure_logging("config-apply", log_format=settings.log_format, level=settings.log_level)
    try:
        steps = asyncio.run(run(settings, dry_run=args.dry_run))
    except grpc.aio.AioRpcError as exc:
        print(f"config-apply: failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        log.error("config apply failed", code=exc.code().name, details=exc.details())
        return 1
    for step in steps:
        print("\n".join(step.lines()))
    return 1 if any(step.outcome == "refused" for step in steps) else 0
