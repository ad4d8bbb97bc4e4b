"""The search RPCs beyond plain top-k: the options of every search (min_score, pages,
collapsing), SearchSimilar, SearchCombined, Get and FindDuplicates.

`QueryRpcs` is a mixin of `search_service.server.SearchServicer`, which provides the
store, the encoder pool, the Milvus threads and the mapping of failures to statuses.

A combined query's vector is the normalised weighted sum of its parts' unit vectors,
``q = sum(w_i * v_i) / |sum(w_i * v_i)|``: a text's and an image's vector come from the
encoder (all texts in one call, all images in another), an id's is its stored vector.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from clipsearch.search.v1 import search_pb2
from clipsearch.serving import request_id
from search_service.duplicates import DEFAULT_THRESHOLD, find_duplicate_groups
from search_service.filters import quote
from search_service.paging import PageRequest, page_request
from search_service.ranked import MAX_GET_IDS, get_rows, ranked_page
from search_service.store import StoredImage, StoreHit, VectorStore

if TYPE_CHECKING:
    from search_service.config import SearchConfig
    from search_service.encoder_pool import EncoderPool
    from search_service.query_cache import QueryCache

__all__ = ["MAX_PARTS", "ItemNotFound", "QueryError", "QueryRpcs", "combine", "uses_options"]

T = TypeVar("T")
MAX_PARTS = 16
MIN_NORM = 1e-6


class QueryError(ValueError):
    """A malformed query: INVALID_ARGUMENT with this message."""


class ItemNotFound(LookupError):
    """A stored image named by id does not exist: NOT_FOUND."""


def uses_options(request: Any) -> bool:
    """Whether a SearchText request asks for more than the plain top-k."""
    return bool(request.HasField("min_score") or request.page_size or request.page_token
                or request.collapse_threshold)


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The unit vector along sum(w_i * v_i); QueryError when all weights are zero or the
    sum is shorter than MIN_NORM (the parts cancel out)."""
    if not any(weights):
        raise QueryError("every part of the query has weight 0")
    total = np.asarray(weights, np.float64) @ np.asarray(vectors, np.float64)
    norm = float(np.linalg.norm(total))
    if norm < MIN_NORM:
        raise QueryError(f"the weighted parts cancel out (the sum has length {norm:.2g}); "
                         f"there is no direction to search in")
    return (total / norm).astype(np.float32)


def _hit(hit: StoreHit) -> search_pb2.Hit:
    return search_pb2.Hit(id=hit.id, score=hit.score, uri=hit.uri,
                          metadata_json=hit.metadata_json, width=hit.width,
                          height=hit.height, indexed_at=hit.indexed_at)


def _and(*expressions: str) -> str:
    parts = [e for e in expressions if e]
    return parts[0] if len(parts) == 1 else " and ".join(f"({p})" for p in parts)


def _item(row: StoredImage, with_vector: bool) -> search_pb2.StoredItem:
    return search_pb2.StoredItem(
        id=row.id, uri=row.uri, metadata_json=row.metadata_json, width=row.width,
        height=row.height, indexed_at=row.indexed_at,
        vector=row.vector.tolist() if with_vector else [])


class QueryRpcs:
    """SearchSimilar, SearchCombined, Get, FindDuplicates and the search options."""

    if TYPE_CHECKING:
        config: SearchConfig
        encoder: EncoderPool
        query_cache: QueryCache

        async def _in_db(self, operation: str, call: Callable[[], T]) -> T: ...
        async def _ready(self, context: grpc.aio.ServicerContext) -> VectorStore: ...
        async def _guarded(self, work: Awaitable[T],
                           context: grpc.aio.ServicerContext) -> T: ...
        def _expression(self, proto: search_pb2.Filter) -> str: ...
        @staticmethod
        def _deadline(context: grpc.aio.ServicerContext) -> float | None: ...

    # ---- shared -------------------------------------------------------------------------

    def _page(self, method: str, request: Any, store: VectorStore) -> PageRequest:
        return page_request(method, request, store.model_fingerprint, self.config.max_top_k)

    async def _ranked(self, store: VectorStore, vector: np.ndarray, expression: str,
                      page: PageRequest) -> search_pb2.SearchResponse:
        hits, more = await self._in_db("search", partial(ranked_page, store, vector,
                                                         expression, page))
        return search_pb2.SearchResponse(hits=[_hit(h) for h in hits],
                                         next_page_token=page.next_token(len(hits), more))

    async def _stored_vectors(self, store: VectorStore, ids: Sequence[str]
                              ) -> dict[str, np.ndarray]:
        for i in ids:
            quote(i)  # FilterError (INVALID_ARGUMENT) for a string Milvus cannot take
        rows = await self._in_db("get", partial(get_rows, store, list(ids), True))
        found = {row.id: row.vector for row in rows}
        missing = [i for i in ids if i not in found]
        if missing:
            raise ItemNotFound(f"no stored image has the id {missing[0]!r}")
        return found

    async def search_text_with_options(self, request: search_pb2.SearchTextRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> search_pb2.SearchResponse:
        """SearchText with min_score, pages or collapsing (raises; the caller maps)."""
        store = await self._ready(context)
        page = self._page("SearchText", request, store)
        expression = self._expression(request.filter)
        vectors, failures = await self.query_cache.encode_texts(
            [request.text], self._deadline(context), request_id(context))
        if failures:
            raise QueryError(failures[0].replace("texts[", "text[", 1))
        return await self._ranked(store, vectors[0], expression, page)

    # ---- RPCs ---------------------------------------------------------------------------

    async def SearchSimilar(self, request: search_pb2.SearchSimilarRequest,
                            context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        store = await self._ready(context)

        async def work() -> search_pb2.SearchResponse:
            if not request.id:
                raise QueryError("id is empty")
            page = self._page("SearchSimilar", request, store)
            expression = _and(self._expression(request.filter), f"id != {quote(request.id)}")
            vector = (await self._stored_vectors(store, [request.id]))[request.id]
            return await self._ranked(store, vector, expression, page)
        return await self._guarded(work(), context)

    async def SearchCombined(self, request: search_pb2.SearchCombinedRequest,
                             context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        store = await self._ready(context)

        async def work() -> search_pb2.SearchResponse:
            page = self._page("SearchCombined", request, store)
            expression = self._expression(request.filter)
            vector = await self._combined_vector(store, request.parts, context)
            return await self._ranked(store, vector, expression, page)
        return await self._guarded(work(), context)

    async def _combined_vector(self, store: VectorStore,
                               parts: Sequence[search_pb2.QueryPart],
                               context: grpc.aio.ServicerContext) -> np.ndarray:
        if not 1 <= len(parts) <= MAX_PARTS:
            raise QueryError(f"a combined query needs 1 to {MAX_PARTS} parts, got {len(parts)}")
        weights: list[float] = []
        texts: dict[int, str] = {}
        images: dict[int, bytes] = {}
        ids: dict[int, str] = {}
        for i, part in enumerate(parts):
            weight = float(part.weight) if part.HasField("weight") else 1.0
            if not math.isfinite(weight):
                raise QueryError(f"parts[{i}]: weight must be a finite number, got {weight}")
            weights.append(weight)
            kind = part.WhichOneof("part")
            if kind is None:
                raise QueryError(f"parts[{i}] has no text, image or id")
            if kind == "text" and not part.text.strip():
                raise QueryError(f"parts[{i}]: text is empty")
            if kind == "id" and not part.id:
                raise QueryError(f"parts[{i}]: id is empty")
            if weight == 0:
                continue  # it adds nothing; not worth an encoder call
            if kind == "text":
                texts[i] = part.text
            elif kind == "image":
                images[i] = part.image
            else:
                ids[i] = part.id
        if not any(weights):
            raise QueryError("every part of the query has weight 0")
        deadline, rid = self._deadline(context), request_id(context)
        vectors = np.zeros((len(parts), store.dimension), np.float32)
        if texts:
            encoded, failures = await self.query_cache.encode_texts(list(texts.values()),
                                                                deadline, rid)
            self._place(vectors, list(texts), encoded, failures, "text")
        if images:
            encoded, failures = await self.encoder.encode_images(list(images.values()),
                                                                 deadline, rid)
            self._place(vectors, list(images), encoded, failures, "image")
        if ids:
            stored = await self._stored_vectors(store, list(dict.fromkeys(ids.values())))
            for i, item_id in ids.items():
                vectors[i] = stored[item_id]
        return combine(vectors, weights)

    @staticmethod
    def _place(vectors: np.ndarray, positions: list[int], encoded: np.ndarray,
               failures: dict[int, str], kind: str) -> None:
        if failures:
            j, message = next(iter(failures.items()))
            raise QueryError(f"parts[{positions[j]}] ({kind}): {message.split(': ', 1)[-1]}")
        for j, i in enumerate(positions):
            vectors[i] = encoded[j]

    async def Get(self, request: search_pb2.GetRequest,
                  context: grpc.aio.ServicerContext) -> search_pb2.GetResponse:
        store = await self._ready(context)

        async def work() -> search_pb2.GetResponse:
            ids = list(dict.fromkeys(request.ids))
            if not 1 <= len(ids) <= MAX_GET_IDS:
                raise QueryError(f"give 1 to {MAX_GET_IDS} ids, got {len(ids)}")
            for i in ids:
                quote(i)
            rows = await self._in_db("get", partial(get_rows, store, ids, request.with_vectors))
            found = {row.id for row in rows}
            return search_pb2.GetResponse(
                items=[_item(row, request.with_vectors) for row in rows],
                not_found=[i for i in ids if i not in found])
        return await self._guarded(work(), context)

    async def FindDuplicates(self, request: search_pb2.FindDuplicatesRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[search_pb2.DuplicateGroup]:
        store = await self._ready(context)
        # The scan runs on a Milvus thread, which a cancelled call cannot interrupt: it
        # polls this between blocks (~0.1 s apart) and stops when the call has ended.
        ended = threading.Event()
        # grpc-stubs types the callback as a class; grpc takes any callable of the context.
        context.add_done_callback(lambda _: ended.set())  # type: ignore[arg-type]
        deadline = self._deadline(context)

        def stopped() -> bool:
            return ended.is_set() or (deadline is not None and time.monotonic() > deadline)

        async def scan() -> list[list[tuple[str, float]]]:
            threshold = float(request.threshold) or DEFAULT_THRESHOLD
            if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
                raise QueryError(f"threshold must be within (0, 1], got {threshold}")
            expression = self._expression(request.filter)
            return await self._in_db("duplicates", partial(
                find_duplicate_groups, store, threshold, expression, stop=stopped,
                spill_dir=self.config.duplicates_spill_dir or None))

        try:
            groups = await self._guarded(scan(), context)
        finally:  # also on CancelledError, which is how a cancelled call ends here
            ended.set()
        for group in groups:
            scores = dict(group)
            rows = await self._guarded(self._in_db("get", partial(
                get_rows, store, list(scores), False)), context)
            yield search_pb2.DuplicateGroup(members=[search_pb2.Hit(
                id=r.id, score=scores[r.id], uri=r.uri, metadata_json=r.metadata_json,
                width=r.width, height=r.height, indexed_at=r.indexed_at) for r in rows])
