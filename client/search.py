"""`SearchClient`: index images, search them by text or image, delete, count."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import grpc

from client.channel import ClientOptions, StubClient
from client.errors import ClipsearchError, from_rpc_error
from client.queries import GetResult, Page, Part, Query, Similar, StoredItem, search_request
from clipsearch.search.v1 import search_pb2, search_pb2_grpc

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Filter:
    """A structured filter: all given parts must hold.

    `metadata` maps a key to one accepted value or a list of them."""

    uri_prefix: str = ""
    metadata: Mapping[str, str | Sequence[str]] = field(default_factory=dict)

    def to_proto(self) -> search_pb2.Filter:
        matches = [search_pb2.MetadataMatch(key=k, values=[v] if isinstance(v, str) else list(v))
                   for k, v in self.metadata.items()]
        return search_pb2.Filter(uri_prefix=self.uri_prefix, metadata=matches)


def _filter_proto(value: Filter | str | None) -> search_pb2.Filter | None:
    """A Filter, or a raw Milvus expression (accepted only where the service allows)."""
    if value is None:
        return None
    if isinstance(value, str):
        return search_pb2.Filter(expression=value)
    return value.to_proto()


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    uri: str
    metadata: dict[str, Any]
    width: int
    height: int
    indexed_at: int

    @classmethod
    def from_proto(cls, hit: search_pb2.Hit) -> Hit:
        return cls(hit.id, hit.score, hit.uri, json.loads(hit.metadata_json or "{}"), hit.width,
                   hit.height, hit.indexed_at)


@dataclass(frozen=True)
class IndexFailure:
    uri: str
    reason: str
    code: grpc.StatusCode


@dataclass
class IndexSummary:
    """What an index run did; `failures` name each item that was not stored and why."""

    added: int = 0
    existing: int = 0
    failures: list[IndexFailure] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)  # uri -> id, for stored items
    error: str = ""  # set when the stream itself broke off (the service went away)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def total(self) -> int:
        return self.added + self.existing + self.failed


@dataclass(frozen=True)
class Stats:
    count: int
    dimension: int
    model: str
    backend: str
    collection: str
    index_type: str
    model_fingerprint: str


@dataclass(frozen=True)
class IndexItem:
    """One image to index: its bytes, where it lives, and optional metadata."""

    image: bytes
    uri: str
    metadata: Mapping[str, Any] | None = None


_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
# Statuses that break an Index stream off midway (the service or network went away);
# the unanswered items become failures and a re-run completes the set. Others raise.
BROKEN_STREAM = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                           grpc.StatusCode.UNKNOWN})


class SearchClient(StubClient):
    """A blocking client of the search service.

    >>> client = SearchClient("localhost:50052")
    >>> client.index_files(Path("photos").rglob("*.jpg")).added
    >>> [hit.uri for hit in client.search_text("a white dog", top_k=5)]
    """

    def __init__(self, address: str, **options: Unpack[ClientOptions]) -> None:
        super().__init__(address, **options)
        self._stub = search_pb2_grpc.SearchStub(self._channel)

    def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def search_text(self, text: str, top_k: int = 10, filter: Filter | str | None = None, *,
                    min_score: float | None = None,
                    collapse_threshold: float = 0.0) -> list[Hit]:
        """The top_k images nearest to `text`, best first (only those with cosine >=
        min_score; near-copies collapsed at collapse_threshold when > 0)."""
        return self.search_page(text, top_k, filter=filter, min_score=min_score,
                                collapse_threshold=collapse_threshold).hits

    def search_image(self, image: bytes, top_k: int = 10, filter: Filter | str | None = None,
                     *, min_score: float | None = None,
                     collapse_threshold: float = 0.0) -> list[Hit]:
        """The top_k images nearest to an encoded image (reverse image search)."""
        return self.search_page(image, top_k, filter=filter, min_score=min_score,
                                collapse_threshold=collapse_threshold).hits

    def search_similar(self, id: str, top_k: int = 10, filter: Filter | str | None = None,
                       *, min_score: float | None = None,
                       collapse_threshold: float = 0.0) -> list[Hit]:
        """More like the stored image `id` (its stored vector, no encoder call); the
        image itself is never among the hits. NotFound for an unknown id."""
        return self.search_page(Similar(id), top_k, filter=filter, min_score=min_score,
                                collapse_threshold=collapse_threshold).hits

    def search_combined(self, parts: Sequence[Part], top_k: int = 10,
                        filter: Filter | str | None = None, *, min_score: float | None = None,
                        collapse_threshold: float = 0.0) -> list[Hit]:
        """The images nearest to the normalised weighted sum of the parts' vectors."""
        return self.search_page(list(parts), top_k, filter=filter, min_score=min_score,
                                collapse_threshold=collapse_threshold).hits

    def search_page(self, query: Query, page_size: int = 10, page_token: str = "", *,
                    filter: Filter | str | None = None, min_score: float | None = None,
                    collapse_threshold: float = 0.0, paged: bool = False) -> Page:
        """One page of hits for a query: a text, image bytes, `Similar(id)` or a list of
        `Part`s. A page_token (or paged=True) asks for pages: the result's
        next_page_token then leads on, "" on the last page."""
        method, request = search_request(
            query, page_size if not (paged or page_token) else 0, _filter_proto(filter),
            page_size if (paged or page_token) else 0, page_token, min_score,
            collapse_threshold)
        response = self._unary(getattr(self._stub, method), request)
        return Page([Hit.from_proto(h) for h in response.hits], response.next_page_token)

    def search_pages(self, query: Query, page_size: int = 100, *,
                     filter: Filter | str | None = None, min_score: float | None = None,
                     collapse_threshold: float = 0.0) -> Iterator[Page]:
        """Every page of a query in turn, until the last (or the deepest reachable
        position, 16384)."""
        token = ""
        while True:
            page = self.search_page(query, page_size, token, filter=filter,
                                    min_score=min_score, collapse_threshold=collapse_threshold,
                                    paged=True)
            yield page
            token = page.next_page_token
            if not token:
                return

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> GetResult:
        """Stored rows by id (vectors only when asked) and the ids not stored."""
        response = self._unary(self._stub.Get, search_pb2.GetRequest(
            ids=list(ids), with_vectors=with_vectors))
        return GetResult([StoredItem.from_proto(i) for i in response.items],
                         list(response.not_found))

    def find_duplicates(self, threshold: float = 0.95,
                        filter: Filter | str | None = None) -> Iterator[list[Hit]]:
        """Groups of near-duplicates (cosine >= threshold, connected components), largest
        first; each Hit's score is its best cosine to another member."""
        try:
            for group in self._stub.FindDuplicates(search_pb2.FindDuplicatesRequest(
                    threshold=threshold, filter=_filter_proto(filter)), timeout=self.timeout_s):
                yield [Hit.from_proto(h) for h in group.members]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def delete(self, ids: Sequence[str] = (), filter: Filter | str | None = None) -> int:
        """Removes images by id or by filter; returns how many were removed."""
        response = self._unary(self._stub.Delete, search_pb2.DeleteRequest(
            ids=list(ids), filter=_filter_proto(filter)))
        return int(response.deleted)

    def stats(self) -> Stats:
        r = self._unary(self._stub.Stats, search_pb2.StatsRequest())
        return Stats(r.count, r.dimension, r.model, r.backend, r.collection, r.index_type,
                     r.model_fingerprint)

    def index_files(self, paths: Iterable[str | Path],
                    metadata: Mapping[str, Any] | None = None,
                    on_result: Callable[[IndexSummary], None] | None = None) -> IndexSummary:
        """Streams the files at `paths` (read lazily) to the service; the uri of each is
        its absolute path. A file that cannot be read is a failure; the rest go on."""
        summary = IndexSummary()

        def items() -> Iterator[IndexItem]:
            for path in paths:
                uri = str(Path(path).resolve())
                try:
                    data = Path(path).read_bytes()
                except OSError as exc:
                    summary.failures.append(IndexFailure(uri, f"cannot read: {exc.strerror}",
                                                         grpc.StatusCode.INVALID_ARGUMENT))
                    if on_result is not None:
                        on_result(summary)
                    continue
                yield IndexItem(data, uri, metadata)
        return self.index_items(items(), on_result=on_result, summary=summary)

    def index_items(self, items: Iterable[IndexItem],
                    on_result: Callable[[IndexSummary], None] | None = None,
                    summary: IndexSummary | None = None) -> IndexSummary:
        """Streams `items`; each is answered ADDED, EXISTING or FAILED. If the stream
        breaks off (see BROKEN_STREAM), the unanswered items are failures and
        `summary.error` says why; a stream refused as a whole raises its typed error."""
        summary = summary if summary is not None else IndexSummary()
        sent: list[str] = []

        def requests() -> Iterator[search_pb2.IndexItem]:
            for item in items:
                sent.append(item.uri)
                yield search_pb2.IndexItem(image=item.image, uri=item.uri, metadata_json=json.dumps(
                    dict(item.metadata)) if item.metadata else "")

        answered = 0
        try:
            for result in self._stub.Index(requests()):
                answered += 1
                _record(summary, result)
                if on_result is not None:
                    on_result(summary)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if error.code not in BROKEN_STREAM:
                raise error from None  # refused as a whole: no token, bad call, ...
            summary.error = f"{error.code.name}: {error}"
            for uri in sent[answered:]:
                summary.failures.append(IndexFailure(uri, f"not confirmed: {error}", error.code))
        return summary


def _record(summary: IndexSummary, result: search_pb2.IndexResult) -> None:
    if result.status == search_pb2.IndexResult.ADDED:
        summary.added += 1
        summary.ids[result.uri] = result.id
    elif result.status == search_pb2.IndexResult.EXISTING:
        summary.existing += 1
        summary.ids[result.uri] = result.id
    else:
        code = _CODE_BY_VALUE.get(result.error_code, grpc.StatusCode.UNKNOWN)
        summary.failures.append(IndexFailure(result.uri, result.error, code))


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under `folder`, recursively, in a stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise ClipsearchError(f"{folder} is not a folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
