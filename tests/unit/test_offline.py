"""The unit ring's guard holds: a unit test can open no network socket and start no process."""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import subprocess

import grpc
import pytest
from pytest_socket import SocketBlockedError

from tests.support.offline import GrpcBlockedError, ProcessBlockedError


def test_a_network_connection_is_refused() -> None:
    # pytest-socket also warns, so that a refusal a library swallows still shows in the report.
    with pytest.warns(UserWarning, match="socket"), pytest.raises(SocketBlockedError):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 9))


def test_a_child_process_is_refused() -> None:
    with pytest.raises(ProcessBlockedError):
        subprocess.run(["true"], check=False)
    with pytest.raises(ProcessBlockedError):
        multiprocessing.Process(target=print).start()


def test_a_grpc_server_or_channel_is_refused() -> None:
    with pytest.raises(GrpcBlockedError):
        grpc.aio.server()
    with pytest.raises(GrpcBlockedError):
        grpc.aio.insecure_channel("127.0.0.1:9")
    with pytest.raises(GrpcBlockedError):
        grpc.insecure_channel("127.0.0.1:9")


def test_an_event_loop_still_runs() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert asyncio.run(answer()) == 42
