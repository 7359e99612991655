"""The admin port (kit.admin) on loopback: probes tell the truth, nothing else is served."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from kit.admin import LIVENESS_TIMEOUT_S, AdminServer, Readiness
from tests.support.scrape import status

Admin = tuple[AdminServer, Readiness, str]


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    registry = CollectorRegistry()
    Counter("egret_test_things", "things counted", registry=registry).inc(3)
    readiness = Readiness()
    server = AdminServer(
        "127.0.0.1:0", readiness=readiness, loop=asyncio.get_running_loop(), registry=registry
    )
    server.start()
    try:
        yield server, readiness, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


async def _status(url: str, path: str, method: str = "GET") -> int:
    # The server answers from its own thread; the loop must stay free to answer /healthz.
    return await asyncio.to_thread(status, url, path, method)


async def test_readyz_follows_the_database_watch_and_shutdown(
    admin: Admin,
) -> None:
    _, readiness, url = admin
    assert await _status(url, "/readyz") == 503  # not checked yet
    readiness.database_ok = True
    assert await _status(url, "/readyz") == 200
    readiness.database_ok = False
    assert await _status(url, "/readyz") == 503
    readiness.database_ok, readiness.stopping = True, True
    assert await _status(url, "/readyz") == 503
    # Liveness is another question: the process still answers.
    assert await _status(url, "/healthz") == 200


def _block(seconds: float) -> None:
    """Hold the calling thread, as a handler stuck in blocking work holds the event loop."""
    time.sleep(seconds)


async def test_healthz_fails_while_the_event_loop_is_stuck(admin: Admin) -> None:
    _, _, url = admin
    answers: list[int] = []
    # Asked while the loop is held: the admin thread asks the loop, which cannot answer.
    asking = threading.Timer(0.2, lambda: answers.append(status(url, "/healthz")))
    asking.start()
    _block(LIVENESS_TIMEOUT_S + 1.0)
    await asyncio.to_thread(asking.join)
    assert answers == [503]
    assert await _status(url, "/healthz") == 200


async def test_metrics_and_nothing_else(admin: Admin) -> None:
    _, _, url = admin
    assert await _status(url, "/metrics") == 200
    text = await asyncio.to_thread(
        lambda: __import__("urllib.request").request.urlopen(f"{url}/metrics").read()
    )
    assert b"egret_test_things_total 3.0" in text
    for path in ("/", "/metrics/", "/debug", "/readyz/x", "/../etc/passwd"):
        assert await _status(url, path) == 404, path
    assert await _status(url, "/metrics", "POST") == 405
    assert await _status(url, "/healthz", "DELETE") == 405


async def test_metrics_off_serves_probes_only() -> None:
    readiness = Readiness()
    readiness.database_ok = True
    server = AdminServer("127.0.0.1:0", readiness=readiness, loop=asyncio.get_running_loop(), registry=None)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert await _status(url, "/metrics") == 404
        assert await _status(url, "/readyz") == 200
    finally:
        server.stop()
