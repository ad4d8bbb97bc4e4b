"""The Search gRPC service: Index streams into Milvus, SearchText/SearchImage query it.

Concurrent text searches share one encoder call and one Milvus search per distinct
(top_k, filter): the query batcher gathers them, as the encoder's batcher gathers items."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import grpc
from threadpoolctl import threadpool_limits

from clipsearch import metrics
from clipsearch.batcher import DynamicBatcher, QueueFull
from clipsearch.grpc_options import message_bytes
from clipsearch.image_check import ImageError, probe_image
from clipsearch.search.v1 import search_pb2
from clipsearch.serving import (
    MalformedRequest,
    Service,
    ServiceConfigError,
    request_id,
    serve_until_stopped,
)
from search_service.config import SearchConfig
from search_service.encoder_pool import EncoderPool, EncoderRejected, EncoderUnavailable
from search_service.filters import (
    FilterError,
    MetadataMatch,
    RawFilterDenied,
    StructuredFilter,
    build_expression,
)
from search_service.index_batches import CallLimits, batches
from search_service.queries import ItemNotFound, QueryRpcs, uses_options
from search_service.query_cache import QueryCache
from search_service.store import (
    MAX_TOP_K,
    StoredImage,
    StoreError,
    StoreHit,
    StoreUnavailable,
    VectorStore,
)

log = logging.getLogger("clipsearch.search")

SERVICE = search_pb2.DESCRIPTOR.services_by_name["Search"]
Status = search_pb2.IndexResult.Status
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
DEFAULT_TOP_K = 10
MAX_DELETE_IDS = 16384
T = TypeVar("T")

# What each failure means to a caller: the status it gets.
STATUS_OF: dict[type[Exception], grpc.StatusCode] = {
    EncoderUnavailable: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    FilterError: grpc.StatusCode.INVALID_ARGUMENT,
    RawFilterDenied: grpc.StatusCode.PERMISSION_DENIED,
    StoreError: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    ItemNotFound: grpc.StatusCode.NOT_FOUND,
}


def status_for(exc: Exception) -> grpc.StatusCode | None:
    """The documented status for one of our failures; None for a bug (then INTERNAL)."""
    if isinstance(exc, EncoderRejected):
        return exc.code
    for kind, code in STATUS_OF.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, ValueError) else None


class BadRequest(ValueError):
    """The request is malformed: INVALID_ARGUMENT with this message."""


@dataclass(frozen=True)
class TextQuery:
    text: str
    top_k: int
    expression: str
    deadline: float | None  # time.monotonic()
    request_id: str


@dataclass(frozen=True)
class CheckedItem:
    """An Index item that passed validation, ready to encode."""

    sequence: int
    id: str
    image: bytes
    uri: str
    width: int
    height: int
    metadata_json: str


def _failed(sequence: int, uri: str, message: str, code: int = INVALID_ARGUMENT,
            item_id: str = "") -> search_pb2.IndexResult:
    return search_pb2.IndexResult(sequence=sequence, id=item_id, uri=uri, status=Status.FAILED,
                                  error=f"{uri or f'item {sequence}'}: {message}",
                                  error_code=code)


class SearchServicer(QueryRpcs):
    """Implements clipsearch.search.v1.Search. UNAVAILABLE until `open` has finished.
    SearchSimilar, SearchCombined, Get, FindDuplicates and the search options (min_score,
    pages, collapsing) are in search_service/queries.py."""

    def __init__(self, config: SearchConfig, encoder: EncoderPool) -> None:
        self.config = config
        self.encoder = encoder
        # Every text query's vector comes through here (SearchText, its options, the text
        # parts of SearchCombined); the model fingerprint is set once the encoder answers.
        self.query_cache = QueryCache(encoder.encode_texts,
                                      int(config.query_cache_mb * 2**20),
                                      enabled=config.query_cache)
        self.store: VectorStore | None = None
        self.model_name = ""
        self._call_limits = CallLimits(config.index_batch, message_bytes(config.max_message_mb))
        self._db = ThreadPoolExecutor(4, thread_name_prefix="milvus")
        self._decode = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="decode")
        for flag, value in (("--query-batches", config.query_batches),
                            ("--index-batch", config.index_batch),
                            ("--index-pipeline", config.index_pipeline)):
            if value < 1:
                raise ServiceConfigError(f"{flag} {value}: at least 1")
        self.queries: DynamicBatcher[TextQuery, list[StoreHit] | Exception] = DynamicBatcher(
            self._run_text_queries, max_batch=64, max_delay_s=config.query_batch_delay_ms / 1000,
            max_queue=4096, concurrency=config.query_batches)

    async def open(self) -> None:
        """Waits for the encoder, then opens (or creates) the collection for its model."""
        info = await self.encoder.wait_ready(self.config.encoder_wait_s)
        log.info("encoder %s serves %s (%d-d, %s, %s)", self.encoder.name, info.name,
                 info.dimension, info.device, info.precision)
        self.store = await self._in_db("open", partial(
            VectorStore, self.config.milvus, collection=self.config.collection,
            dimension=info.dimension, model=info.name, model_fingerprint=info.fingerprint,
            index_type=self.config.index_type, token=self.config.milvus_token,
            search_ef=self.config.search_ef, search_nprobe=self.config.search_nprobe))
        self._call_limits = CallLimits.fitting(self.config.index_batch,
                                               self.config.max_message_mb, info)
        self.model_name = info.name
        self.query_cache.model = info.fingerprint
        self.queries.start()

    async def close(self) -> None:
        await self.queries.stop()
        if self.store is not None:
            await self._in_db("close", self.store.close)
        await self.encoder.close()
        self._db.shutdown(wait=True)
        self._decode.shutdown(wait=False, cancel_futures=True)

    async def _in_db(self, operation: str, call: Callable[[], T]) -> T:
        """Runs a blocking Milvus call on the Milvus threads, timing it for /metrics."""
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._db, call)
        finally:
            metrics.MILVUS_SECONDS.labels(operation).observe(time.perf_counter() - started)

    async def _ready(self, context: grpc.aio.ServicerContext) -> VectorStore:
        if self.store is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the search service is starting (waiting for the encoder or "
                                "Milvus); retry shortly")
        assert self.store is not None
        return self.store

    async def _guarded(self, work: Awaitable[T], context: grpc.aio.ServicerContext) -> T:
        """Runs `work`, turning our failures into their documented statuses."""
        try:
            return await work
        except Exception as exc:
            code = status_for(exc)
            if code is None:
                raise
            await context.abort(code, str(exc) or type(exc).__name__)
            raise  # abort raises; this line only satisfies the type checker

    # ---- search -------------------------------------------------------------------------

    def _top_k(self, requested: int) -> int:
        top_k = requested or DEFAULT_TOP_K
        limit = min(self.config.max_top_k, MAX_TOP_K)
        if not 1 <= top_k <= limit:
            raise BadRequest(f"top_k must be between 1 and {limit}, got {requested}")
        return top_k

    def _expression(self, proto: search_pb2.Filter) -> str:
        structured = StructuredFilter(
            uri_prefix=proto.uri_prefix,
            metadata=tuple(MetadataMatch(m.key, tuple(m.values)) for m in proto.metadata),
            expression=proto.expression)
        return build_expression(structured, allow_raw=self.config.allow_raw_filters)

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def SearchText(self, request: search_pb2.SearchTextRequest,
                         context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        await self._ready(context)

        async def work() -> search_pb2.SearchResponse:
            if not request.text.strip():
                raise BadRequest("text is empty")
            if uses_options(request):
                return await self.search_text_with_options(request, context)
            query = TextQuery(request.text, self._top_k(request.top_k),
                              self._expression(request.filter), self._deadline(context),
                              request_id(context))
            [outcome] = await self.queries.submit([query], context.time_remaining())
            if isinstance(outcome, Exception):
                raise outcome
            return _response(outcome)
        return await self._guarded(work(), context)

    async def _run_text_queries(self, queries: list[TextQuery]
                                ) -> list[list[StoreHit] | Exception]:
        """One encoder call for all the texts, one Milvus search per (top_k, filter)."""
        store = self.store
        assert store is not None
        metrics.SEARCH_BATCH_SIZE.observe(len(queries))
        deadlines = [q.deadline for q in queries]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        try:
            vectors, failures = await self.query_cache.encode_texts(
                [q.text for q in queries], deadline, queries[0].request_id)
        except (EncoderUnavailable, EncoderRejected) as exc:
            return [exc] * len(queries)
        outcomes: list[list[StoreHit] | Exception] = [
            BadRequest(failures[i].replace("texts[", "text[", 1)) if i in failures else []
            for i in range(len(queries))]
        groups: dict[tuple[int, str], list[int]] = {}
        for i, query in enumerate(queries):
            if i not in failures:
                groups.setdefault((query.top_k, query.expression), []).append(i)
        for (top_k, expression), members in groups.items():
            try:
                hits = await self._in_db("search", partial(
                    store.search, vectors[members], top_k, expression))
            except (StoreUnavailable, StoreError, FilterError, ValueError) as exc:
                hits = [exc] * len(members)  # type: ignore[list-item]
            for i, found in zip(members, hits, strict=True):
                outcomes[i] = found
        return outcomes

    async def SearchImage(self, request: search_pb2.SearchImageRequest,
                          context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        store = await self._ready(context)

        async def work() -> search_pb2.SearchResponse:
            page = self._page("SearchImage", request, store)
            expression = self._expression(request.filter)
            vectors, failures = await self.encoder.encode_images(
                [request.image], self._deadline(context), request_id(context))
            if failures:
                raise BadRequest(failures[0].replace("images[0]", "image", 1))
            return await self._ranked(store, vectors[0], expression, page)
        return await self._guarded(work(), context)

    # ---- delete and stats -----------------------------------------------------------------

    async def Delete(self, request: search_pb2.DeleteRequest,
                     context: grpc.aio.ServicerContext) -> search_pb2.DeleteResponse:
        store = await self._ready(context)

        async def work() -> search_pb2.DeleteResponse:
            has_filter = request.HasField("filter") and any(
                (request.filter.uri_prefix, request.filter.metadata, request.filter.expression))
            if bool(request.ids) == has_filter:
                raise BadRequest("give either ids or a non-empty filter (not both, not neither)")
            if len(request.ids) > MAX_DELETE_IDS:
                raise BadRequest(f"{len(request.ids)} ids in one call; at most {MAX_DELETE_IDS}")
            if request.ids:
                deleted = await self._in_db("delete", partial(store.delete_ids,
                                                              list(request.ids)))
            else:
                expression = self._expression(request.filter)
                deleted = await self._in_db("delete", partial(store.delete_where, expression))
            log.info("deleted %d images", deleted)
            return search_pb2.DeleteResponse(deleted=deleted)
        return await self._guarded(work(), context)

    async def Stats(self, request: search_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> search_pb2.StatsResponse:
        store = await self._ready(context)
        count = await self._guarded(self._in_db("count", store.count), context)
        metrics.COLLECTION_SIZE.set(count)
        return search_pb2.StatsResponse(
            count=count, dimension=store.dimension, model=self.model_name,
            backend=store.backend, collection=store.collection, index_type=store.index_type,
            model_fingerprint=store.model_fingerprint)

    # ---- index --------------------------------------------------------------------------

    async def Index(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[search_pb2.IndexResult]:
        """Reads items in batches. `--index-pipeline` batches are prepared (checked,
        looked up, encoded) at once, so the encoder is never idle waiting for Milvus;
        storing is sequential, in stream order, and answers each item once its row is
        durable."""
        store = await self._ready(context)
        rid = request_id(context)
        stored_ids: set[str] = set()  # ids this stream has stored or found, for dedupe
        preparing: list[asyncio.Task[PreparedBatch]] = []
        sequence = 0
        async for batch in batches(requests, self._call_limits):
            preparing.append(asyncio.ensure_future(
                self._prepare_batch(store, batch, sequence, self._deadline(context), rid)))
            sequence += len(batch)
            if len(preparing) >= self.config.index_pipeline:
                for result in await self._store_batch(store, await preparing.pop(0),
                                                      stored_ids):
                    yield result
        for task in preparing:
            for result in await self._store_batch(store, await task, stored_ids):
                yield result

    def _check_item(self, sequence: int, item: Any) -> CheckedItem | search_pb2.IndexResult:
        """Validates one Index item (runs on the decode pool)."""
        if isinstance(item, MalformedRequest):
            return _failed(sequence, "", item.reason)
        uri = item.uri
        if not uri:
            return _failed(sequence, uri, "uri is required")
        if len(uri.encode()) > self.config.max_uri_bytes:
            return _failed(sequence, uri[:100] + "...",
                           f"uri of {len(uri.encode())} bytes is over the limit of "
                           f"{self.config.max_uri_bytes}")
        metadata = item.metadata_json or "{}"
        if len(metadata.encode()) > self.config.max_metadata_bytes:
            return _failed(sequence, uri, f"metadata_json of {len(metadata.encode())} bytes is "
                                          f"over the limit of {self.config.max_metadata_bytes}")
        try:
            parsed = json.loads(metadata)
        except ValueError as exc:
            return _failed(sequence, uri, f"metadata_json is not valid JSON: {exc}")
        if not isinstance(parsed, dict):
            return _failed(sequence, uri, "metadata_json must be a JSON object")
        item_id = hashlib.sha256(item.image).hexdigest() if item.image else ""
        too_large = self._call_limits.too_large(len(item.image))
        if too_large:
            return _failed(sequence, uri, too_large, item_id=item_id)
        try:
            # The header only: the encoder decodes fully and reports a bad body per item.
            image = probe_image(item.image, self.config.max_pixels)
        except ImageError as exc:
            return _failed(sequence, uri, str(exc), item_id=item_id)
        return CheckedItem(sequence, item_id, item.image, uri, image.width, image.height,
                           json.dumps(parsed, ensure_ascii=False))

    async def _prepare_batch(self, store: VectorStore, items: list[Any], first: int,
                             deadline: float | None, rid: str) -> PreparedBatch:
        """Checks the items, looks their ids up and encodes the new ones."""
        loop = asyncio.get_running_loop()
        checked = await asyncio.gather(*(
            loop.run_in_executor(self._decode, self._check_item, first + i, item)
            for i, item in enumerate(items)))
        batch = PreparedBatch({c.sequence: c for c in checked
                               if isinstance(c, search_pb2.IndexResult)})
        candidates = [c for c in checked if isinstance(c, CheckedItem)]
        try:
            existing = await self._in_db("query", partial(store.existing_ids,
                                                          [c.id for c in candidates]))
        except StoreUnavailable as exc:
            for item in candidates:
                batch.fail(item, str(exc), UNAVAILABLE)
            return batch
        new: dict[str, CheckedItem] = {}
        for item in candidates:
            if item.id in existing or item.id in new:
                batch.set(item, Status.EXISTING)
            else:
                new[item.id] = item
        fresh = list(new.values())
        if not fresh:
            return batch
        try:
            vectors, failures = await self.encoder.encode_images(
                [c.image for c in fresh], deadline, rid)
        except (EncoderUnavailable, EncoderRejected) as exc:
            code = getattr(exc, "code", grpc.StatusCode.UNAVAILABLE).value[0]
            for item in fresh:
                batch.fail(item, str(exc), code)
            return batch
        for i, item in enumerate(fresh):
            if i in failures:
                batch.fail(item, failures[i].split(": ", 1)[-1], INVALID_ARGUMENT)
            else:
                batch.to_store.append((item, vectors[i]))
        return batch

    async def _store_batch(self, store: VectorStore, batch: PreparedBatch,
                           stored_ids: set[str]) -> list[search_pb2.IndexResult]:
        """Writes the batch's new rows (one upsert; flushed where the backend needs it)
        and answers its items in order. Runs for one batch at a time per stream."""
        now = int(time.time())
        rows = []
        for item, vector in batch.to_store:
            if item.id in stored_ids:  # an earlier batch of this stream stored it meanwhile
                batch.set(item, Status.EXISTING)
            else:
                rows.append((item, StoredImage(item.id, vector, item.uri, item.width,
                                               item.height, now, item.metadata_json)))
        try:
            await self._in_db("upsert", partial(store.upsert, [row for _, row in rows]))
        except (StoreUnavailable, StoreError, ValueError) as exc:
            code = UNAVAILABLE if isinstance(exc, StoreUnavailable) else INVALID_ARGUMENT
            for item, _ in rows:
                batch.fail(item, str(exc), code)
        else:
            for item, _ in rows:
                batch.set(item, Status.ADDED)
        stored_ids.update(r.id for r in batch.results.values()
                          if r.status in (Status.ADDED, Status.EXISTING))
        for result in batch.results.values():
            metrics.INDEXED.labels(Status.Name(result.status)).inc()
        return [batch.results[s] for s in sorted(batch.results)]


@dataclass
class PreparedBatch:
    """An Index batch between its two stages: answers so far, rows still to store."""

    results: dict[int, search_pb2.IndexResult]
    to_store: list[tuple[CheckedItem, Any]] = field(default_factory=list)

    def set(self, item: CheckedItem, status: int) -> None:
        self.results[item.sequence] = search_pb2.IndexResult(
            sequence=item.sequence, id=item.id, uri=item.uri,
            status=status)  # type: ignore[arg-type]

    def fail(self, item: CheckedItem, error: str, code: int) -> None:
        self.results[item.sequence] = _failed(item.sequence, item.uri, error, code, item.id)


def _response(hits: Sequence[StoreHit]) -> search_pb2.SearchResponse:
    return search_pb2.SearchResponse(hits=[
        search_pb2.Hit(id=h.id, score=h.score, uri=h.uri, metadata_json=h.metadata_json,
                       width=h.width, height=h.height, indexed_at=h.indexed_at) for h in hits])


def encoder_pool(config: SearchConfig) -> EncoderPool:
    return EncoderPool(config.encoder, token=config.encoder_token, tls_ca=config.encoder_tls_ca,
                       tls_cert=config.encoder_tls_cert, tls_key=config.encoder_tls_key,
                       timeout_s=config.encoder_timeout_s, retries=config.encoder_retries,
                       max_message_mb=config.max_message_mb)


async def serve(config: SearchConfig) -> int:
    """Runs the search service until SIGTERM/SIGINT; NOT_SERVING until the encoder
    answers and the collection is open. Returns the process exit code."""
    if config.blas_threads > 0:
        # Process-wide and kept for its life (threadpoolctl's limits are global state).
        threadpool_limits(config.blas_threads, user_api="blas")
    servicer = SearchServicer(config, encoder_pool(config))
    log.info("search over encoder %s and Milvus %s", config.encoder, config.milvus)
    # close() closes the store: Lite flushes and releases its lock.
    # A StoreError at start is a setting to change (another model's collection, its
    # dimension): its message says which, a traceback would only bury it.
    return await serve_until_stopped(Service(config, SERVICE, servicer), servicer.open(),
                                     servicer.close, "search", (StoreError,))
