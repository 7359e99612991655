"""Fixtures for the portal's unit tests: a localiser per language, and the application
with a fake backend (tests.support.portal.fakes); no services."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from services.portal.i18n import Localiser, localisers
from services.portal.settings import PortalSettings
from tests.support.portal.app import parsed_and_compiled_once, portal_client, portal_settings
from tests.support.portal.fakes import FakeBackend


@pytest.fixture(scope="session", autouse=True)
def _catalogues_and_templates_once() -> Iterator[None]:
    with parsed_and_compiled_once():
        yield


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
    return portal_settings(tmp_path)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(settings: PortalSettings, backend: FakeBackend) -> Iterator[TestClient]:
    with portal_client(settings, backend) as test_client:
        yield test_client
