"""The Milvus layer: one collection of image vectors, reached through `pymilvus.MilvusClient`.

The backend is a URI: a local ``*.db`` path runs Milvus Lite inside this process, and
``http(s)://host:port`` talks to a Milvus server. Behaviours measured on Milvus Lite 3.2 that
shape this module:

* A .db path is a folder with a lock: one process at a time. pymilvus keeps the embedded
  server running after `MilvusClient.close()`, so `close()` here also releases it, which is
  what lets another process (or a restarted service) open the file.
* A reopened collection is "released": searches fail until `load_collection`, done here.
* Rows still in the memtable are searched slowly (2k x 512-d: ~100 ms per query unflushed
  vs ~12 ms flushed; 10k: ~450 vs ~45 ms), so Lite writes are flushed (10-30 ms each).
  Visibility does not need it: an acknowledged upsert is searchable at once. A server is
  not flushed per write (it is rate-limited there and makes tiny segments); Strong
  consistency gives it read-your-writes.
* `create_index` waits in 0.5 s sleeps for the build by default; on a new, empty collection
  it is finished at once, so it is called with sync=False (saves 0.5 s per index).
* Lite accepts only INVERTED scalar indexes, and top_k beyond the server's 16384 limit;
  the server's limit is enforced here so both backends behave alike.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from search_service.config import DEFAULT_SEARCH_EF, DEFAULT_SEARCH_NPROBE
from search_service.filters import MAX_URI_BYTES, FilterError, quote

log = logging.getLogger("clipsearch.search.store")
T = TypeVar("T")

__all__ = [
    "AUTO",
    "INDEX_TYPES",
    "MAX_TOP_K",
    "StoreError",
    "StoreHit",
    "StoreUnavailable",
    "StoredImage",
    "VectorStore",
    "resolve_index_type",
]

MAX_TOP_K = 16384  # Milvus server's topk limit; Lite has none, keep both the same
_META_PROPERTY = "clipsearch.meta"  # JSON: model, fingerprint, dimension
_META_FORMAT = 1
_BATCH = 1000  # rows or ids per request: keeps messages far below gRPC's 64 MiB
_OUTPUT_FIELDS = ["uri", "width", "height", "indexed_at", "metadata"]
_STRONG = "Strong"
# Searches read their own writes with Session consistency: on a server, Strong waits for
# a ~200 ms time tick per call (~400 ms per search on 2.3), Session takes ~5 ms and still
# shows a client everything it has written. Lookups that decide writes stay Strong.
_SESSION = "Session"
_SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")

# Build params per vector index type; FLAT is the default because it is exact, also under
# filters (Lite's HNSW/IVF miss matching rows in filtered searches).
INDEX_TYPES: dict[str, dict[str, Any]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": 128},
    "IVF_SQ8": {"nlist": 128},
    "HNSW": {"M": 16, "efConstruction": 200},
    "HNSW_SQ": {"M": 16, "efConstruction": 200, "sq_type": "SQ8"},
    "DISKANN": {},
    "AUTOINDEX": {},
}

# Milvus status codes that mean "your expression is wrong": 6 (legacy IllegalArgument,
# what Lite sends) and 1100 (ParameterInvalid, what the server sends for a bad plan).
_BAD_ARGUMENT_CODES = frozenset({6, 1100})
# Milvus 2.3 servers send a bad expression as the generic code 65535; its message says so.
_BAD_EXPRESSION_HINTS = ("cannot parse expression",)
_UNAVAILABLE_STATUS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_UNAVAILABLE_HINTS = ("fail connecting", "server unavailable", "open local milvus failed")


class StoreError(RuntimeError):
    """The store cannot serve as configured (schema, dimension or model mismatch...)."""


class StoreUnavailable(ConnectionError):
    """Milvus cannot be reached; worth retrying later."""


@dataclass(frozen=True)
class StoredImage:
    """One row: an image's vector and what we know about it."""

    id: str  # sha256 hex of the image bytes
    vector: np.ndarray  # float32 (dim,), unit length
    uri: str
    width: int
    height: int
    indexed_at: int  # seconds since the epoch
    metadata_json: str  # a JSON object


@dataclass(frozen=True)
class StoreHit:
    id: str
    score: float  # cosine similarity, higher is better
    uri: str
    width: int
    height: int
    indexed_at: int
    metadata_json: str


# Milvus Lite is a gRPC server in this very process, reached over loopback. pymilvus's
# channel sends keepalive pings every 10 s even with no call in flight; the Lite server keeps
# gRPC's default policy (a ping without data at most every 5 minutes, none when idle), counts
# them as strikes, and past two answers GOAWAY ENHANCE_YOUR_CALM "too_many_pings", which gRPC
# core logs at error level in a healthy service. A loopback channel needs no keepalive: it is
# off for Lite (2**31-1 ms is gRPC's "never"). A server URI keeps pymilvus's settings.
LITE_GRPC_OPTIONS: dict[str, Any] = {"grpc.keepalive_time_ms": 2**31 - 1,
                                     "grpc.keepalive_permit_without_calls": False}

# pymilvus shares one embedded Lite server per path and never stops it; count our users of
# each path so that closing the last store releases the file lock.
_lite_users: dict[str, int] = {}
_lite_lock = threading.Lock()


def _release_lite(path: str) -> None:
    with _lite_lock:
        left = _lite_users.get(path, 0) - 1
        if left > 0:
            _lite_users[path] = left
            return
        _lite_users.pop(path, None)
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # pragma: no cover - milvus-lite is a dependency
        return
    server_manager_instance.release_server(path)


AUTO = "AUTO"  # --index-type auto: chosen per backend when the collection is created
# What `auto` builds on a Milvus server, measured in results/ann.md (milvus 2.3.5, clustered
# CLIP-like vectors, top 10): IVF_FLAT at nprobe 16 kept recall@10 >= 0.996 unfiltered and
# under a 10% filter at 10k, 100k and 1M, and was faster than FLAT at each (10k: 3.7 vs
# 8.2 ms p50; 1M: 22 vs 176 ms), so there is no size below which FLAT wins on a server.
# HNSW answers faster unfiltered, but its filtered recall stayed at 0.85-0.92 even at
# ef 512; IVF_SQ8's quantised distances cap its recall at ~0.91 at 1M.
AUTO_SERVER_INDEX = "IVF_FLAT"
_MAX_SEARCH_PARAM = 65536  # Milvus 2.3's upper bound for ef and nprobe


def resolve_index_type(index_type: str, backend: str) -> str:
    """The index a new collection gets: `index_type`, or for AUTO, FLAT on Milvus Lite (its
    HNSW/IVF miss matching rows in filtered searches) and AUTO_SERVER_INDEX on a server."""
    index_type = index_type.upper()
    if index_type != AUTO:
        return index_type
    return "FLAT" if backend == "milvus-lite" else AUTO_SERVER_INDEX


def _search_params(index_type: str, top_k: int, ef: int = DEFAULT_SEARCH_EF,
                   nprobe: int = DEFAULT_SEARCH_NPROBE) -> dict[str, Any]:
    if index_type.startswith("HNSW"):
        return {"ef": max(ef, top_k)}  # ef below top_k is rejected by the server
    if index_type.startswith("IVF"):
        return {"nprobe": nprobe}
    if index_type == "DISKANN":
        return {"search_list": max(100, top_k)}
    return {}


class VectorStore:
    """A clipsearch image collection in Milvus (Lite or server)."""

    def __init__(
        self,
        uri: str,
        *,
        collection: str = "clipsearch_images",
        dimension: int,
        model: str,
        model_fingerprint: str,
        index_type: str = "FLAT",
        token: str = "",
        timeout_s: float = 10.0,
        search_ef: int = DEFAULT_SEARCH_EF,
        search_nprobe: int = DEFAULT_SEARCH_NPROBE,
    ) -> None:
        if dimension < 1:
            raise StoreError(f"vector dimension must be positive, got {dimension}")
        index_type = index_type.upper()
        if index_type not in INDEX_TYPES and index_type != AUTO:
            raise StoreError(f"unsupported index type {index_type!r}; choose one of "
                             f"{sorted([*INDEX_TYPES, AUTO])}")
        for name, value in (("search ef", search_ef), ("search nprobe", search_nprobe)):
            if not 1 <= value <= _MAX_SEARCH_PARAM:
                raise StoreError(f"{name} must be between 1 and {_MAX_SEARCH_PARAM}, got {value}")
        self.search_ef = search_ef
        self.search_nprobe = search_nprobe
        self.collection = collection
        self.dimension = dimension
        self.model = model
        self.model_fingerprint = model_fingerprint
        self._timeout = timeout_s
        self._lite_path = ""
        if uri.startswith(_SERVER_SCHEMES):
            self.backend = "milvus-server"
            self.uri = uri
        else:
            self.backend = "milvus-lite"
            self.uri = self._lite_path = os.path.abspath(os.path.expanduser(uri))
            if not self._lite_path.endswith(".db"):
                raise StoreError(f"a Milvus Lite path must end in .db, got {uri!r}")
            os.makedirs(os.path.dirname(self._lite_path), exist_ok=True)
        # Replaced by the existing collection's index, if any: auto decides at creation.
        self.index_type = resolve_index_type(index_type, self.backend)
        self._flush_writes = self.backend == "milvus-lite"
        self._closed = False

        with self._calls("connect"):
            lite = {"grpc_options": LITE_GRPC_OPTIONS} if self._lite_path else {}
            self._client = MilvusClient(self.uri, token=token, timeout=timeout_s, **lite)
        if self._lite_path:
            with _lite_lock:
                _lite_users[self._lite_path] = _lite_users.get(self._lite_path, 0) + 1
        try:
            self._open_collection()
        except BaseException:
            self.close()
            raise

    # ---- setup -------------------------------------------------------------------------

    def _open_collection(self) -> None:
        with self._calls("open collection"):
            exists = self._client.has_collection(self.collection, timeout=self._timeout)
        if not exists:
            try:
                self._create_collection()
            except StoreError:
                # Another replica may have created it meanwhile; then check it as ours.
                with self._calls("open collection"):
                    if not self._client.has_collection(self.collection, timeout=self._timeout):
                        raise
        self._check_collection()
        with self._calls("load collection"):
            # A reopened collection comes back released; loading a loaded one is a no-op.
            self._client.load_collection(self.collection, timeout=self._timeout)

    def _create_collection(self) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, max_length=64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dimension)
        schema.add_field("uri", DataType.VARCHAR, max_length=MAX_URI_BYTES)
        schema.add_field("width", DataType.INT32)
        schema.add_field("height", DataType.INT32)
        schema.add_field("indexed_at", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        meta = {
            "format": _META_FORMAT,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "dimension": self.dimension,
        }
        index = MilvusClient.prepare_index_params()
        index.add_index(
            "vector",
            index_type=self.index_type,
            metric_type="COSINE",
            params=INDEX_TYPES[self.index_type],
        )
        with self._calls("create collection"):
            self._client.create_collection(
                self.collection,
                schema=schema,
                consistency_level=_STRONG,
                properties={_META_PROPERTY: json.dumps(meta)},
                timeout=self._timeout,
            )
            self._client.create_index(self.collection, index, timeout=self._timeout, sync=False)
        # uri: prefix filters are range scans; indexed_at: time filters and sorting. Only a
        # speed-up, and INVERTED needs Milvus >= 2.4 (2.3 servers refuse it): best effort.
        for field in ("uri", "indexed_at"):
            scalar = MilvusClient.prepare_index_params()
            scalar.add_index(field, index_type="INVERTED")
            try:
                with self._calls("create scalar index"):
                    self._client.create_index(self.collection, scalar, timeout=self._timeout,
                                              sync=False)
            except StoreError as exc:
                log.warning("no scalar index on %s (filters on it scan instead): %s", field, exc)

    def _check_collection(self) -> None:
        with self._calls("describe collection"):
            desc = self._client.describe_collection(self.collection, timeout=self._timeout)
            indexes = self._client.list_indexes(self.collection, timeout=self._timeout)
        where = f"Milvus collection {self.collection!r} at {self.uri}"
        fields = {f["name"]: f for f in desc.get("fields", [])}
        missing = [n for n in ("id", "vector", *_OUTPUT_FIELDS) if n not in fields]
        if missing:
            raise StoreError(f"{where} is not a clipsearch collection (no fields {missing})")
        dim = int(fields["vector"].get("params", {}).get("dim", 0))
        if dim != self.dimension:
            raise StoreError(
                f"{where} holds {dim}-d vectors but model {self.model!r} makes "
                f"{self.dimension}-d vectors; use another collection or re-index"
            )
        raw_meta = (desc.get("properties") or {}).get(_META_PROPERTY)
        try:
            meta = json.loads(raw_meta) if raw_meta else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise StoreError(f"{where} has no clipsearch model record ({_META_PROPERTY})")
        stored = (meta.get("model"), meta.get("model_fingerprint"))
        # The weights decide comparability, not the name: the same checkpoint may be
        # loaded from another path.
        if stored[1] != self.model_fingerprint:
            raise StoreError(
                f"{where} was indexed with model {stored[0]!r} (fingerprint {stored[1]!r}) "
                f"but this service runs model {self.model!r} "
                f"(fingerprint {self.model_fingerprint!r}); vectors are not comparable"
            )
        if "vector" in indexes:
            with self._calls("describe index"):
                info = self._client.describe_index(self.collection, "vector", timeout=self._timeout)
            self.index_type = str(info.get("index_type", self.index_type)).upper()
        else:  # created outside clipsearch without an index: it cannot load without one
            index = MilvusClient.prepare_index_params()
            index.add_index(
                "vector",
                index_type=self.index_type,
                metric_type="COSINE",
                params=INDEX_TYPES[self.index_type],
            )
            with self._calls("create index"):
                self._client.create_index(self.collection, index, timeout=self._timeout)

    # ---- error translation ---------------------------------------------------------------

    @contextmanager
    def _calls(self, what: str, expression: str = "") -> Iterator[None]:
        """Turn pymilvus/gRPC failures into StoreUnavailable / FilterError / StoreError."""
        try:
            yield
        except (StoreError, StoreUnavailable, FilterError):
            raise
        except grpc.RpcError as e:  # codes pymilvus does not retry escape raw
            code = e.code() if callable(getattr(e, "code", None)) else None
            raise self._translate(what, expression, code, str(e)) from e
        except MilvusException as e:
            unavailable = any(h in e.message.lower() for h in _UNAVAILABLE_HINTS)
            raise self._translate(what, expression, e.code, e.message, unavailable) from e

    def _translate(
        self, what: str, expression: str, code: object, message: str, unavailable: bool = False
    ) -> Exception:
        if unavailable or code in _UNAVAILABLE_STATUS:
            hint = ""
            if self.backend == "milvus-lite":
                hint = " (Milvus Lite allows one process per .db file: is another one using it?)"
            return StoreUnavailable(
                f"Milvus at {self.uri} is unavailable during {what}: {message}{hint}"
            )
        if expression and (
            code in _BAD_ARGUMENT_CODES
            or any(h in message.lower() for h in _BAD_EXPRESSION_HINTS)
        ):
            return FilterError(f"invalid filter expression: {message}")
        return StoreError(f"Milvus {what} failed on {self.uri}: {message}")

    # ---- data ------------------------------------------------------------------------------

    def _loaded(self, what: str, call: Callable[[], T], expression: str = "") -> T:
        """Runs a read; when the server says the collection is not loaded (a restarted
        Milvus comes back with it released), loads it and tries once more."""
        try:
            with self._calls(what, expression):
                return call()
        except StoreError as exc:
            if "not loaded" not in str(exc):
                raise
        log.warning("collection %s at %s was released (Milvus restarted?); loading it",
                    self.collection, self.uri)
        with self._calls("load collection"):
            self._client.load_collection(self.collection, timeout=self._timeout)
        with self._calls(what, expression):
            return call()

    def _flush(self, what: str) -> None:
        if self._flush_writes:
            with self._calls(what):
                self._client.flush(self.collection, timeout=self._timeout)

    def _row(self, image: StoredImage) -> dict[str, Any]:
        vector = np.asarray(image.vector, dtype=np.float32)
        if vector.shape != (self.dimension,):
            raise StoreError(
                f"image {image.id}: vector shape {vector.shape} does not match the "
                f"collection's dimension {self.dimension}"
            )
        if not np.all(np.isfinite(vector)):
            raise ValueError(f"image {image.id}: vector has non-finite values")
        if len(image.uri.encode("utf-8")) > MAX_URI_BYTES:
            raise ValueError(f"image {image.id}: uri longer than {MAX_URI_BYTES} bytes")
        metadata = json.loads(image.metadata_json) if image.metadata_json else {}
        if not isinstance(metadata, dict):
            raise ValueError(f"image {image.id}: metadata must be a JSON object")
        return {
            "id": image.id,
            "vector": vector,
            "uri": image.uri,
            "width": int(image.width),
            "height": int(image.height),
            "indexed_at": int(image.indexed_at),
            "metadata": metadata,
        }

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        wanted = list(dict.fromkeys(ids))
        found: set[str] = set()
        for start in range(0, len(wanted), _BATCH):
            chunk = wanted[start : start + _BATCH]
            expression = f"id in [{', '.join(quote(i) for i in chunk)}]"
            rows = self._loaded("query", partial(
                self._client.query, self.collection, filter=expression, output_fields=["id"],
                consistency_level=_STRONG, timeout=self._timeout))
            found.update(str(r["id"]) for r in rows)
        return found

    def upsert(self, rows: Sequence[StoredImage]) -> None:
        # The last row per id wins; a server rejects duplicate keys within one request.
        unique = list({r.id: self._row(r) for r in rows}.values())
        if not unique:
            return
        for start in range(0, len(unique), _BATCH):
            with self._calls("upsert"):
                self._client.upsert(
                    self.collection, unique[start : start + _BATCH], timeout=self._timeout
                )
        self._flush("flush")

    def search(self, vectors: np.ndarray, top_k: int, expression: str = "") -> list[list[StoreHit]]:
        """Top-k rows by cosine similarity for each query vector, best first, in one call."""
        queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise StoreError(
                f"query vectors have shape {queries.shape}; the collection needs "
                f"(n, {self.dimension})"
            )
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        if len(queries) == 0:
            return []
        results = self._loaded("search", lambda: self._client.search(
                self.collection,
                data=list(queries),
                anns_field="vector",
                filter=expression,
                limit=top_k,
                output_fields=_OUTPUT_FIELDS,
                search_params={
                    "metric_type": "COSINE",
                    "params": self.search_params(top_k),
                },
                consistency_level=_SESSION,
                timeout=self._timeout,
            ), expression)
        out: list[list[StoreHit]] = []
        for hits in results:
            converted = [self._hit(h) for h in hits]
            converted.sort(key=lambda h: -h.score)  # stable; Milvus already orders them
            out.append(converted)
        return out

    def search_params(self, top_k: int) -> dict[str, Any]:
        """Milvus search params for this collection's index: ef (HNSW), nprobe (IVF)..."""
        return _search_params(self.index_type, top_k, self.search_ef, self.search_nprobe)

    @staticmethod
    def _hit(hit: Any) -> StoreHit:
        entity = hit["entity"]
        return StoreHit(
            id=str(hit["id"]),
            score=float(hit["distance"]),
            uri=str(entity["uri"]),
            width=int(entity["width"]),
            height=int(entity["height"]),
            indexed_at=int(entity["indexed_at"]),
            metadata_json=json.dumps(entity.get("metadata") or {}, ensure_ascii=False),
        )

    def delete_ids(self, ids: Sequence[str]) -> int:
        # Milvus reports the number of keys *sent*, not removed: look them up first.
        present = sorted(self.existing_ids(ids))
        for start in range(0, len(present), _BATCH):
            with self._calls("delete"):
                self._client.delete(
                    self.collection, ids=present[start : start + _BATCH], timeout=self._timeout
                )
        if present:
            self._flush("flush")
        return len(present)

    def delete_where(self, expression: str) -> int:
        if not expression.strip():
            raise FilterError("refusing to delete with an empty filter (it would match all)")
        matched = self._count(expression)
        if matched:
            with self._calls("delete", expression):
                self._client.delete(self.collection, filter=expression, timeout=self._timeout)
            self._flush("flush")
        return matched

    def _count(self, expression: str) -> int:
        rows = self._loaded("count", lambda: self._client.query(
            self.collection,
            filter=expression,
            output_fields=["count(*)"],
            consistency_level=_STRONG,
            timeout=self._timeout,
        ), expression)
        return int(rows[0]["count(*)"]) if rows else 0

    def count(self) -> int:
        """Exact number of rows (a strong count query, not the lagging statistics)."""
        return self._count("")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            finally:
                if self._lite_path:
                    _release_lite(self._lite_path)

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
