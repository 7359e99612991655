"""Typed reads of the environment, validated at start-up.

Each service reads its settings into one frozen object through an `Env`, which
collects every problem before failing, so an operator sees all bad or missing
values at once instead of one per restart. The settings every service shares are
in kit.settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

_N = TypeVar("_N", int, float)

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(Exception):
    """One or more settings are missing or invalid."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


class Env:
    """Typed reads of environment variables that record problems instead of raising."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self.problems: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str | None = None) -> str:
        value = self._raw(name)
        if value is not None:
            return value
        if default is None:
            self.problems.append(f"{name} is required but not set")
            return ""
        return default

    def optional(self, name: str) -> str | None:
        return self._raw(name)

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name}={raw!r} is not a whole number")
            return default
        return self._in_range(name, value, minimum, maximum)

    def number(
        self, name: str, default: float, *, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name}={raw!r} is not a number")
            return default
        return self._in_range(name, value, minimum, maximum)

    def _in_range(self, name: str, value: _N, minimum: _N | None, maximum: _N | None) -> _N:
        if minimum is not None and value < minimum:
            self.problems.append(f"{name}={value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            self.problems.append(f"{name}={value} is above the maximum {maximum}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        self.problems.append(f"{name}={raw!r} is not a boolean (true/false)")
        return default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            self.problems.append(f"{name}={value!r} is not one of {', '.join(choices)}")
        return value

    def address(self, name: str, default: str) -> str:
        value = self.text(name, default)
        match = _ADDRESS.match(value)
        if match is None or not 0 <= int(match.group(2)) <= 65535:
            self.problems.append(f"{name}={value!r} is not a host:port address")
        return value

    def address_list(self, name: str) -> list[str] | None:
        """A comma-separated list of host:port addresses in the given order; None when unset."""
        raw = self._raw(name)
        if raw is None:
            return None
        addresses = [a.strip() for a in raw.split(",")]
        for position, value in enumerate(addresses):
            match = _ADDRESS.match(value)
            if match is None or not 0 <= int(match.group(2)) <= 65535:
                self.problems.append(f"{name}: entry {position} {value!r} is not a host:port address")
        return addresses

    def file(self, name: str, default: Path | None = None) -> Path:
        raw = self._raw(name)
        if raw is None and default is None:
            self.problems.append(f"{name} is required but not set")
            return Path()
        path = Path(raw) if raw is not None else default
        assert path is not None
        if not path.is_file():
            self.problems.append(f"{name}={str(path)!r}: no such file")
        return path

    def optional_file(self, name: str) -> Path | None:
        """The file `name` names, which must exist; None when unset."""
        raw = self._raw(name)
        if raw is None:
            return None
        if not Path(raw).is_file():
            self.problems.append(f"{name}={raw!r}: no such file")
        return Path(raw)

    def check(self) -> None:
        """Raise SettingsError listing every problem recorded so far."""
        if self.problems:
            raise SettingsError(list(self.problems))
