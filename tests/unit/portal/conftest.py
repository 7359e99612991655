"""Fixtures for the portal's unit tests: a localiser per language, and the application
with a fake backend (tests.unit.portal.fakes); no services."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from services.portal.bootstrap import build
from services.portal.i18n import Localiser, localisers
from services.portal.settings import PortalSettings
from tests.unit.portal.fakes import SECRET, FakeBackend
from tests.unit.portal.samples import NOW


@pytest.fixture(scope="session")
def languages() -> dict[str, Localiser]:
    return dict(localisers("Asia/Shanghai"))


@pytest.fixture
def en(languages: dict[str, Localiser]) -> Localiser:
    return languages["en"]


@pytest.fixture
def zh(languages: dict[str, Localiser]) -> Localiser:
    return languages["zh_Hans"]


@pytest.fixture
def settings(tmp_path: Path) -> PortalSettings:
    (tmp_path / "session.key").write_bytes(SECRET)
    (tmp_path / "client.secret").write_text("s")
    return PortalSettings.from_env(
        {
            "EGRET_INSECURE": "true",
            "EGRET_PORTAL_PUBLIC_URL": "http://127.0.0.1:8080",
            "EGRET_PORTAL_INSECURE_HTTP": "true",
            "EGRET_PORTAL_SESSION_SECRET_FILE": str(tmp_path / "session.key"),
            "EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE": str(tmp_path / "client.secret"),
            # Nothing listens there: discovery fails, as when the provider is down.
            "EGRET_PORTAL_OIDC_ISSUER": "http://127.0.0.1:9",
            "EGRET_PORTAL_SIGNIN_BURST": "2",
        }
    )


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(settings: PortalSettings, backend: FakeBackend) -> Iterator[TestClient]:
    app = build(settings, backend=lambda: backend, clock=lambda: NOW)  # type: ignore[arg-type,return-value]
    with TestClient(app, base_url="http://127.0.0.1:8080") as test_client:
        yield test_client
