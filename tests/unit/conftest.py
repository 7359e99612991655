"""The unit ring runs in this process only, off the network: a test that needs a socket or a child
process belongs in tests/integration (tests/support/offline.py says how this is enforced)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.offline import offline_and_in_process


@pytest.fixture(autouse=True)
def _offline_and_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with offline_and_in_process(monkeypatch):
        yield
