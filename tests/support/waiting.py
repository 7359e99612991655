"""Waiting in tests: poll a condition until it holds, or fail at a deadline saying what was awaited.

A condition is met when it returns True, or, for an assertion-style check, when it returns None
without raising. False or an AssertionError means "not yet"; the last AssertionError is chained to
the timeout's error, so the report shows what still differed.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeAlias

WITHIN_S = 10.0
EVERY_S = 0.02

Check: TypeAlias = Callable[[], bool | None]
AsyncCheck: TypeAlias = Callable[[], bool | Awaitable[bool | None] | None]


def wait_until(
    condition: Check, *, what: str = "", within_s: float = WITHIN_S, every_s: float = EVERY_S
) -> None:
    """Blocks the calling thread until `condition` holds; AssertionError naming `what` after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        last = _attempt(condition)
        if last is None:
            return
        if time.monotonic() > deadline:
            raise _timeout(condition, what, within_s, last)
        time.sleep(every_s)


async def until(
    condition: AsyncCheck, *, what: str = "", within_s: float = WITHIN_S, every_s: float = EVERY_S
) -> None:
    """Awaits until `condition` (sync or async) holds; AssertionError naming `what` after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            last: AssertionError | None = _NOT_YET if result is False else None
        except AssertionError as failed:
            last = failed
        if last is None:
            return
        if time.monotonic() > deadline:
            raise _timeout(condition, what, within_s, last)
        await asyncio.sleep(every_s)


_NOT_YET = AssertionError("the condition returned False")


def _attempt(condition: Check) -> AssertionError | None:
    try:
        return _NOT_YET if condition() is False else None
    except AssertionError as failed:
        return failed


def _timeout(condition: object, what: str, within_s: float, last: AssertionError) -> AssertionError:
    error = AssertionError(f"not reached within {within_s:g}s: {what or _where(condition)}")
    error.__cause__ = None if last is _NOT_YET else last
    return error


def _where(condition: object) -> str:
    """Names an undescribed condition by where it is written, e.g. `<lambda> at test_x.py:82`."""
    code = getattr(condition, "__code__", None)
    name = getattr(condition, "__qualname__", repr(condition))
    if code is None:
        return name
    return f"{name} at {os.path.basename(code.co_filename)}:{code.co_firstlineno}"
