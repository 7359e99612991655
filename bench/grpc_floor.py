"""The floor under GetScore: a bare gRPC server's CPU per call, grpc.aio against the
thread-pool server (grpc.server), TLS on, driven by bench.query_latency's load generator.

    python -m bench.grpc_floor [--rate R] [--duration S] [--rounds N] [--json PATH]

Each server answers QueryService.GetScore with an empty response and nothing else: no
interceptor, no token check, no read, no access record. Servers run as their own process,
one at a time, alternating (aio, sync, aio, sync, ...) so that both meet the same noise;
the report gives each run's server CPU per call (from /proc), latency, achieved rate and the
load average. What query spends above this figure is its own work. `--servers egret` adds
the aio server with Egret's interceptor chain around the same empty handler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from bench.meter import cpu_seconds, load_average, machine
from bench.query_latency import latency_summary, start_load
from devtools.localpki import create_local_pki
from egret.query.v1 import query_service_pb2
from kit.metrics import configure_metrics
from kit.principal import Role
from kit.server import interceptor_chain
from kit.settings import LimitSettings
from kit.tracing import configure_tracing

# aio and sync: the bare servers; egret: aio with Egret's interceptor chain (kit.server:
# metrics, limits, tracing and error mapping; no token gate), metrics and tracing configured
# as a service configures them, so its excess over aio is the chain's cost per call.
SERVERS = ("aio", "sync", "egret")
# As many calls in flight as query allows (EGRET_MAX_CONCURRENT_RPCS's default).
WORKERS = 16


def _empty(request: Any, context: Any) -> query_service_pb2.GetScoreResponse:
    return query_service_pb2.GetScoreResponse()


async def _empty_async(request: Any, context: Any) -> query_service_pb2.GetScoreResponse:
    return query_service_pb2.GetScoreResponse()


def _handlers(answer: Any) -> grpc.GenericRpcHandler:
    get_score = grpc.unary_unary_rpc_method_handler(
        answer,
        request_deserializer=query_service_pb2.GetScoreRequest.FromString,
        response_serializer=query_service_pb2.GetScoreResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("egret.query.v1.QueryService", {"GetScore": get_score})


def _serve(kind: str, key: bytes, chain: bytes, ports: Any) -> None:
    """Child process: serve until killed, after putting the port on `ports`."""
    credentials = grpc.ssl_server_credentials([(key, chain)])
    if kind == "sync":
        server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS), maximum_concurrent_rpcs=WORKERS)
        server.add_generic_rpc_handlers((_handlers(_empty),))
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        ports.put(port)
        server.wait_for_termination()
        return

    interceptors = []
    if kind == "egret":
        interceptors = interceptor_chain(LimitSettings(max_concurrent_rpcs=WORKERS))
        configure_tracing("floor")
        configure_metrics("floor")

    async def run() -> None:
        server = grpc.aio.server(interceptors=interceptors, maximum_concurrent_rpcs=WORKERS)
        server.add_generic_rpc_handlers((_handlers(_empty_async),))
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        ports.put(port)
        await server.wait_for_termination()

    asyncio.run(run())


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=500, help="calls per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each server, alternating")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=["aio", "sync"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.subjects = 10_000  # the load generator's keys; a bare server reads none of them
    return args


def _run(kind: str, pki: Any, args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    name = "query"
    server = context.Process(
        target=_serve,
        args=(kind, pki.key_file(name).read_bytes(), pki.cert_file(name).read_bytes(), ports),
        daemon=True,
    )
    server.start()
    try:
        assert server.pid is not None
        target = (
            f"127.0.0.1:{ports.get(timeout=30)}",
            pki.ca_file.read_bytes(),
            pki.token("bench", Role.REVIEWER),
        )
        before = cpu_seconds(server.pid)
        client, out = start_load(target, args)
        latencies, errors, elapsed, client_cpu, served = out.get()
        used = cpu_seconds(server.pid) - before
        client.join()
    finally:
        server.kill()
        server.join()
    result = {"server": kind, **latency_summary(latencies, errors, elapsed, args.rate)}
    result["client_cpu_s"] = round(client_cpu, 1)
    result["server_cpu_s"] = round(used, 2)
    # Warm-up calls included, as bench.query_latency counts query's.
    result["server_cpu_ms_per_call"] = round(used * 1000 / served, 3) if served else 0.0
    result["load_average"] = load_average()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m bench.grpc_floor " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="egret-bench-floor-") as tmp:
        pki = create_local_pki(Path(tmp) / "pki")
        for _ in range(args.rounds):
            for kind in args.servers:
                run = _run(kind, pki, args)
                keys = (
                    "achieved_rate",
                    "errors",
                    "p50_ms",
                    "p99_ms",
                    "server_cpu_ms_per_call",
                    "load_average",
                )
                print(kind, {k: run[k] for k in keys}, flush=True)
                results["runs"].append(run)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
