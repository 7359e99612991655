"""Lines a caller can provoke at will are rate-limited per key, and the next line that
passes says how many were dropped."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from kit.logging import Throttle


def test_a_flood_of_one_key_is_cut_to_the_burst_then_the_rate() -> None:
    now = [0.0]
    throttle = Throttle(rate=1.0, burst=3.0, clock=lambda: now[0])

    def log(key: Any) -> dict[str, Any] | None:
        try:
            return dict(throttle(None, "info", {"event": "rpc rejected", "throttle": key}))
        except structlog.DropEvent:
            return None

    passed = [log(("/a", "INVALID_ARGUMENT")) for _ in range(100)]
    assert sum(p is not None for p in passed) == 3
    assert all("throttle" not in p for p in passed if p is not None)
    assert log(("/b", "INVALID_ARGUMENT")) is not None  # another key has its own bucket
    now[0] = 1.0
    after = log(("/a", "INVALID_ARGUMENT"))
    assert after is not None
    assert after["suppressed"] == 97


def test_lines_without_a_throttle_key_always_pass() -> None:
    throttle = Throttle(rate=1.0, burst=1.0)
    for _ in range(10):
        assert throttle(None, "info", {"event": "serving"}) == {"event": "serving"}
    throttle(None, "info", {"event": "x", "throttle": "k"})
    with pytest.raises(structlog.DropEvent):
        throttle(None, "info", {"event": "x", "throttle": "k"})
