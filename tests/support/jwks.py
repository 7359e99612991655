"""An identity provider's JWKS endpoint on 127.0.0.1, in a thread, whose document a test
replaces (a key rotation) or breaks (an outage), and which counts the fetches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class JwksEndpoint:
    url: str = ""
    document: str = '{"keys": []}'
    # Answer 503 instead of the document (the provider is down).
    failing: bool = False
    fetches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def served(self) -> tuple[int, bytes]:
        with self._lock:
            self.fetches += 1
            return (503, b"down") if self.failing else (200, self.document.encode())


@contextmanager
def jwks_endpoint(document: str = '{"keys": []}') -> Iterator[JwksEndpoint]:
    endpoint = JwksEndpoint(document=document)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = endpoint.served()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
