"""Request limits per RPC and the limit settings (kit.limits, kit.settings.LimitSettings)."""

from __future__ import annotations

from kit.env import Env
from kit.limits import MiB, request_limit, server_options, service_limit
from kit.settings import LimitSettings

DEFAULTS = LimitSettings()


def test_batches_take_the_configured_size_sources_two_mib_and_the_rest_one() -> None:
    assert request_limit("/egret.ingest.v1.IngestService/StreamEvents", DEFAULTS) == 4 * MiB
    assert request_limit("/egret.rules.v1.RulesService/CreateDraft", DEFAULTS) == 2 * MiB
    assert request_limit("/egret.query.v1.QueryService/GetScore", DEFAULTS) == 1 * MiB


def test_grpc_receives_at_most_the_largest_request_of_the_service() -> None:
    assert service_limit(["egret.query.v1.QueryService"], DEFAULTS) == 1 * MiB
    assert service_limit(["egret.score.v1.ScoreService"], LimitSettings(max_message_bytes=8 * MiB)) == 8 * MiB
    options = dict(server_options(["egret.rules.v1.RulesService"], DEFAULTS))
    assert options["grpc.max_receive_message_length"] == 4 * MiB
    assert options["grpc.http2.bdp_probe"] == 0


def test_settings_read_and_streams_must_stay_below_calls() -> None:
    env = Env({"EGRET_MAX_CONCURRENT_RPCS": "8", "EGRET_MAX_CONCURRENT_STREAMS": "3"})
    assert LimitSettings.read(env) == LimitSettings(max_concurrent_rpcs=8, max_concurrent_streams=3)
    assert env.problems == []
    env = Env({"EGRET_MAX_CONCURRENT_RPCS": "4", "EGRET_MAX_CONCURRENT_STREAMS": "4"})
    LimitSettings.read(env)
    assert any("EGRET_MAX_CONCURRENT_STREAMS=4 must be below" in p for p in env.problems)
