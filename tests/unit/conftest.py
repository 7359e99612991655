"""The unit ring runs in this process only: no network sockets and no child processes.

A test that needs either belongs in tests/integration. Unix sockets stay allowed because every asyncio event
loop opens a socketpair to wake itself.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import NoReturn

import pytest
from pytest_socket import disable_socket, enable_socket


class ProcessBlockedError(RuntimeError):
    """A unit test tried to start a process."""


def _refuse_process(*_args: object, **_kwargs: object) -> NoReturn:
    raise ProcessBlockedError("a unit test started a process: move it to tests/integration")


@pytest.fixture(autouse=True)
def _offline_and_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse_process)
    monkeypatch.setattr(os, "fork", _refuse_process)
    disable_socket(allow_unix_socket=True)
    try:
        yield
    finally:
        enable_socket()
