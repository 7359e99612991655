"""The portal application under test: its settings and a test client over a fake backend, no services."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jinja2
import pytest
from starlette.testclient import TestClient

from services.portal import bootstrap, web
from services.portal.bootstrap import build
from services.portal.i18n import localisers
from services.portal.settings import PortalSettings
from tests.support.portal.fakes import SECRET, FakeBackend
from tests.support.portal.samples import NOW

# Nothing listens there: discovery fails, as when the provider is down.
DOWN_PROVIDER = "http://127.0.0.1:9"


def portal_settings(tmp_path: Path) -> PortalSettings:
    """Insecure-HTTP settings with secrets in tmp_path and a sign-in burst of two."""
    (tmp_path / "session.key").write_bytes(SECRET)
    (tmp_path / "client.secret").write_text("s")
    return PortalSettings.from_env(
        {
            "EGRET_INSECURE": "true",
            "EGRET_PORTAL_PUBLIC_URL": "http://127.0.0.1:8080",
            "EGRET_PORTAL_INSECURE_HTTP": "true",
            "EGRET_PORTAL_SESSION_SECRET_FILE": str(tmp_path / "session.key"),
            "EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE": str(tmp_path / "client.secret"),
            "EGRET_PORTAL_OIDC_ISSUER": DOWN_PROVIDER,
            "EGRET_PORTAL_SIGNIN_BURST": "2",
        }
    )


@contextmanager
def portal_client(settings: PortalSettings, backend: FakeBackend) -> Iterator[TestClient]:
    """The application at a fixed clock (samples.NOW), served in process by Starlette's test client."""
    app = build(settings, backend=lambda: backend, clock=lambda: NOW)  # type: ignore[arg-type,return-value]
    with TestClient(app, base_url="http://127.0.0.1:8080") as test_client:
        yield test_client


class _MemoryBytecodeCache(jinja2.BytecodeCache):
    """Compiled templates kept for the session, as a running portal keeps them for its lifetime."""

    def __init__(self) -> None:
        self._code: dict[str, bytes] = {}

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        if bucket.key in self._code:
            bucket.bytecode_from_string(self._code[bucket.key])

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        self._code[bucket.key] = bucket.bytecode_to_string()


@contextmanager
def parsed_and_compiled_once() -> Iterator[None]:
    """Within: every app built parses the .po catalogues and compiles each template once, not per test
    (that was most of a portal unit test's time). The words and templates are the same for every app;
    tests/unit/portal/test_catalogues.py checks the catalogues themselves."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bootstrap, "localisers", functools.cache(localisers))
        compiled = _MemoryBytecodeCache()
        patch.setattr(web, "Environment", functools.partial(jinja2.Environment, bytecode_cache=compiled))
        yield
