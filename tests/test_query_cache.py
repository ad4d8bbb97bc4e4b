"""The query-embedding cache: exact (text + model fingerprint), bounded in bytes (LRU),
counted, and off when asked; in the cache alone and through both services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from client import Part, SearchClient
from search_service.query_cache import QueryCache, entry_bytes
from tests.servers import RunningService, free_port, running
from tests.test_metrics import scrape

DIM = 8


class FakeEncoder:
    """Stands in for EncoderPool.encode_texts: a vector per text, per-item failures for
    empty texts, and a record of every call."""

    def __init__(self, version: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.version = version

    def vector(self, text: str) -> np.ndarray:
        raw = np.arange(DIM, dtype=np.float32) + len(text) + self.version
        return raw / np.linalg.norm(raw)

    async def __call__(self, texts: Sequence[str], deadline: float | None = None,
                       request_id: str = "") -> tuple[np.ndarray, dict[int, str]]:
        self.calls.append(list(texts))
        vectors = np.zeros((len(texts), DIM), np.float32)
        failures = {}
        for i, text in enumerate(texts):
            if text:
                vectors[i] = self.vector(text)
            else:
                failures[i] = f"texts[{i}]: empty text"
        return vectors, failures


def encode(cache: QueryCache, texts: list[str]) -> tuple[np.ndarray, dict[int, str]]:
    return asyncio.run(cache.encode_texts(texts, None, "test"))


def test_repeated_texts_skip_the_encoder() -> None:
    fake = FakeEncoder()
    cache = QueryCache(fake, 1 << 20, model="fp-a")
    first, _ = encode(cache, ["a white dog", "a cat"])
    again, failures = encode(cache, ["a cat", "a white dog"])
    assert fake.calls == [["a white dog", "a cat"]]
    assert not failures
    np.testing.assert_array_equal(again, first[::-1])
    assert (cache.hits, cache.misses) == (2, 2)
    # Only the new text goes to the encoder; a text twice in one call is asked for once.
    mixed, _ = encode(cache, ["a cat", "a bird", "a bird"])
    assert fake.calls[-1] == ["a bird"]
    np.testing.assert_array_equal(mixed[1], fake.vector("a bird"))
    np.testing.assert_array_equal(mixed[2], fake.vector("a bird"))
    np.testing.assert_array_equal(mixed[0], first[1])


def test_failures_pass_through_uncached_with_their_index() -> None:
    fake = FakeEncoder()
    cache = QueryCache(fake, 1 << 20, model="fp-a")
    encode(cache, ["a cat"])
    vectors, failures = encode(cache, ["a cat", "", "a dog"])
    assert fake.calls[-1] == ["", "a dog"]
    assert failures == {1: "texts[1]: empty text"}  # the caller's index, not the encoder's
    assert not vectors[1].any()
    encode(cache, [""])
    assert fake.calls[-1] == [""]  # a failure is never cached
    assert len(cache) == 2


def test_byte_bound_evicts_least_recently_used() -> None:
    fake = FakeEncoder()
    size = entry_bytes("fp-a", "text 0", np.zeros(DIM, np.float32))
    cache = QueryCache(fake, 3 * size, model="fp-a")
    encode(cache, ["text 0", "text 1", "text 2"])
    assert len(cache) == 3 and cache.bytes == 3 * size
    encode(cache, ["text 0"])  # now the most recently used
    encode(cache, ["text 3"])  # evicts text 1, the least recently used
    assert cache.bytes <= cache.max_bytes and cache.evictions == 1
    calls = len(fake.calls)
    encode(cache, ["text 0", "text 2", "text 3"])
    assert len(fake.calls) == calls  # all three still cached
    encode(cache, ["text 1"])
    assert fake.calls[-1] == ["text 1"]
    # An entry larger than the whole bound is not stored (and evicts nothing).
    big = "x" * (4 * size)
    before = len(cache)
    encode(cache, [big])
    encode(cache, [big])
    assert fake.calls[-2:] == [[big], [big]] and len(cache) == before


def test_another_model_fingerprint_never_hits() -> None:
    fake = FakeEncoder()
    cache = QueryCache(fake, 1 << 20, model="fp-a")
    encode(cache, ["a white dog"])
    fake.version = 1.0  # the encoder now serves other weights...
    cache.model = "fp-b"  # ...and says so
    vectors, _ = encode(cache, ["a white dog"])
    assert fake.calls == [["a white dog"], ["a white dog"]]
    np.testing.assert_array_equal(vectors[0], fake.vector("a white dog"))
    assert cache.get("a white dog", "fp-a") is not None  # the old entry stays, unreachable
    assert cache.get("a white dog", "fp-c") is None


@pytest.mark.parametrize("options", [{"enabled": False}, {"max_bytes": 0}, {"model": ""}])
def test_off_switch_passes_everything_through(options: dict[str, object]) -> None:
    fake = FakeEncoder()
    settings: dict[str, object] = {"max_bytes": 1 << 20, "model": "fp-a", **options}
    cache = QueryCache(fake, **settings)  # type: ignore[arg-type]
    encode(cache, ["a cat"])
    encode(cache, ["a cat"])
    assert fake.calls == [["a cat"], ["a cat"]]
    assert len(cache) == 0 and cache.hits == 0


def test_cached_vectors_cannot_be_changed_by_a_caller() -> None:
    fake = FakeEncoder()
    cache = QueryCache(fake, 1 << 20, model="fp-a")
    first, _ = encode(cache, ["a cat"])
    first[0] = 0  # the caller owns what it got
    again, _ = encode(cache, ["a cat"])
    np.testing.assert_array_equal(again[0], fake.vector("a cat"))


# ---- through both services ------------------------------------------------------------------

ENCODER_CALLS = 'clipsearch_requests_total{method="EncodeText",status="OK"}'


class Chain:
    def __init__(self, encoder_metrics: int, services: dict[str, tuple[RunningService, int]]):
        self.encoder_metrics = encoder_metrics
        self.services = services

    def encoder_calls(self, settle_s: float = 0.3) -> float:
        time.sleep(settle_s)  # the encoder counts a call as it finishes
        return scrape(self.encoder_metrics).get(ENCODER_CALLS, 0.0)

    def cache(self, name: str) -> dict[str, float]:
        samples = scrape(self.services[name][1])
        return {key: samples.get(f'clipsearch_query_cache_lookups_total{{result="{key}"}}', 0.0)
                for key in ("hit", "miss")} | {
            "bytes": samples["clipsearch_query_cache_bytes"],
            "entries": samples["clipsearch_query_cache_entries"]}


@pytest.fixture(scope="module")
def chain(tiny_clip: Path, photos: list[Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """The tiny CLIP's encoder and three search services over it: the cache on (default
    size), off, and bounded to about one entry."""
    logs = tmp_path_factory.mktemp("query-cache")
    encoder_metrics = free_port()
    variants = {"cached": [], "off": ["--no-query-cache"], "one": ["--query-cache-mb", "0.001"]}
    with running(["serve", "encoder", "--model", str(tiny_clip), "--metrics-port",
                  str(encoder_metrics)], logs / "encoder.log") as encoder:
        services: dict[str, tuple[RunningService, int]] = {}
        stack = []
        try:
            for name, extra in variants.items():
                port = free_port()
                context = running(["serve", "search", "--encoder", encoder.address, "--milvus",
                                   str(logs / f"{name}.db"), "--metrics-port", str(port),
                                   *extra], logs / f"search-{name}.log")
                services[name] = (context.__enter__(), port)
                stack.append(context)
                with SearchClient(services[name][0].address) as client:
                    assert client.index_files(photos[:20]).added == 20
            yield Chain(encoder_metrics, services)
        finally:
            for context in reversed(stack):
                context.__exit__(None, None, None)


def test_repeated_search_gives_the_same_hits_without_the_encoder(chain: Chain) -> None:
    service, _ = chain.services["cached"]
    with SearchClient(service.address) as client:
        before = chain.encoder_calls(0)
        first = client.search_text("a red circle on grass")
        assert chain.encoder_calls() == before + 1
        cache = chain.cache("cached")
        again = client.search_text("a red circle on grass")
        assert chain.encoder_calls() == before + 1  # the encoder was not asked again
        assert chain.cache("cached")["hit"] == cache["hit"] + 1
        assert [(h.id, h.score) for h in again] == [(h.id, h.score) for h in first]
        assert len(first) == 10
        # The other text paths share the cache: search options, and combined queries.
        paged = client.search_text("a red circle on grass", min_score=-1.0)
        assert [h.id for h in paged] == [h.id for h in first]
        client.search_combined([Part(text="a red circle on grass"),
                                Part(text="a blue star", weight=-0.5)])
        assert chain.encoder_calls() == before + 2  # "a blue star" only
        client.search_combined([Part(text="a blue star"), Part(text="a red circle on grass")])
        assert chain.encoder_calls() == before + 2
    assert chain.cache("cached")["entries"] == 2


def test_off_switch_asks_the_encoder_every_time(chain: Chain) -> None:
    service, _ = chain.services["off"]
    with SearchClient(service.address) as client:
        before = chain.encoder_calls(0)
        first = client.search_text("a green cross")
        again = client.search_text("a green cross")
    assert chain.encoder_calls() == before + 2
    assert [h.id for h in again] == [h.id for h in first]
    assert chain.cache("off") == {"hit": 0, "miss": 0, "bytes": 0, "entries": 0}


def test_size_option_bounds_the_service_cache(chain: Chain) -> None:
    service, _ = chain.services["one"]
    with SearchClient(service.address) as client:
        before = chain.encoder_calls(0)
        for text in ("a purple star", "a yellow square", "a purple star"):
            client.search_text(text)
    assert chain.encoder_calls() == before + 3  # the second text pushed the first out
    cache = chain.cache("one")
    assert cache["entries"] == 1 and 0 < cache["bytes"] <= 0.001 * 2**20
