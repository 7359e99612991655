"""Run a service's real gRPC server in the test's event loop, on a free loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from kit.app import migrate
from kit.server import Service, serve
from kit.settings import CommonSettings, SecuritySettings, SqliteTuning


def common_settings(service: str, database_url: str, data_dir: Path) -> CommonSettings:
    return CommonSettings(
        service=service,
        listen_address="127.0.0.1:0",
        database_url=database_url,
        data_dir=data_dir,
        log_format="console",
        log_level="warning",
        shutdown_grace_s=2.0,
        health_interval_s=0.2,
        migrate_on_start=True,
        sqlite=SqliteTuning(synchronous="NORMAL"),
        security=SecuritySettings(insecure=True),
    )


@asynccontextmanager
async def running(
    settings: Any, build: Callable[[Any], Service], migrations_dir: Path | None
) -> AsyncIterator[str]:
    """Migrate, build and serve `settings.common`'s service; yield its address, then stop it."""
    common: CommonSettings = settings.common
    if migrations_dir is not None:
        migrate(common, migrations_dir)
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(common, build(settings), stop=stop, started=ready.set_result))
    waiting: list[asyncio.Future[Any]] = [task, ready]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up error
    try:
        yield f"127.0.0.1:{ready.result()}"
    finally:
        stop.set()
        await task


def with_common(settings: Any, **changes: Any) -> Any:
    return replace(settings, common=replace(settings.common, **changes))


class _DefaultDeadline(grpc.aio.UnaryUnaryClientInterceptor):
    """Gives unary calls without a deadline one, as every real client must (ingest requires
    it). Streaming calls in tests set their deadline explicitly."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details = client_call_details
        if details.timeout is None:
            details = details._replace(timeout=self._seconds)
        return await continuation(details, request)


def client_channel(address: str, default_deadline_s: float = 30.0) -> grpc.aio.Channel:
    """A plaintext test channel whose unary calls get a deadline unless they set their own."""
    return grpc.aio.insecure_channel(address, interceptors=[_DefaultDeadline(default_deadline_s)])
