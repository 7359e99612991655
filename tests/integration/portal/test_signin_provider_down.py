"""The portal's sign-in when the identity provider does not answer: discovery really connects to a closed
port on loopback, so this runs in the integration ring."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.support.portal.app import portal_client, portal_settings
from tests.support.portal.fakes import FakeBackend


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with portal_client(portal_settings(tmp_path), FakeBackend()) as test_client:
        yield test_client


def test_sign_in_is_rate_limited_and_a_down_provider_is_said_in_words(client: TestClient) -> None:
    statuses = [client.get("/signin", follow_redirects=False).status_code for _ in range(4)]
    assert statuses[:2] == [503, 503]
    assert statuses[2:] == [429, 429]
