"""Automatic anchors of the audit chain: its head, appended at intervals to a file outside the
database.

One line per anchor, `TIME SERVICE SEQ HASH` (UTC ISO time, the service's name, the head's
sequence number and MAC). The file is opened O_APPEND and each line written with one
write, so lines from the replicas of one service never interleave; make the destination
write-once in production (docs/security.md, "Audit log"). `verify-audit` checks every line
of its service against the chain: a record deleted or re-chained behind an anchor fails it,
even with the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from kit.audit import parse_anchor, read_head
from kit.logging import get_logger

log = get_logger(__name__)


def anchor_line(at: datetime, service: str, seq: int, digest: str) -> str:
    return f"{at.astimezone(UTC).isoformat(timespec='seconds')} {service} {seq} {digest}\n"


def append_anchor(path: Path, line: str) -> None:
    """Append one line; never truncates or rewrites what is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class AnchorFile:
    anchors: tuple[tuple[int, str], ...]
    problems: tuple[str, ...]


def read_anchors(path: Path, service: str) -> AnchorFile:
    """The anchors of `service` in the file (none when it does not exist yet); a line that
    is not an anchor is a problem, since nothing but the services writes there."""
    anchors: list[tuple[int, str]] = []
    problems: list[str] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return AnchorFile((), ())
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        try:
            if len(parts) != 4:
                raise ValueError("not TIME SERVICE SEQ HASH")
            datetime.fromisoformat(parts[0])
            anchor = parse_anchor(f"{parts[2]}:{parts[3]}")
        except ValueError:
            problems.append(f"{path}:{number}: not an anchor line ({line[:80]!r})")
            continue
        if parts[1] == service:
            anchors.append(anchor)
    return AnchorFile(tuple(anchors), tuple(problems))


async def anchor_loop(
    stopping: asyncio.Event,
    *,
    engine: Engine,
    head: Any,
    service: str,
    path: Path,
    interval_s: float,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Anchor the head every `interval_s` while it moves, and once more on the way out."""
    last: tuple[int, str] | None = None
    while True:
        stopped = stopping.is_set()
        try:
            current = await asyncio.to_thread(_head, engine, head)
            # seq 0: a head created empty by a migration, nothing to anchor yet.
            if current is not None and current[0] > 0 and current != last:
                await asyncio.to_thread(append_anchor, path, anchor_line(clock(), service, *current))
                last = current
        except Exception as exc:  # the database or the volume is away: try again next time
            log.warning("audit anchor not written", error=type(exc).__name__, path=str(path))
        if stopped:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval_s)


def _head(engine: Engine, head: Any) -> tuple[int, str] | None:
    with engine.connect() as connection:
        return read_head(connection, head)
