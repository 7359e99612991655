"""A service's shutdown: clients of other services are closed after in-flight calls end,
before the worker pools stop, and a closer that fails does not stop the rest."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from kit.db import create_engine
from kit.server import Service, serve
from tests.support.servers import common_settings


async def test_closers_run_once_after_the_server_stops_even_if_one_fails(tmp_path: Path) -> None:
    settings = common_settings("closing", f"sqlite:///{tmp_path / 'closing.db'}", tmp_path)
    executor = ThreadPoolExecutor(max_workers=1)
    events: list[str] = []

    async def failing() -> None:
        events.append("failing")
        raise RuntimeError("the peer went away first")

    async def closing() -> None:
        # The executor is still usable: pools are shut down after the clients.
        events.append(await asyncio.get_running_loop().run_in_executor(executor, lambda: "closed"))

    def register(_server: grpc.aio.Server) -> None:
        pass

    service = Service(
        name="closing",
        service_names=[],
        register=register,
        engines=[create_engine(settings.database_url)],
        executors=[executor],
        closers=[failing, closing],
    )
    stop = asyncio.Event()
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, service, stop=stop, started=started.set_result))
    await asyncio.wait_for(started, 10)
    assert events == []

    stop.set()
    await asyncio.wait_for(task, 10)

    assert events == ["failing", "closed"]
