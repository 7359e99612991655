"""Keeping a test in its own process and off the network: what the unit ring's conftest enforces.

Network sockets are refused by pytest-socket; Unix sockets stay allowed because every asyncio event loop
opens a socketpair to wake itself. Child processes are refused at the one place subprocess (and so asyncio)
starts them, and at os.fork.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import pytest
from pytest_socket import disable_socket, enable_socket


class ProcessBlockedError(RuntimeError):
    """A test that must stay in process tried to start a process."""


def _refuse_process(*_args: object, **_kwargs: object) -> NoReturn:
    raise ProcessBlockedError("a unit test started a process: move it to tests/integration")


@contextmanager
def offline_and_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within: no network socket, no child process (monkeypatch undoes the process guard after the test)."""
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse_process)
    monkeypatch.setattr(os, "fork", _refuse_process)
    disable_socket(allow_unix_socket=True)
    try:
        yield
    finally:
        enable_socket()
