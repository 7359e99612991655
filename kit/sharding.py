"""Which rules shard owns a subject, and how a shard and its callers are configured.

A rules instance keeps per-subject window state, so every event of one subject must be
evaluated by the same instance. Subjects are split over N shards by a stable hash of the
subject key; ingest writes each event's outbox row for its subject's shard, and a rules
instance refuses events of another shard, so a misrouting caller fails loudly instead of
splitting one subject's state over two places.

Changing N with data in place (resharding) moves most subjects to another shard: it needs
a drain of ingest's outbox and a move of the rules state, which is not built. See
docs/architecture.md, "Scaling out rules".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from kit.env import Env
from kit.settings import PeerSettings

# A generous bound: a shard count far above this is a typo, not a deployment.
MAX_SHARDS = 1024


def shard_of(subject_key: str, shards: int) -> int:
    """The shard, in 0..shards-1, that owns `subject_key`.

    The first 8 bytes of SHA-256 over the key's UTF-8 bytes, big-endian, modulo `shards`.
    Subject keys are already HMACs, but hashing again keeps the split uniform and total
    for any key string (a future key format, a test's short key) and is written down
    here so that any other implementation (a migration script, a tool in another
    language) computes the same owner. Never change it with data in place: every
    subject would move.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if shards == 1:
        return 0
    digest = hashlib.sha256(subject_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


@dataclass(frozen=True)
class Misrouted:
    """An event sent to the wrong shard: its position in the batch and its owner."""

    index: int
    owner: int


@dataclass(frozen=True)
class Shard:
    """This rules instance's place among the shards: `index` of `count` (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} is not a valid shard")

    def owns(self, subject_key: str) -> bool:
        return shard_of(subject_key, self.count) == self.index

    def misrouted(self, subject_keys: Iterable[str]) -> list[Misrouted]:
        """Every subject key in the batch that another shard owns; empty when all are ours."""
        if self.count == 1:
            return []
        return [
            Misrouted(i, owner)
            for i, key in enumerate(subject_keys)
            if (owner := shard_of(key, self.count)) != self.index
        ]

    def describe(self) -> str:
        return f"shard {self.index} of {self.count}"

    def refusal(self, misrouted: list[Misrouted]) -> str:
        """Why a batch holding `misrouted` events is refused, naming the shards involved."""
        shown = ", ".join(f"events[{m.index}] → shard {m.owner}" for m in misrouted[:5])
        more = f" and {len(misrouted) - 5} more" if len(misrouted) > 5 else ""
        return (
            f"this rules instance is {self.describe()}; {len(misrouted)} event(s) belong to "
            f"other shards ({shown}{more}): the caller routes with another shard count or address order"
        )

    @classmethod
    def read(cls, env: Env, *, prefix: str) -> Shard:
        """`<prefix>_SHARD` (0-based, default 0) of `<prefix>_SHARDS` (default 1)."""
        count = env.integer(f"{prefix}_SHARDS", 1, minimum=1, maximum=MAX_SHARDS)
        index = env.integer(f"{prefix}_SHARD", 0, minimum=0)
        if 1 <= count <= MAX_SHARDS and index >= count:
            env.problems.append(f"{prefix}_SHARD={index} must be below {prefix}_SHARDS={count}")
        if not (1 <= count <= MAX_SHARDS and 0 <= index < count):
            return cls()  # the problem is recorded; settings fail before this is used
        return cls(index, count)


# The default: one instance that owns every subject.
UNSHARDED = Shard()


def read_shard_peers(env: Env, *, prefix: str, default_address: str) -> tuple[PeerSettings, ...]:
    """The sharded downstream's instances in shard order, one PeerSettings each.

    `<prefix>_ADDRESSES` (comma-separated, shard 0 first) names N shards; without it,
    `<prefix>_ADDRESS` names the one unsharded instance. Both may be set only if they
    agree on shard 0, so a half-edited deployment is caught at start-up rather than
    routing by a list the operator did not mean.
    """
    single = PeerSettings.read(env, prefix=prefix, default_address=default_address)
    addresses = env.address_list(f"{prefix}_ADDRESSES")
    if addresses is None:
        return (single,)
    if len(addresses) > MAX_SHARDS:
        env.problems.append(f"{prefix}_ADDRESSES names {len(addresses)} shards; at most {MAX_SHARDS}")
    if len(set(addresses)) != len(addresses):
        env.problems.append(f"{prefix}_ADDRESSES names one address twice; each shard needs its own")
    explicit = env.optional(f"{prefix}_ADDRESS")
    if explicit is not None and addresses and explicit != addresses[0]:
        env.problems.append(
            f"{prefix}_ADDRESS={explicit!r} differs from shard 0 of {prefix}_ADDRESSES "
            f"({addresses[0]!r}); set only {prefix}_ADDRESSES"
        )
    return tuple(PeerSettings(address=a, deadline_s=single.deadline_s) for a in addresses)
