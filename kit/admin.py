"""The admin port: plaintext HTTP for the platform, beside the service's TLS gRPC port.

    /metrics   this process's metrics in Prometheus' text format (kit.metrics); 404 when
               metrics are off (EGRET_METRICS=false)
    /healthz   200 while the event loop answers (liveness); 503 when it does not within
               LIVENESS_TIMEOUT_S
    /readyz    200 while the service serves: its database reachable and not shutting down,
               the same truth grpc.health.v1 tells clients; 503 otherwise

Nothing else is served here (404; GET and HEAD only), so the port may be opened to the
cluster's Prometheus and the kubelet without exposing anything of the service's data.
It runs in its own thread: a scrape or a probe never waits behind the event loop, and a
stuck loop is seen as such.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from kit.logging import get_logger
from kit.metrics import gauge, meter

log = get_logger(__name__)

LIVENESS_TIMEOUT_S = 3.0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Readiness:
    """Whether the service serves: set by kit.server's database watch and at shutdown."""

    def __init__(self) -> None:
        self.database_ok = False
        self.stopping = False

    @property
    def ready(self) -> bool:
        return self.database_ok and not self.stopping


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Probes and scrapes every few seconds would flood the log; requests are not logged."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _plain(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


class AdminServer:
    """Serves the admin endpoints on `address` (host:port; port 0 picks a free one)."""

    def __init__(
        self,
        address: str,
        *,
        readiness: Readiness,
        loop: asyncio.AbstractEventLoop,
        registry: CollectorRegistry | None,
    ) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        server_class = _Server6 if ":" in host else _Server
        self._readiness = readiness
        self._loop = loop
        self._metrics = make_wsgi_app(registry) if registry is not None else None
        self._server = make_server(host, int(port), self._app, server_class, _QuietHandler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="egret-admin", daemon=True)
        ready = meter("egret.server")
        gauge(
            ready, "egret.ready", lambda: 1.0 if self._readiness.ready else 0.0, description="1 while serving"
        )

    def _ready_value(self) -> float:
        return 1.0 if self._readiness.ready else 0.0

    def start(self) -> None:
        self._thread.start()
        log.info("admin port serving", port=self.port, metrics=self._metrics is not None)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _alive(self) -> bool:
        async def answer() -> None:
            return None

        try:
            asyncio.run_coroutine_threadsafe(answer(), self._loop).result(timeout=LIVENESS_TIMEOUT_S)
        except Exception:  # a closed loop, a timeout: either way not alive
            return False
        return True

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "GET or HEAD only\n")
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            if self._alive():
                return _plain(start_response, "200 OK", "ok\n")
            return _plain(start_response, "503 Service Unavailable", "event loop not answering\n")
        if path == "/readyz":
            if self._readiness.ready:
                return _plain(start_response, "200 OK", "ready\n")
            reason = (
                "shutting down" if self._readiness.stopping else "database unreachable or not checked yet"
            )
            return _plain(start_response, "503 Service Unavailable", f"not ready: {reason}\n")
        if path == "/metrics" and self._metrics is not None:
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
        return _plain(start_response, "404 Not Found", "not found: /metrics, /healthz and /readyz only\n")
