"""Reading a service's admin port as Prometheus does: /metrics parsed with prometheus_client's
own parser, and small sums over the samples."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(base_url: str) -> list[Sample]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def names(samples: list[Sample]) -> set[str]:
    return {s.name for s in samples}


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def scrape_until(
    base_url: str, ready: Callable[[list[Sample]], bool], *, timeout_s: float = 30.0
) -> list[Sample]:
    """Scrape until `ready` holds of the samples (a gauge refreshed in the background);
    fails with the last scrape's relevant state otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(base_url)
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{base_url}: condition not met within {timeout_s}s")
        time.sleep(0.25)


def status(base_url: str, path: str, method: str = "GET") -> int:
    request = urllib.request.Request(f"{base_url}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
