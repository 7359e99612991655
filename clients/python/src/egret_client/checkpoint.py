"""The checkpoint of a resumable file submission: which batches of the file ingest has
acknowledged, so an interrupted run sends only the rest.

A batch is a run of `batch_size` consecutive records of the file; its id is derived from
the file's SHA-256 and its index, so a batch id never names different events. The
checkpoint is JSON Lines: a header naming the file's hash, the source and the batch size,
then one line per acknowledged batch with its counts, appended and flushed as each
acknowledgement arrives. A run killed at any moment leaves at worst a torn last line,
which is ignored; batches sent but not yet recorded are sent again and come back as
duplicates (ingest is idempotent on (source, event_id)).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

KIND = "egret-submit-checkpoint/1"


class CheckpointMismatch(Exception):
    """The checkpoint belongs to another file (or source, or batch size) than this run's."""


def file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@dataclass(frozen=True)
class Identity:
    """What a checkpoint is a checkpoint of."""

    sha256: str
    source: str
    batch_size: int


@dataclass
class Counts:
    """One batch's (or a whole run's) results: ingest's four, and records not sent because
    they could not be read as events."""

    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    conflict: int = 0
    invalid: int = 0

    def add(self, other: Counts) -> None:
        for name in _COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def records(self) -> int:
        return sum(getattr(self, name) for name in _COUNT_FIELDS)


_COUNT_FIELDS = tuple(field.name for field in fields(Counts))


class Checkpoint:
    """The acknowledged batches of one file; `record` appends as acknowledgements arrive.

    `open` resumes an existing checkpoint of the same file and refuses one of another
    (CheckpointMismatch); the file is only written once the first batch is recorded.
    """

    def __init__(self, path: Path, identity: Identity, acked: dict[int, Counts] | None = None) -> None:
        self.path = path
        self.identity = identity
        self.acked: dict[int, Counts] = dict(acked or {})
        self._stream: IO[str] | None = None

    @classmethod
    def open(cls, path: Path, identity: Identity, *, file_name: str = "") -> Checkpoint:
        if not path.exists():
            return cls(path, identity)
        header, acked = _load(path)
        name = file_name or "the file"
        if header.get("kind") != KIND:
            raise CheckpointMismatch(f"{path} is not a checkpoint of `egret submit`")
        if header.get("sha256") != identity.sha256:
            raise CheckpointMismatch(
                f"{name} changed since the checkpoint {path} was written (its SHA-256 was "
                f"{str(header.get('sha256'))[:16]}…, now {identity.sha256[:16]}…): resuming would skip "
                f"or resend the wrong events. Restore the file, or delete {path} to submit this "
                "content from the start (events already accepted then come back as duplicates)."
            )
        if header.get("source") != identity.source:
            raise CheckpointMismatch(
                f"the checkpoint {path} is of a submission as {header.get('source')!r}, not "
                f"{identity.source!r}; resume as {header.get('source')!r} or delete the checkpoint"
            )
        stored = cls(path, Identity(identity.sha256, identity.source, int(header["batch_size"])), acked)
        # Written afresh, so that a torn last line of a killed run is not appended to.
        stored._rewrite()
        return stored

    @property
    def resumed(self) -> bool:
        return bool(self.acked)

    def batch_id(self, index: int) -> str:
        return f"{self.identity.sha256[:16]}-{index:08d}"

    def done(self, index: int) -> bool:
        return index in self.acked

    def totals(self) -> Counts:
        total = Counts()
        for counts in self.acked.values():
            total.add(counts)
        return total

    def record(self, index: int, counts: Counts) -> None:
        """Note batch `index` as acknowledged with its counts (flushed: survives a kill)."""
        stream = self._open_for_append()
        self.acked[index] = counts
        stream.write(json.dumps({"batch": index, **asdict(counts)}, separators=(",", ":")) + "\n")
        stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._stream.close()
            self._stream = None

    def remove(self) -> None:
        """The file went through: the checkpoint has nothing left to resume."""
        self.close()
        self.path.unlink(missing_ok=True)

    def _header(self) -> str:
        return json.dumps({"kind": KIND, **asdict(self.identity)}, separators=(",", ":")) + "\n"

    def _open_for_append(self) -> IO[str]:
        if self._stream is None:
            if not self.path.exists():
                self._rewrite()
            self._stream = self.path.open("a", encoding="utf-8")
        return self._stream

    def _rewrite(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w", encoding="utf-8") as stream:
            stream.write(self._header())
            for index, counts in sorted(self.acked.items()):
                stream.write(json.dumps({"batch": index, **asdict(counts)}, separators=(",", ":")) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        temporary.replace(self.path)


def _load(path: Path) -> tuple[dict[str, Any], dict[int, Counts]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointMismatch(f"cannot read the checkpoint {path}: {exc}") from None
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if not isinstance(header, dict) or not isinstance(header.get("batch_size"), int):
        raise CheckpointMismatch(f"{path} is not a checkpoint of `egret submit`")
    acked: dict[int, Counts] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            acked[int(entry["batch"])] = Counts(**{name: int(entry.get(name, 0)) for name in _COUNT_FIELDS})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            # The last line of a run killed while writing it: that batch is simply resent.
            continue
    return header, acked
