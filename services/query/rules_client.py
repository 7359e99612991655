"""The positive behaviours of the active rule set, from the rules service (for Explain).

Optional: without EGRET_RULES_ADDRESS, or while rules is unreachable, Explain answers
without positive behaviours (a warning is logged); an explanation is never refused for
it. A rule set version is immutable, so its parsed rules are cached by rule_set_id; only
the cheap GetActiveRuleSet is asked on each Explain, with a short deadline.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from domain.ruleset.model import RuleSet, RuleSetError
from domain.ruleset.parsing import rule_set_from_yaml
from domain.ruleset.points import PointsExpression
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc
from kit.interceptors import PeerCredentials, open_channel
from kit.logging import get_logger
from kit.settings import PeerSettings
from services.query.explain import PositiveRule

log = get_logger(__name__)

# At most this long per call: Explain waits for rules only this long.
MAX_DEADLINE_S = 2.0


def positive_rules(rule_set: RuleSet) -> tuple[PositiveRule, ...]:
    """Rules that add points: a positive constant, or computed points of a positive-severity rule."""
    found = []
    for rule in rule_set.rules:
        if isinstance(rule.points, PointsExpression):
            if rule.severity != "positive":
                continue
            points = rule.points.source
        elif rule.points > 0:
            points = str(rule.points)
        else:
            continue
        found.append(
            PositiveRule(
                rule.id,
                rule.title,
                rule.description.source,
                points,
                rule.category,
                tuple(str(k) for k in rule.subject_kinds),
            )
        )
    return tuple(found)


class RulesClient:
    """Reads the active rule set's positive rules from the rules service."""

    def __init__(self, peer: PeerSettings, credentials: PeerCredentials | None) -> None:
        self._peer = peer
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._cache: dict[int, tuple[PositiveRule, ...]] = {}

    def _stub(self) -> rules_grpc.RulesServiceAsyncStub:
        if self._channel is None:
            # Opened lazily inside the serving loop (channels bind to it).
            self._channel = open_channel(self._peer.address, self._credentials)
        return rules_grpc.RulesServiceStub(self._channel)

    async def positive_rules(self) -> Sequence[PositiveRule] | None:
        """The active rule set's positive rules; None (with a warning) when unavailable."""
        deadline = min(self._peer.deadline_s, MAX_DEADLINE_S)
        try:
            stub = self._stub()
            active = await stub.GetActiveRuleSet(rules_pb.GetActiveRuleSetRequest(), timeout=deadline)
            rule_set_id = active.rule_set.rule_set_id
            cached = self._cache.get(rule_set_id)
            if cached is not None:
                return cached
            found = await stub.GetRuleSet(
                rules_pb.GetRuleSetRequest(rule_set_id=rule_set_id), timeout=deadline
            )
            rules = positive_rules(rule_set_from_yaml(found.rule_set.source))
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "rules service unavailable; explaining without positive behaviours", code=exc.code().name
            )
            return None
        except RuleSetError as exc:
            log.warning(
                "active rule set does not parse; explaining without positive behaviours", error=str(exc)
            )
            return None
        self._cache[rule_set_id] = rules
        return rules

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
