"""Fixtures for the portal's unit tests: a localiser per language (no services)."""

from __future__ import annotations

import pytest

from services.portal.i18n import Localiser, localisers


@pytest.fixture(scope="session")
def languages() -> dict[str, Localiser]:
    return dict(localisers("Asia/Shanghai"))


@pytest.fixture
def en(languages: dict[str, Localiser]) -> Localiser:
    return languages["en"]


@pytest.fixture
def zh(languages: dict[str, Localiser]) -> Localiser:
    return languages["zh_Hans"]
