"""Fixtures of the deploy tests: the chart rendered (offline, helm-python-sdk) with each CI values file."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest

from deploy.k8s.render import CI_VALUES_DIR, Manifest, objects, render
from tests.support.chart import RenderObjects, load_values

VALUES_FILES = sorted(CI_VALUES_DIR.glob("*-values.yaml"))


@cache
def _render_file(name: str) -> tuple[Manifest, ...]:
    return tuple(objects(render(load_values(CI_VALUES_DIR / name))))


@pytest.fixture(
    params=[p.name for p in VALUES_FILES], ids=[p.name.removesuffix("-values.yaml") for p in VALUES_FILES]
)
def values_file(request: pytest.FixtureRequest) -> Path:
    return CI_VALUES_DIR / str(request.param)


@pytest.fixture
def rendered(values_file: Path) -> list[Manifest]:
    """Every object the chart renders with one CI values file (hooks and tests included)."""
    return list(_render_file(values_file.name))


@pytest.fixture
def render_objects() -> RenderObjects:
    """Render the chart with ad-hoc values."""

    def make(values: dict[str, Any]) -> list[Manifest]:
        return objects(render(values))

    return make
