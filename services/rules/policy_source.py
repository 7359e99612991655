"""The score policy backtests score with: score's active one, read at the start of each backtest.

Score keeps its policies in its store and changes them only through ActivatePolicy, so a
file mounted beside rules would say nothing about what is live. Each backtest asks score
(GetActivePolicy, with rules' own service token, scope egret.score.apply) and scores
under the answer; the report names its version (`policy_version`). A backtest that
cannot read it fails with UNAVAILABLE instead of scoring under a guess.
"""

from __future__ import annotations

import grpc

from domain.policy import PolicyError, ScorePolicy, policy_from_text
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.errors import Unavailable
from kit.interceptors import PeerCredentials, open_channel
from kit.settings import PeerSettings


class ActivePolicy:
    """Reads score's active policy over a channel of its own, opened on first use."""

    def __init__(self, peer: PeerSettings, credentials: PeerCredentials | None) -> None:
        self._peer = peer
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None

    async def __call__(self) -> ScorePolicy:
        if self._channel is None:
            # Opened inside the serving loop: an aio channel binds to the loop it is made in.
            self._channel = open_channel(self._peer.address, self._credentials)
        stub = score_grpc.ScoreServiceStub(self._channel)
        try:
            active = await stub.GetActivePolicy(
                score_pb.GetActivePolicyRequest(), timeout=self._peer.deadline_s
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"score's active policy could not be read ({exc.code().name}: {exc.details()}); "
                "a backtest scores with it, retry when score answers"
            ) from exc
        try:
            return policy_from_text(active.policy_yaml, source=f"score's active policy {active.version}")
        except PolicyError as exc:
            # Score validated it when it was activated: this is a version skew between the two.
            raise Unavailable(f"score's active policy {active.version} does not parse here: {exc}") from exc

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
