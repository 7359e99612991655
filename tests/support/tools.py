"""A test that needs a tool `make setup` installs (Chromium, axe-core, node and npm)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def tool_missing(message: str) -> NoReturn:
    """Skip locally, saying what to install; fail under CI (.ci/run exports CI=true), where
    make setup installs every tool, so a missing install step cannot pass as green."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
