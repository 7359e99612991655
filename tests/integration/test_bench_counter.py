"""bench.meter.counter reads a service's counter over its admin port's /metrics (plaintext HTTP
on loopback), summed over the series its labels select."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from bench.meter import counter

_EXPOSITION = b"""# HELP egret_rules_window_cache_reads_total Subjects' history asked of the window cache
# TYPE egret_rules_window_cache_reads_total counter
egret_rules_window_cache_reads_total{result="hit"} 90.0
egret_rules_window_cache_reads_total{result="miss"} 10.0
# HELP egret_rules_window_cache_subjects Subjects held
# TYPE egret_rules_window_cache_subjects gauge
egret_rules_window_cache_subjects 7.0
"""


@pytest.fixture
def admin_url() -> Iterator[str]:
    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/metrics"
            self.send_response(200 if found else 404)
            self.end_headers()
            if found:
                self.wfile.write(_EXPOSITION)

        def log_message(self, *_args: object) -> None:
            """Quiet: the base class writes every request to stderr."""

    server = HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_counter_is_summed_over_the_series_its_labels_select(admin_url: str) -> None:
    name = "egret_rules_window_cache_reads_total"
    assert counter(admin_url, name) == 100.0
    assert counter(admin_url, name, result="miss") == 10.0
    assert counter(admin_url, name, result="none") == 0.0
    assert counter(admin_url, "egret_rules_window_cache_subjects") == 7.0
