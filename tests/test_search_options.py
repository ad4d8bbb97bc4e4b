"""The pieces of issue 11 that need no services: page tokens, the combined-query vector,
the union-find of FindDuplicates, one encoder call per query, and the store-level range
search, pages, collapsing and duplicate scan against brute force on both backends."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipsearch.search.v1 import search_pb2
from search_service.duplicates import BlockedScan, UnionFind
from search_service.paging import (
    MAX_POSITION,
    PagingError,
    make_token,
    page_request,
    query_hash,
    read_token,
)
from search_service.queries import QueryError, QueryRpcs, combine
from search_service.query_cache import QueryCache
from search_service.ranked import collapse, get_rows, ranked_page, search_window
from search_service.store import StoredImage, VectorStore
from tests.milvus_server import store_on

DIM = 32


def test_tokens_round_trip_and_bind_to_the_query() -> None:
    request = search_pb2.SearchTextRequest(text="a dog", top_k=5)
    fingerprint = query_hash("SearchText", request, "sha256:m")
    token = make_token(64, fingerprint)
    assert read_token(token, fingerprint) == 64
    paged = search_pb2.SearchTextRequest(text="a dog", page_size=9, page_token=token)
    assert query_hash("SearchText", paged, "sha256:m") == fingerprint  # paging ignored
    others = [("SearchText", search_pb2.SearchTextRequest(text="a cat"), "sha256:m"),
              ("SearchText", search_pb2.SearchTextRequest(text="a dog", min_score=0.2),
               "sha256:m"),
              ("SearchText", search_pb2.SearchTextRequest(text="a dog"), "sha256:other"),
              ("SearchImage", search_pb2.SearchImageRequest(), "sha256:m"),
              ("SearchText", search_pb2.SearchTextRequest(
                  text="a dog", filter=search_pb2.Filter(uri_prefix="/x")), "sha256:m")]
    for method, other, model in others:
        with pytest.raises(PagingError, match="another query"):
            read_token(token, query_hash(method, other, model))
    for bad in ("", "@@@", "AAAA", make_token(64, fingerprint)[:-2]):
        with pytest.raises(PagingError, match="malformed"):
            read_token(bad, fingerprint)
    with pytest.raises(PagingError, match="deepest"):
        read_token(make_token(MAX_POSITION, fingerprint), fingerprint)


def test_page_request_validates_and_cuts_the_last_page() -> None:
    def page(**fields: Any) -> Any:
        return page_request("SearchText", search_pb2.SearchTextRequest(text="t", **fields),
                            "m", 1000)

    assert (page().limit, page().paged, page().min_score) == (10, False, None)
    assert page(top_k=7, page_size=30).limit == 30
    assert page(min_score=-1.0).min_score == -1.0
    fingerprint = query_hash("SearchText", search_pb2.SearchTextRequest(text="t"), "m")
    deep = page(page_size=100, page_token=make_token(MAX_POSITION - 40, fingerprint))
    assert (deep.offset, deep.limit) == (MAX_POSITION - 40, 40)
    assert deep.next_token(40, more=True) == ""  # nothing past the deepest position
    assert page(page_size=5).next_token(5, more=False) == ""
    assert read_token(page(page_size=5).next_token(5, more=True), fingerprint) == 5
    for fields, message in (({"min_score": 1.5}, "min_score"),
                            ({"min_score": math.nan}, "min_score"),
                            ({"page_size": 1001}, "page_size"), ({"page_size": -3}, "page_size"),
                            ({"top_k": 1001}, "top_k"), ({"collapse_threshold": 1.2}, "collapse"),
                            ({"collapse_threshold": -0.5}, "collapse")):
        with pytest.raises(PagingError, match=message):
            page(**fields)


def test_combine_is_the_normalised_weighted_sum() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    weights = [1.0, -0.5, 0.25]
    expected = weights[0] * vectors[0] + weights[1] * vectors[1] + weights[2] * vectors[2]
    np.testing.assert_allclose(combine(vectors, weights), expected / np.linalg.norm(expected),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(QueryError, match="weight 0"):
        combine(vectors, [0.0, 0.0, 0.0])
    with pytest.raises(QueryError, match="cancel out"):
        combine(np.stack([vectors[0], vectors[0]]), [2.0, -2.0])


def test_union_find_makes_connected_components() -> None:
    sets = UnionFind()
    for a, b, score in (("a", "b", 0.99), ("c", "d", 0.97), ("b", "e", 0.98), ("e", "a", 0.995)):
        sets.union(a, b, score)
    assert sets.groups() == [["a", "b", "e"], ["c", "d"]]
    assert sets.best == {"a": 0.995, "b": 0.99, "c": 0.97, "d": 0.97, "e": 0.995}


class _FakeEncoder:
    """Records the encoder calls a combined query makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def encode_texts(self, texts: list[str], deadline: Any, rid: str
                           ) -> tuple[np.ndarray, dict[int, str]]:
        self.calls.append(("texts", len(texts)))
        return np.eye(DIM, dtype=np.float32)[:len(texts)], {}

    async def encode_images(self, images: list[bytes], deadline: Any, rid: str
                            ) -> tuple[np.ndarray, dict[int, str]]:
        self.calls.append(("images", len(images)))
        return np.eye(DIM, dtype=np.float32)[DIM - len(images):], {}


class _Context:
    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()


def test_a_combined_query_makes_one_encoder_call_per_kind() -> None:
    rpcs = QueryRpcs()
    fake = _FakeEncoder()
    rpcs.encoder = fake  # type: ignore[assignment]
    rpcs.query_cache = QueryCache(fake.encode_texts, 0, enabled=False)  # type: ignore[arg-type]
    rpcs._deadline = lambda context: None  # type: ignore[method-assign]
    store = type("S", (), {"dimension": DIM})()
    parts = [search_pb2.QueryPart(text="a", weight=1.0), search_pb2.QueryPart(image=b"x"),
             search_pb2.QueryPart(text="b", weight=-0.5), search_pb2.QueryPart(text="c"),
             search_pb2.QueryPart(text="d", weight=0.0)]
    vector = asyncio.run(rpcs._combined_vector(store, parts, _Context()))  # type: ignore[arg-type]
    assert fake.calls == [("texts", 3), ("images", 1)]  # the zero-weight text is not sent
    expected = np.zeros(DIM)
    expected[[0, 1, 2, DIM - 1]] = [1.0, -0.5, 1.0, 1.0]
    np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)


# ---- the store layer against brute force, Lite and server ----------------------------------


@pytest.fixture(params=["lite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    yield from store_on(request, tmp_path, DIM, "o")


def _rows(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [f"{i:064x}" for i in range(n)], vectors


def test_store_pages_min_score_collapse_and_duplicates(store: VectorStore) -> None:
    ids, vectors = _rows(300)
    # Three exact copies and one near copy, to be found as duplicates.
    vectors[1] = vectors[0]
    near = vectors[2] + 0.02 * vectors[3]
    vectors[4] = near / np.linalg.norm(near)
    store.upsert([StoredImage(i, v, f"/p/{k}", 1, 1, 0, f'{{"k": "{k % 3}"}}')
                  for k, (i, v) in enumerate(zip(ids, vectors, strict=True))])
    query = vectors[10]
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")
    # Pages of 32 through every row equal the brute-force order.
    got: list[str] = []
    for offset in range(0, 300, 32):
        window = search_window(store, query, "", offset, min(32, 300 - offset))
        got += [r.hit.id for r in window]
    got_scores = np.array([scores[ids.index(g)] for g in got])
    np.testing.assert_allclose(got_scores, scores[order], atol=1e-5)
    assert len(set(got)) == 300
    # min_score: exactly the rows at or above it, filtered or not; pages stay full.
    ranked = np.sort(scores)[::-1]
    for k in (0, 9, 77, 200):
        threshold = float(ranked[k] + ranked[k + 1]) / 2  # midway: no row on the line
        hits = search_window(store, query, "", 0, 1000, threshold)
        assert {h.hit.id for h in hits} == {ids[i] for i in np.flatnonzero(scores >= threshold)}
        filtered = search_window(store, query, 'metadata["k"] == "1"', 0, 1000, threshold)
        assert {h.hit.id for h in filtered} == {ids[i] for i in np.flatnonzero(
            (scores >= threshold) & (np.arange(300) % 3 == 1))}
        assert len(search_window(store, query, "", 0, 5, threshold)) == min(5, k + 1)
    from search_service.paging import PageRequest

    page = PageRequest(offset=0, limit=20, paged=True, min_score=None, collapse=0.999,
                       fingerprint=b"x" * 12)
    page_hits, more = ranked_page(store, vectors[0], "", page)
    assert more and len(page_hits) == 20
    assert len({ids[0], ids[1]} & {h.id for h in page_hits}) == 1
    rows = search_window(store, vectors[0], "", 0, 300, with_vectors=True)
    assert [r.hit.id for r in collapse(rows, 0.999)][:20] == [h.id for h in page_hits]
    # Duplicates: the exact copies and the near copy; nothing else is that close.
    assert float(vectors[2] @ vectors[4]) >= 0.99
    expected = sorted([sorted([ids[0], ids[1]]), sorted([ids[2], ids[4]])])
    scan = BlockedScan(store, 0.99, block=64, read_batch=50)
    assert scan.run().groups() == expected and scan.scanned == 300
    assert scan.block_pairs == 5 * 6 // 2  # 5 blocks: each pair of blocks once
    # A filter compares only the matching rows: row 2 (k == "2") leaves the second pair.
    where = 'metadata["k"] != "2"'
    assert BlockedScan(store, 0.99, where, block=64).run().groups() == [expected[0]]
    # Get: rows by id, vectors only when asked.
    [row] = get_rows(store, [ids[5]], with_vectors=True)
    np.testing.assert_allclose(row.vector, vectors[5], atol=1e-6)
    assert get_rows(store, [ids[5], "nope"], with_vectors=False)[0].vector.size == 0
