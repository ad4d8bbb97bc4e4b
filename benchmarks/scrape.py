"""What the services' Prometheus metrics grew by over one measured window: the benchmarks'
one way of reading where a run's time went (model batches, Milvus calls, encoder calls)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager


def scrape(ports: list[int]) -> dict[str, float]:
    """Every sample of the services' /metrics on `ports`, keyed by name and labels."""
    samples = {}
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
    return samples


class Spent:
    """Counters and histograms over a window: each sample's growth, filled when the window
    closes (a sample first seen at its end counts from zero)."""

    def __init__(self) -> None:
        self.samples: dict[str, float] = {}

    def __call__(self, key: str) -> float:
        """The growth of one sample (`name{labels}`), 0 where it never appeared."""
        return self.samples.get(key, 0.0)

    def mean_ms(self, histogram: str, labels: str) -> float | None:
        """The mean of a histogram's observations in the window, in ms; None without any."""
        count = self(f"{histogram}_count{{{labels}}}")
        return round(1000 * self(f"{histogram}_sum{{{labels}}}") / count, 2) if count else None


@contextmanager
def metrics_window(ports: list[int]) -> Iterator[Spent]:
    """Scrape `ports` before and after the block; the yielded Spent holds the differences
    once the block ends."""
    spent = Spent()
    before = scrape(ports)
    yield spent
    after = scrape(ports)
    spent.samples = {key: value - before.get(key, 0.0) for key, value in after.items()}
