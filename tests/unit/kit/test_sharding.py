"""Splitting subjects over rules shards: a stable, uniform owner per subject, and its settings."""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter

import pytest

from kit.env import Env
from kit.pseudonym import Pseudonymiser
from kit.sharding import Misrouted, Shard, read_shard_peers, shard_of
from tests.support.events import resident_id


def test_the_owner_of_a_subject_never_changes_between_processes_or_releases() -> None:
    # Pinned values: a change to the formula would move every stored subject to another shard.
    assert [shard_of("a" * 64, n) for n in (1, 2, 3, 7, 16)] == [0, 1, 2, 6, 13]
    assert [shard_of("subject-1", n) for n in (1, 2, 3, 7, 16)] == [0, 1, 0, 1, 15]
    # The documented formula, so another tool can compute the same owner.
    key = Pseudonymiser(b"k" * 32, "k1").subject_key("person", "resident-id", "350200199001011230")
    for n in (2, 3, 5, 64):
        assert shard_of(key, n) == int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % n


def test_one_shard_owns_everything() -> None:
    assert {shard_of(secrets.token_hex(32), 1) for _ in range(100)} == {0}
    assert shard_of("", 1) == 0


def test_subjects_spread_evenly_over_the_shards() -> None:
    pseudonyms = Pseudonymiser(bytes(range(32)), "k1")  # fixed: a random key failed one run in a few hundred
    keys = [pseudonyms.subject_key("person", "resident-id", resident_id(i)) for i in range(40_000)]
    for shards in (2, 3, 8):
        counts = Counter(shard_of(k, shards) for k in keys)
        assert set(counts) == set(range(shards))
        expected = len(keys) / shards
        # Far outside binomial noise (under 2% here) only if the hash were skewed.
        assert all(abs(c - expected) < 0.05 * expected for c in counts.values()), counts


def test_a_shard_count_below_one_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        shard_of("x", 0)
    with pytest.raises(ValueError):
        Shard(2, 2)
    with pytest.raises(ValueError):
        Shard(0, 0)


def test_a_shard_lists_the_events_it_does_not_own_with_their_owner() -> None:
    keys = [secrets.token_hex(32) for _ in range(50)]
    shard = Shard(1, 3)
    wrong = shard.misrouted(keys)
    assert wrong == [Misrouted(i, shard_of(k, 3)) for i, k in enumerate(keys) if shard_of(k, 3) != 1]
    assert all(shard.owns(keys[i]) == (i not in {m.index for m in wrong}) for i in range(len(keys)))
    assert Shard().misrouted(keys) == []
    message = shard.refusal(wrong)
    assert message.startswith(f"this rules instance is shard 1 of 3; {len(wrong)} event(s) belong")
    assert f"events[{wrong[0].index}] → shard {wrong[0].owner}" in message


def test_shard_settings_default_to_one_unsharded_instance() -> None:
    env = Env({})
    assert Shard.read(env, prefix="EGRET_RULES") == Shard(0, 1)
    env = Env({"EGRET_RULES_SHARD": "2", "EGRET_RULES_SHARDS": "3"})
    assert Shard.read(env, prefix="EGRET_RULES") == Shard(2, 3)
    assert env.problems == []


def test_bad_shard_settings_are_all_reported() -> None:
    env = Env({"EGRET_RULES_SHARD": "2", "EGRET_RULES_SHARDS": "2"})
    Shard.read(env, prefix="EGRET_RULES")
    assert env.problems == ["EGRET_RULES_SHARD=2 must be below EGRET_RULES_SHARDS=2"]
    env = Env({"EGRET_RULES_SHARD": "-1", "EGRET_RULES_SHARDS": "0"})
    Shard.read(env, prefix="EGRET_RULES")
    assert env.problems == [
        "EGRET_RULES_SHARDS=0 is below the minimum 1",
        "EGRET_RULES_SHARD=-1 is below the minimum 0",
    ]


def test_callers_read_the_shard_addresses_in_shard_order() -> None:
    env = Env({"EGRET_RULES_ADDRESSES": "rules-0:50052, rules-1:50052,rules-2:50052"})
    peers = read_shard_peers(env, prefix="EGRET_RULES", default_address="127.0.0.1:50052")
    assert [p.address for p in peers] == ["rules-0:50052", "rules-1:50052", "rules-2:50052"]
    assert env.problems == []
    env = Env({"EGRET_RULES_ADDRESS": "rules:1", "EGRET_RULES_DEADLINE_SECONDS": "3"})
    (single,) = read_shard_peers(env, prefix="EGRET_RULES", default_address="127.0.0.1:50052")
    assert (single.address, single.deadline_s) == ("rules:1", 3.0)
    # The single address may stay set (e.g. by a chart) as long as it is shard 0.
    env = Env({"EGRET_RULES_ADDRESS": "a:1", "EGRET_RULES_ADDRESSES": "a:1,b:1"})
    assert len(read_shard_peers(env, prefix="EGRET_RULES", default_address="x:1")) == 2
    assert env.problems == []


def test_inconsistent_shard_addresses_stop_start_up() -> None:
    env = Env({"EGRET_RULES_ADDRESS": "b:1", "EGRET_RULES_ADDRESSES": "a:1,nowhere,a:1"})
    read_shard_peers(env, prefix="EGRET_RULES", default_address="x:1")
    assert env.problems == [
        "EGRET_RULES_ADDRESSES: entry 1 'nowhere' is not a host:port address",
        "EGRET_RULES_ADDRESSES names one address twice; each shard needs its own",
        "EGRET_RULES_ADDRESS='b:1' differs from shard 0 of EGRET_RULES_ADDRESSES ('a:1'); "
        "set only EGRET_RULES_ADDRESSES",
    ]
