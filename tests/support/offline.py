"""Keeping a test in its own process and off the network: what the unit ring's conftest enforces.

Network sockets are refused by pytest-socket; Unix sockets stay allowed because every asyncio event loop
opens a socketpair to wake itself. gRPC's own sockets are out of pytest-socket's sight, so its servers and
channels are refused where they are made. Child processes are refused where subprocess (and so asyncio),
multiprocessing and os start them.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import grpc
import pytest
from pytest_socket import disable_socket, enable_socket


class ProcessBlockedError(RuntimeError):
    """A test that must stay in process tried to start a process."""


class GrpcBlockedError(RuntimeError):
    """A test that must stay off the network made a gRPC server or channel."""


def _refuse_process(*_args: object, **_kwargs: object) -> NoReturn:
    raise ProcessBlockedError("a unit test started a process: move it to tests/integration")


def _refuse_grpc(*_args: object, **_kwargs: object) -> NoReturn:
    raise GrpcBlockedError("a unit test made a gRPC server or channel: move it to tests/integration")


@contextmanager
def offline_and_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within: no network socket, gRPC server or channel, no child process (monkeypatch undoes its part)."""
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse_process)
    for starter in ("fork", "system", "posix_spawn", "posix_spawnp"):
        monkeypatch.setattr(os, starter, _refuse_process)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse_process)
    for module in (grpc, grpc.aio):
        for maker in ("server", "insecure_channel", "secure_channel"):
            monkeypatch.setattr(module, maker, _refuse_grpc)
    disable_socket(allow_unix_socket=True)
    try:
        yield
    finally:
        enable_socket()
