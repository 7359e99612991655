"""What a module logs, whatever structlog's configuration.

structlog's capture_logs() swaps the processors, but kit.logging.configure_logging caches each
logger on first use: once a test in the same process has run a service's main() (which
configures logging), a module-level logger used since is cached and capture_logs misses its
lines. Replacing the module's `log` itself always sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


class _Recorder:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def emit(event: str = "", *args: Any, **fields: Any) -> None:
            self.lines.append({"event": event % args if args else event, "log_level": level, **fields})

        return emit


def capture(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[dict[str, Any]]:
    """The lines `module` logs through its module-level `log` from now on, as capture_logs
    gives them: {"event": ..., "log_level": "warning", **fields}."""
    recorder = _Recorder()
    monkeypatch.setattr(module, "log", recorder)
    return recorder.lines
