"""The current parsed value of one or more files that are replaced while the process runs.

cert-manager, projected Secrets and ConfigMaps replace mounted files by swapping a symlink
(`..data`) to a new directory, so the files are compared by the stat of what the path
resolves to (device, inode, size, mtime, ctime), not watched with inotify on the link.
A check costs a few stat calls and happens at most once per `check_every_s`. A file
rewritten in place twice with the same size within the filesystem's timestamp granularity
(a few milliseconds) keeps its stat and is missed; a symlink swap, as the kubelet makes for
cert-manager's Secrets, always gives a new inode.

A new content replaces the value only when it parses: a half-written file, a certificate
whose key has not arrived yet, or a file missing mid-swap keeps the last good value, with
one warning per distinct state of the files (a completed write changes the stat again, and
is parsed then). docs/security.md, "Rotation without restart".
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from kit.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

# Per file: (device, inode, size, mtime ns, ctime ns); None while the file is missing.
Signature = tuple[tuple[int, int, int, int, int] | None, ...]


def signature(paths: Sequence[Path]) -> Signature:
    """What identifies the current content of `paths`, following symlinks."""
    found: list[tuple[int, int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            found.append(None)
            continue
        found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


class FileWatch(Generic[T]):
    """`parse(contents)` of `paths` (their bytes, in order), parsed again when the files change.

    The first parse happens on construction and raises, so a service with a bad file does
    not start. After that `get()` never raises: it answers the last value that parsed.
    Safe to call from any thread (gRPC calls certificate fetchers on its own threads).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        parse: Callable[[list[bytes]], T],
        *,
        what: str,
        check_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._paths = tuple(paths)
        self._parse = parse
        self._what = what
        self._check_every_s = check_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._signature = signature(self._paths)
        self._value = parse([path.read_bytes() for path in self._paths])
        # The state last seen (good or bad): a bad state is reported once, not every check.
        self._seen = self._signature
        self._checked = clock()
        self._generation = 0

    @property
    def paths(self) -> tuple[Path, ...]:
        return self._paths

    def get(self) -> T:
        """The value of the files as they last parsed."""
        self._check()
        return self._value

    @property
    def generation(self) -> int:
        """How many times a new content replaced the value: changes exactly when `get()` does."""
        self._check()
        return self._generation

    def _check(self) -> None:
        if self._clock() - self._checked < self._check_every_s:
            return
        with self._lock:
            now = self._clock()
            if now - self._checked < self._check_every_s:
                return
            self._checked = now
            before = signature(self._paths)
            if before == self._seen:
                return
            self._reload(before)

    def _reload(self, before: Signature) -> None:
        if None in before:
            missing = [str(p) for p, s in zip(self._paths, before, strict=True) if s is None]
            self._seen = before
            log.warning("file missing; keeping the last good content", what=self._what, files=missing)
            return
        try:
            contents = [path.read_bytes() for path in self._paths]
        except OSError as exc:
            # Removed between the stat and the read (a swap in progress): look again next time.
            log.info("file changed while being read; reading it again later", what=self._what, error=str(exc))
            return
        if signature(self._paths) != before:
            # Written to while being read: the next check sees the state it settles in.
            return
        self._seen = before
        try:
            value = self._parse(contents)
        except Exception as exc:
            log.warning(
                "file changed but does not parse; keeping the last good content",
                what=self._what,
                files=[str(p) for p in self._paths],
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        self._value = value
        self._signature = before
        self._generation += 1
        log.info("file reloaded", what=self._what, files=[str(p) for p in self._paths])
