"""Milvus reads behind the search options: pages (`offset`), min_score (range search),
collapsing, rows by id. Everything is done by Milvus, not filtered in Python afterwards,
so a page is full whenever enough rows qualify.

Range search for COSINE keeps hits with ``radius < score <= range_filter``: `radius` is
exclusive, so min_score s is sent as the next float32 below s (score >= s exactly, as
Milvus computes scores in float32), and no `range_filter` is sent (a self-match can
score 1.0000001). Measured on Milvus Lite 3.2 and a Milvus 2.3 server: both accept
`offset` together with `radius`, and return vector fields from a search.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from search_service.filters import quote
from search_service.paging import MAX_POSITION, PageRequest
from search_service.store import (
    _OUTPUT_FIELDS,
    _SESSION,
    StoredImage,
    StoreHit,
    VectorStore,
)

__all__ = ["MAX_GET_IDS", "RankedHit", "collapse", "get_rows", "ranked_page", "search_window"]

MAX_GET_IDS = 1000
_COLLAPSE_FIRST_WINDOW = 64


@dataclass(frozen=True)
class RankedHit:
    """A hit and, when asked for, its stored vector."""

    hit: StoreHit
    vector: np.ndarray | None


def _radius(min_score: float) -> float:
    """The exclusive range-search radius that keeps exactly the scores >= min_score."""
    return float(np.nextafter(np.float32(min_score), np.float32(-np.inf)))


def search_window(store: VectorStore, vector: np.ndarray, expression: str, offset: int,
                  limit: int, min_score: float | None = None,
                  with_vectors: bool = False) -> list[RankedHit]:
    """Positions offset..offset+limit-1 of the exact ranking of the rows matching
    `expression` (and scoring >= min_score) by cosine to `vector`, best first."""
    if not (offset >= 0 and limit >= 1 and offset + limit <= MAX_POSITION):
        raise ValueError(f"offset {offset} + limit {limit} is past the deepest reachable "
                         f"position ({MAX_POSITION})")
    params = store.search_params(offset + limit)
    if min_score is not None and min_score > -1.0:  # every cosine is >= -1
        params["radius"] = _radius(min_score)
    output = [*_OUTPUT_FIELDS, "vector"] if with_vectors else list(_OUTPUT_FIELDS)
    query = np.asarray(vector, dtype=np.float32).reshape(-1)

    def call() -> Any:
        return store._client.search(
            store.collection, data=[query], anns_field="vector", filter=expression,
            limit=limit, offset=offset, output_fields=output,
            search_params={"metric_type": "COSINE", "params": params},
            consistency_level=_SESSION, timeout=store._timeout)

    [hits] = store._loaded("search", call, expression)
    ranked = [RankedHit(VectorStore._hit(h), np.asarray(h["entity"]["vector"], np.float32)
                        if with_vectors else None) for h in hits]
    ranked.sort(key=lambda r: -r.hit.score)  # stable; Milvus already orders them
    return ranked


def collapse(ranked: Sequence[RankedHit], threshold: float) -> list[RankedHit]:
    """Going down the ranking, drops each hit whose cosine to a hit already kept is >=
    threshold: each group of near-copies keeps its best hit."""
    kept: list[RankedHit] = []
    if not ranked:
        return kept
    matrix = np.empty((len(ranked), len(ranked[0].vector)), np.float32)  # type: ignore[arg-type]
    for item in ranked:
        assert item.vector is not None
        if kept and float(np.max(matrix[:len(kept)] @ item.vector)) >= threshold:
            continue
        matrix[len(kept)] = item.vector
        kept.append(item)
    return kept


def ranked_page(store: VectorStore, vector: np.ndarray, expression: str,
                page: PageRequest) -> tuple[list[StoreHit], bool]:
    """One page of hits for `page` and whether more follow.

    Without collapsing, one Milvus search of limit + 1 rows at the page's offset (the
    extra row only says whether there is a next page). With collapsing, positions are
    counted in the collapsed list, which depends on every row above, so the search starts
    at the top with a window that grows (x4) until it holds the page and one more kept
    hit, the rows run out, or the window reaches the deepest reachable position."""
    if not page.collapse:
        probe = min(page.limit + 1, MAX_POSITION - page.offset)
        rows = search_window(store, vector, expression, page.offset, probe, page.min_score)
        return [r.hit for r in rows[:page.limit]], len(rows) > page.limit
    wanted = page.offset + page.limit + 1
    window = min(MAX_POSITION, max(_COLLAPSE_FIRST_WINDOW, 2 * wanted))
    while True:
        rows = search_window(store, vector, expression, 0, window, page.min_score,
                             with_vectors=True)
        kept = collapse(rows, page.collapse)
        if len(kept) >= wanted or len(rows) < window or window >= MAX_POSITION:
            break
        window = min(MAX_POSITION, window * 4)
    end = page.offset + page.limit
    return [r.hit for r in kept[page.offset:end]], len(kept) > end


def get_rows(store: VectorStore, ids: Sequence[str], with_vectors: bool) -> list[StoredImage]:
    """The stored rows among `ids`, in the order first asked (vectors empty unless
    `with_vectors`). Session consistency, as searches: on a server, Strong waits for a
    time tick (~300 ms measured for SearchSimilar's lookup), Session shows a client its
    own writes."""
    wanted = list(dict.fromkeys(ids))
    output = [*_OUTPUT_FIELDS, "vector"] if with_vectors else list(_OUTPUT_FIELDS)
    found: dict[str, StoredImage] = {}
    empty = np.zeros(0, np.float32)
    for start in range(0, len(wanted), MAX_GET_IDS):
        chunk = wanted[start:start + MAX_GET_IDS]
        expression = f"id in [{', '.join(quote(i) for i in chunk)}]"

        def call(expression: str = expression) -> Any:
            return store._client.query(store.collection, filter=expression,
                                       output_fields=output, consistency_level=_SESSION,
                                       timeout=store._timeout)

        for row in store._loaded("get", call):
            vector = np.asarray(row["vector"], np.float32) if with_vectors else empty
            found[str(row["id"])] = StoredImage(
                id=str(row["id"]), vector=vector, uri=str(row["uri"]),
                width=int(row["width"]), height=int(row["height"]),
                indexed_at=int(row["indexed_at"]),
                metadata_json=json.dumps(row.get("metadata") or {}, ensure_ascii=False))
    return [found[i] for i in wanted if i in found]
