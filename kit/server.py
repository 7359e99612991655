"""The gRPC server runtime every service runs: one shape for all four.

A service's bootstrap builds a `Service` (its servicers, background loops and
database engine) and hands it to `run_service`, which adds grpc.health.v1 and
reflection, runs the interceptor chain, watches the database (NOT_SERVING while it
is unreachable) and shuts down gracefully on SIGTERM or SIGINT: health flips to
NOT_SERVING, new calls are refused, in-flight calls get the grace period to finish,
then background loops finish their current batch and the engine is disposed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy.engine import Engine

from kit.admin import Readiness
from kit.audit_chain import POLICY as AUDIT_CHAIN_POLICY
from kit.audit_chain import SERVICE_NAME as AUDIT_CHAIN_SERVICE
from kit.audit_chain import AuditChainServicer
from kit.auth import CallPolicy, Gate
from kit.db import ping
from kit.interceptors import OnePass, ServerInterceptor
from kit.limits import LimitInterceptor, server_options
from kit.logging import get_logger
from kit.pseudonym import Pseudonymiser
from kit.reflection import enable_reflection
from kit.rpc_metrics import RpcMetricsInterceptor
from kit.security import rate_limiter, server_credentials, token_verifier
from kit.settings import CommonSettings, LimitSettings

log = get_logger(__name__)

BackgroundLoop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


@dataclass
class Service:
    """What a service's bootstrap gives the runtime."""

    name: str
    # Fully-qualified gRPC service names, for health and reflection.
    service_names: Sequence[str]
    register: Callable[[grpc.aio.Server], None]
    engines: Sequence[Engine]
    # Who may call which RPC (full method name → policy); RPCs not listed are refused.
    policy: Mapping[str, CallPolicy] = field(default_factory=dict)
    # To turn a subject's token into its subject key (services that serve subjects).
    pseudonymiser: Pseudonymiser | None = None
    background: Sequence[BackgroundLoop] = field(default_factory=list)
    # Worker pools of blocking (database, engine) work, shut down after in-flight calls end.
    executors: Sequence[Executor] = field(default_factory=list)
    # Closed after in-flight calls end, before the executors: clients of other services.
    closers: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The audit log's state as a gRPC read (kit.audit_chain), for services with an audit log.
    audit_chain: AuditChainServicer | None = None


async def _watch_database(
    service: Service,
    health_servicer: health.aio.HealthServicer,
    readiness: Readiness,
    interval_s: float,
    stopping: asyncio.Event,
) -> None:
    serving: bool | None = None
    while not stopping.is_set():
        ok = all([await asyncio.to_thread(ping, engine) for engine in service.engines])
        readiness.database_ok = ok
        if ok != serving and not stopping.is_set():
            status = (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", *service.service_names):
                await health_servicer.set(name, status)
            log.info("health changed", serving=ok) if ok else log.error("database unreachable")
            serving = ok
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval_s)


def interceptor_chain(limits: LimitSettings, gate: Gate | None = None) -> list[grpc.aio.ServerInterceptor]:
    """Every Egret server's interceptors, outermost first: metrics, to see every call's final
    status; then limits, so the batch slot a decoded request holds is given back whoever
    refuses it; then errors, tracing and the gate (kit.interceptors). One pass over the
    three (OnePass): the same wrapping, one interceptor coroutine per call instead of three."""
    return [OnePass([RpcMetricsInterceptor(), LimitInterceptor(limits), ServerInterceptor(gate)])]


def tune_collector(threshold: int) -> None:
    """Settle the cyclic garbage collector for serving.

    Everything built so far (modules, protobuf descriptors, ORM mappers, policies) lives as
    long as the process: it is moved out of the collector's sight, so a full collection
    walks only what calls allocate instead of pausing every call for tens of milliseconds.
    What serving keeps is mostly acyclic and long-lived too (rules' window cache, token and
    key caches), and freed by reference counting; with Python's default of a young
    collection every 700 allocations, the collector walked it again and again (live
    evaluation: 3.3 s of 30 s of CPU, 0.3 s with a threshold of 50,000). Cycles are still
    collected, `threshold` allocations apart at most.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(threshold, middle, oldest)


async def serve(
    settings: CommonSettings,
    service: Service,
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[int], None] | None = None,
    tracer_provider: TracerProvider | None = None,
    readiness: Readiness | None = None,
) -> None:
    """Serve until `stop` is set (or SIGTERM/SIGINT arrives), then shut down gracefully.
    `readiness` is told what health tells clients (the admin port's /readyz)."""
    stop = stop or asyncio.Event()
    readiness = readiness or Readiness()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)

    security = settings.security
    # Served beside the service's own RPCs, like health and reflection.
    extra_names = [AUDIT_CHAIN_SERVICE] if service.audit_chain is not None else []
    policy = {**service.policy, **(AUDIT_CHAIN_POLICY if service.audit_chain is not None else {})}
    gate = Gate(
        verifier=token_verifier(security, service.pseudonymiser),
        policy=policy,
        limiter=rate_limiter(security),
    )
    limits = settings.limits
    server = grpc.aio.server(
        interceptors=interceptor_chain(limits, gate),
        options=server_options([*service.service_names, *extra_names], limits),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    service.register(server)
    if service.audit_chain is not None:
        service.audit_chain.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        [*service.service_names, *extra_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
        server,
    )
    # Known but not yet serving until the first database check passes.
    for name in ("", *service.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    credentials = server_credentials(security)
    if credentials is None:
        port = server.add_insecure_port(settings.listen_address)
    else:
        port = server.add_secure_port(settings.listen_address, credentials)
    if security.insecure:
        log.warning(
            "INSECURE MODE: no token checks%s; never run like this in production (EGRET_INSECURE=true)",
            "" if credentials else " and no TLS",
        )
    if port == 0:
        raise RuntimeError(f"cannot listen on {settings.listen_address}")
    await server.start()
    tune_collector(settings.gc_threshold)

    stopping = asyncio.Event()
    tasks = [
        asyncio.create_task(
            _watch_database(service, health_servicer, readiness, settings.health_interval_s, stopping)
        )
    ]
    tasks += [asyncio.create_task(loop_fn(stopping)) for loop_fn in service.background]
    log.info("serving", address=settings.listen_address, port=port)
    if started is not None:
        started(port)

    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not waiter and task.exception() is not None:
            log.error("background loop failed; shutting down", exc_info=task.exception())

    log.info("shutting down", grace_s=settings.shutdown_grace_s)
    stopping.set()
    readiness.stopping = True
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.shutdown_grace_s)
    waiter.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            log.error("background loop ended with an error", exc_info=result)
    closers = [*service.closers, *([service.audit_chain.close] if service.audit_chain else [])]
    for close in closers:
        try:
            await close()
        except Exception:
            log.exception("closing a client failed")
    for executor in service.executors:
        executor.shutdown(wait=True)
    for engine in service.engines:
        engine.dispose()
    if tracer_provider is not None:
        tracer_provider.shutdown()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(sig)
    log.info("stopped")
