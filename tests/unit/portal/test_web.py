"""The portal's request middleware on a bare Starlette application (no services)."""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from services.portal.web import RequestSpans


async def _page(request: Request) -> PlainTextResponse:
    return PlainTextResponse("page", status_code=int(request.query_params.get("status", "200")))


def test_every_response_carries_the_servers_time_in_server_timing() -> None:
    routes = [Route("/page", _page)]
    app = Starlette(routes=routes, middleware=[Middleware(RequestSpans, routes=routes)])
    with TestClient(app) as client:
        for path in ("/page", "/page?status=503", "/missing"):
            timing = client.get(path).headers["server-timing"]
            match = re.fullmatch(r"app;dur=(\d+\.\d)", timing)
            assert match, (path, timing)
            assert float(match.group(1)) >= 0
