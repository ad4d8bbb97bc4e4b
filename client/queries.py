"""Query types of `SearchClient`: combined-query parts, "more like" a stored image, pages,
stored rows. A query is a text (str), image bytes, `Similar(id)` or a list of `Part`s."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.search.v1 import search_pb2

__all__ = ["GetResult", "Page", "Part", "Query", "Similar", "StoredItem", "search_request"]


@dataclass(frozen=True)
class Part:
    """One weighted part of a combined query: exactly one of text, image (encoded file
    bytes) or id (a stored image). The query is the normalised weighted sum of the parts'
    unit vectors; a negative weight steers away ("a beach" 1.0, "people" -0.5)."""

    text: str | None = None
    image: bytes | None = None
    id: str | None = None
    weight: float = 1.0

    def to_proto(self) -> search_pb2.QueryPart:
        given = [x is not None for x in (self.text, self.image, self.id)]
        if sum(given) != 1:
            raise ValueError("a Part takes exactly one of text, image or id")
        part = search_pb2.QueryPart(weight=self.weight)
        if self.text is not None:
            part.text = self.text
        elif self.image is not None:
            part.image = self.image
        elif self.id is not None:
            part.id = self.id
        return part


@dataclass(frozen=True)
class Similar:
    """More like the stored image `id` (its stored vector; it is left out of the hits)."""

    id: str


Query = str | bytes | Similar | Sequence[Part]


@dataclass(frozen=True)
class Page:
    """One page of hits; `next_page_token` is "" on the last page."""

    hits: list[Any]  # list[client.search.Hit]
    next_page_token: str


@dataclass(frozen=True)
class StoredItem:
    """A stored image's row; `vector` only when asked for (else None)."""

    id: str
    uri: str
    metadata: dict[str, Any]
    width: int
    height: int
    indexed_at: int
    vector: np.ndarray | None

    @classmethod
    def from_proto(cls, item: search_pb2.StoredItem) -> StoredItem:
        vector = np.asarray(item.vector, np.float32) if len(item.vector) else None
        return cls(item.id, item.uri, json.loads(item.metadata_json or "{}"), item.width,
                   item.height, item.indexed_at, vector)


@dataclass(frozen=True)
class GetResult:
    items: list[StoredItem]
    not_found: list[str]


def search_request(query: Query, top_k: int, filter: search_pb2.Filter | None,
                   page_size: int = 0, page_token: str = "", min_score: float | None = None,
                   collapse_threshold: float = 0.0) -> tuple[str, Any]:
    """The RPC name and request for `query` with these options."""
    common: dict[str, Any] = {"top_k": top_k, "filter": filter, "page_size": page_size,
                              "page_token": page_token,
                              "collapse_threshold": collapse_threshold}
    if min_score is not None:
        common["min_score"] = min_score
    if isinstance(query, str):
        return "SearchText", search_pb2.SearchTextRequest(text=query, **common)
    if isinstance(query, bytes | bytearray):
        return "SearchImage", search_pb2.SearchImageRequest(image=bytes(query), **common)
    if isinstance(query, Similar):
        return "SearchSimilar", search_pb2.SearchSimilarRequest(id=query.id, **common)
    parts = [p.to_proto() for p in query]
    return "SearchCombined", search_pb2.SearchCombinedRequest(parts=parts, **common)
