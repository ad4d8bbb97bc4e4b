"""Near-duplicate groups over a whole collection (or a filtered part) in bounded memory.

Two exact strategies, one per backend, both feeding a union-find over ids whose groups
are the connected components (two images are in one group when a chain of pairs at or
above the threshold joins them). Memory holds one or two chunks of vectors and the ids
that have at least one near-duplicate, never the whole collection.

* Milvus server (`DuplicateFinder`): the collection is read in chunks with the query
  iterator (ids and vectors); each chunk is range-searched against the collection
  (cosine >= threshold, same filter). A query that fills its `per_query` limit is asked
  again with the deepest limit Milvus serves (16384); only an image with more than 16384
  near-duplicates could then miss a pair, and that pair is still found from the other
  side. Measured at 10k 512-d rows, FLAT: 1.2 s per 256 queries; chunks are 64.
* Milvus Lite (`BlockScan`): Lite's range search costs ~80 ms per query at 10k rows
  (20 s per chunk of 256, past the call deadline), so chunks are compared with each other
  in numpy instead: each chunk A against the rows whose id is >= A's smallest id (read
  with a second iterator), as float32 dot products of the stored unit vectors. Every
  pair x < y is seen from x's chunk; the work is quadratic but runs at BLAS speed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from search_service.filters import quote
from search_service.paging import MAX_POSITION
from search_service.store import _SESSION, _STRONG, VectorStore, _search_params

log = logging.getLogger("clipsearch.search.duplicates")

__all__ = ["DEFAULT_THRESHOLD", "BlockScan", "DuplicateFinder", "UnionFind",
           "find_duplicate_groups"]

DEFAULT_THRESHOLD = 0.95
_CHUNK = 64  # queries per range search: ~3 s at 100k rows on a server (10 s deadline)
_PER_QUERY = 64


@dataclass
class UnionFind:
    """Disjoint sets over string ids, with path halving and union by size; also keeps
    each id's best similarity to another id it was joined with."""

    parent: dict[str, str] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)

    def find(self, x: str) -> str:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: str, b: str, score: float) -> None:
        for x in (a, b):
            if score > self.best.get(x, -2.0):
                self.best[x] = score
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size.get(ra, 1) < self.size.get(rb, 1):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] = self.size.get(ra, 1) + self.size.pop(rb, 1)

    def groups(self) -> list[list[str]]:
        """The components of two or more ids: largest first, members sorted, ties of
        size ordered by their first id."""
        by_root: dict[str, list[str]] = {}
        for x in self.parent:
            by_root.setdefault(self.find(x), []).append(x)
        found = [sorted(members) for members in by_root.values() if len(members) > 1]
        return sorted(found, key=lambda g: (-len(g), g[0]))


@dataclass
class DuplicateFinder:
    """Runs the scan of one FindDuplicates call (blocking; call from a worker thread)."""

    store: VectorStore
    threshold: float
    expression: str = ""
    chunk: int = _CHUNK
    per_query: int = _PER_QUERY
    scanned: int = 0
    searches: int = 0

    def _radius(self) -> float:
        return float(np.nextafter(np.float32(self.threshold), np.float32(-np.inf)))

    def _range_search(self, vectors: list[np.ndarray], limit: int) -> list[Any]:
        store = self.store
        params = dict(_search_params(store.index_type, limit))
        params["radius"] = self._radius()

        def call() -> Any:
            return store._client.search(
                store.collection, data=vectors, anns_field="vector", filter=self.expression,
                limit=limit, output_fields=[], consistency_level=_SESSION,
                search_params={"metric_type": "COSINE", "params": params},
                timeout=store._timeout)

        self.searches += 1
        return list(store._loaded("range search", call, self.expression))

    def _chunks(self) -> Iterator[list[dict[str, Any]]]:
        return _chunks(self.store, self.expression, self.chunk)

    def run(self) -> UnionFind:
        """Scans the rows; returns the union-find of the near-duplicate pairs."""
        sets = UnionFind()
        for rows in self._chunks():
            ids = [str(r["id"]) for r in rows]
            vectors = [np.asarray(r["vector"], np.float32) for r in rows]
            self.scanned += len(rows)
            results = self._range_search(vectors, self.per_query)
            for qid, vector, hits in zip(ids, vectors, results, strict=True):
                if len(hits) >= self.per_query:  # saturated: ask for all of them
                    [hits] = self._range_search([vector], MAX_POSITION)
                    if len(hits) >= MAX_POSITION:
                        log.warning("image %s has over %d near-duplicates at %.4f; pairs past "
                                    "them are found from the other side only", qid,
                                    MAX_POSITION, self.threshold)
                for hit in hits:
                    other = str(hit["id"])
                    if other != qid:
                        sets.union(qid, other, float(hit["distance"]))
        return sets


def _chunks(store: VectorStore, expression: str, size: int) -> Iterator[list[dict[str, Any]]]:
    """The rows matching `expression` (id and vector), `size` at a time."""
    with store._calls("query iterator", expression):
        iterator = store._client.query_iterator(
            store.collection, batch_size=size, filter=expression,
            output_fields=["id", "vector"], consistency_level=_STRONG, timeout=store._timeout)
    try:
        while True:
            with store._calls("query iterator", expression):
                rows = iterator.next()
            if not rows:
                return
            yield rows
    finally:
        iterator.close()


@dataclass
class BlockScan:
    """The Lite strategy: chunk against chunk in numpy (see the module's docstring)."""

    store: VectorStore
    threshold: float
    expression: str = ""
    chunk: int = 2048
    scanned: int = 0
    compared: int = 0

    def run(self) -> UnionFind:
        sets = UnionFind()
        limit = np.float32(self.threshold)
        for rows in _chunks(self.store, self.expression, self.chunk):
            a_ids = [str(r["id"]) for r in rows]
            a = np.asarray([r["vector"] for r in rows], np.float32)
            self.scanned += len(rows)
            after = f"id >= {quote(min(a_ids))}"
            others = f"({self.expression}) and ({after})" if self.expression else after
            for block in _chunks(self.store, others, self.chunk):
                b_ids = [str(r["id"]) for r in block]
                b = np.asarray([r["vector"] for r in block], np.float32)
                self.compared += len(a_ids) * len(b_ids)
                similar = a @ b.T
                for i, j in zip(*np.nonzero(similar >= limit), strict=True):
                    if a_ids[i] < b_ids[j]:
                        sets.union(a_ids[i], b_ids[j], float(similar[i, j]))
        return sets


def find_duplicate_groups(store: VectorStore, threshold: float, expression: str = ""
                          ) -> list[list[tuple[str, float]]]:
    """The near-duplicate groups at `threshold`: (id, best cosine to another member)."""
    finder: DuplicateFinder | BlockScan
    if store.backend == "milvus-lite":
        finder = BlockScan(store, threshold, expression)
    else:
        finder = DuplicateFinder(store, threshold, expression)
    sets = finder.run()
    return [[(x, sets.best[x]) for x in group] for group in sets.groups()]
