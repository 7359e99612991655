"""The rate limit charges each call its declared cost, per principal, in bounded memory;
a request stream is charged per message and ends when its token does."""

from __future__ import annotations

import pytest

from kit.auth import CallPolicy, Gate, allow
from kit.errors import ResourceExhausted, Unauthenticated
from kit.principal import Principal, Role
from kit.rate_limit import RateLimiter
from kit.tokens import TokenVerifier

RPC = "/egret.query.v1.QueryService/ListScoreHistory"


def test_a_call_takes_its_cost_from_the_bucket_and_a_refusal_names_the_wait_for_that_cost() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=10.0, clock=lambda: now[0])
    assert limiter.acquire("reviewer-1", cost=6.0) == 0.0
    assert limiter.acquire("reviewer-1", cost=6.0) == pytest.approx(1.0)  # 4 left, 2 short at 2/s
    assert limiter.acquire("reviewer-1", cost=4.0) == 0.0  # a refusal takes nothing
    assert limiter.acquire("reviewer-2", cost=10.0) == 0.0  # per principal
    # A call dearer than the whole bucket waits for a full bucket, never forever.
    now[0] += 1.0
    assert limiter.acquire("reviewer-1", cost=50.0) == pytest.approx(4.0)
    now[0] += 4.0
    assert limiter.acquire("reviewer-1", cost=50.0) == 0.0


def test_idle_buckets_are_dropped_so_memory_does_not_grow_with_the_population() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=10.0, burst=20.0, clock=lambda: now[0])  # full again after 2 s
    for i in range(100_000):  # a population calling once each, 1,000 a second
        now[0] = i / 1000
        assert limiter.acquire(f"subject:{i}") == 0.0
    # Only those seen in the last 2 s are held: the others' buckets were full again.
    assert limiter.held <= 2_001
    now[0] += 2.0
    limiter.acquire("late")
    assert limiter.held == 1


def test_a_dropped_bucket_was_full_so_dropping_it_changes_no_outcome() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=2.0, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    now[0] = 1.9  # not yet refilled: kept, still short
    limiter.acquire("b")
    assert limiter.held == 2
    assert limiter.acquire("a", cost=2.0) == pytest.approx(0.1)


def test_the_number_of_buckets_is_capped_even_when_every_principal_is_busy() -> None:
    limiter = RateLimiter(rate=1.0, burst=100.0, clock=lambda: 0.0, max_buckets=1_000)
    for i in range(10_000):
        limiter.acquire(f"department-{i}")
    assert limiter.held == 1_000


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _gate(clock: _Clock, policy: CallPolicy) -> Gate:
    verifier = TokenVerifier(keys={None: b""}, issuer="i", audience="a", clock=clock)
    limiter = RateLimiter(rate=1.0, burst=10.0, clock=clock)
    return Gate(verifier, {RPC: policy}, limiter)


def test_each_message_of_a_stream_is_charged_the_rpc_cost_and_refused_beyond_the_rate() -> None:
    clock = _Clock()
    gate = _gate(clock, allow(Role.REVIEWER, cost=4.0))
    principal = Principal("reviewer-1", Role.REVIEWER, valid_until=clock.now + 60)
    gate.readmit(RPC, principal)
    gate.readmit(RPC, principal)
    with pytest.raises(ResourceExhausted) as refused:
        gate.readmit(RPC, principal)
    assert refused.value.retry_after_s == pytest.approx(2.0)


def test_a_message_after_the_token_expired_is_unauthenticated() -> None:
    clock = _Clock()
    gate = _gate(clock, allow(Role.REVIEWER))
    principal = Principal("reviewer-1", Role.REVIEWER, valid_until=clock.now + 5)
    gate.readmit(RPC, principal)
    assert gate.seconds_left(principal) == pytest.approx(5.0)
    clock.now += 5
    with pytest.raises(Unauthenticated, match="token expired"):
        gate.readmit(RPC, principal)


def test_every_rpc_costs_something() -> None:
    assert allow(Role.ADMIN).cost == 1.0
    with pytest.raises(ValueError, match="costs something"):
        allow(Role.ADMIN, cost=0)
