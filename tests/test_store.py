"""search_service.store against a real Milvus, each test on both backends (`store_uri`):

* "lite": Milvus Lite in tmp_path (one .db per test);
* "server": the session's Milvus 2.3.5 standalone server (tests/milvus_server.py), each
  test with its own collection, dropped afterwards. CLIPSEARCH_TEST_MILVUS_SERVER=0 skips.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from search_service.filters import (
    FilterError,
    MetadataMatch,
    RawFilterDenied,
    StructuredFilter,
    build_expression,
)
from search_service.store import (
    MAX_TOP_K,
    StoredImage,
    StoreError,
    StoreHit,
    StoreUnavailable,
    VectorStore,
)

DIM = 64
MODEL = "ViT-B/32"
FINGERPRINT = "sha256:abc"

OpenStore = Callable[..., VectorStore]


@pytest.fixture(params=["lite", "server"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the store lives: "lite" is an embedded Milvus Lite file private to the test,
    "server" the session's Milvus server (tests/milvus_server.py), shared by all tests."""
    if request.param == "lite":
        return str(tmp_path / "milvus.db")
    if request.param == "server":
        return str(request.getfixturevalue("milvus_server"))
    raise AssertionError(f"unknown backend {request.param}")  # pragma: no cover


@pytest.fixture
def collection() -> str:
    # Unique per test so that a shared Milvus server needs no cleanup between tests.
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def open_store(store_uri: str, collection: str) -> Iterator[OpenStore]:
    """Open stores on this test's backend; all are closed (and server collections dropped)."""
    opened: list[VectorStore] = []

    def open_(**kwargs: object) -> VectorStore:
        args: dict[str, object] = {
            "collection": collection,
            "dimension": DIM,
            "model": MODEL,
            "model_fingerprint": FINGERPRINT,
        }
        args.update(kwargs)
        store = VectorStore(store_uri, **args)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()
    if not store_uri.endswith(".db"):  # a server outlives the test: drop what it made
        from pymilvus import MilvusClient

        client = MilvusClient(store_uri)
        client.drop_collection(collection)
        client.close()


@pytest.fixture
def store(open_store: OpenStore) -> VectorStore:
    return open_store()


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def image(i: int, vector: np.ndarray, uri: str = "", **metadata: str) -> StoredImage:
    return StoredImage(
        id=f"{i:064x}",
        vector=vector,
        uri=uri or f"file:///photos/{i}.jpg",
        width=100 + i,
        height=200 + i,
        indexed_at=1_700_000_000 + i,
        metadata_json=json.dumps(metadata),
    )


def ids_of(hits: list[StoreHit]) -> list[str]:
    return [h.id for h in hits]


def assert_exact_top_k(
    hits: list[StoreHit], data: np.ndarray, ids: list[str], query: np.ndarray, k: int
) -> None:
    """`hits` is the brute-force cosine top-k of `data` (rows named by `ids`), best first."""
    scores = data @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:k]
    assert len(hits) == min(k, len(ids))
    got = np.array([h.score for h in hits])
    np.testing.assert_allclose(got, scores[order], atol=1e-5)
    assert np.all(np.diff(got) <= 1e-6), "hits must be best first"
    expected = [ids[i] for i in order]
    if ids_of(hits) != expected:  # only near-ties (float rounding) may swap places
        by_id = dict(zip(ids, scores, strict=True))
        for got_id, want_id in zip(ids_of(hits), expected, strict=True):
            assert abs(by_id[got_id] - by_id[want_id]) < 1e-5
        assert set(ids_of(hits)) - set(expected) <= {
            i for i in ids_of(hits) if abs(by_id[i] - scores[order[-1]]) < 1e-5
        }


# ---- lifecycle ------------------------------------------------------------------------


def test_create_reopen_and_search_without_manual_steps(open_store: OpenStore) -> None:
    vectors = unit_vectors(20)
    first = open_store()
    assert first.backend in ("milvus-lite", "milvus-server")
    assert first.count() == 0
    first.upsert([image(i, vectors[i], camera="x100") for i in range(20)])
    first.close()

    again = open_store()  # comes back "released" on Lite; the store loads it
    assert again.count() == 20
    hit = again.search(vectors[3], top_k=1)[0][0]
    assert hit == StoreHit(
        id=f"{3:064x}",
        score=pytest.approx(1.0, abs=1e-5),  # type: ignore[arg-type]
        uri="file:///photos/3.jpg",
        width=103,
        height=203,
        indexed_at=1_700_000_003,
        metadata_json='{"camera": "x100"}',
    )


def test_dimension_mismatch(open_store: OpenStore) -> None:
    open_store().close()
    with pytest.raises(StoreError, match=r"64-d.*768-d"):
        open_store(dimension=768)


def test_model_mismatch_names_both_models(open_store: OpenStore) -> None:
    open_store().close()
    with pytest.raises(StoreError) as info:
        open_store(model="ViT-L/14", model_fingerprint="sha256:other")
    assert "ViT-B/32" in str(info.value) and "ViT-L/14" in str(info.value)
    assert "sha256:abc" in str(info.value) and "sha256:other" in str(info.value)
    # The same weights under another name (another checkpoint path) are comparable.
    open_store(model="/elsewhere/ViT-B-32.pt").close()


def test_bad_configuration(store_uri: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="index type"):
        VectorStore(store_uri, dimension=DIM, model=MODEL, model_fingerprint="", index_type="X")
    with pytest.raises(StoreError, match=r"\.db"):
        VectorStore(str(tmp_path / "no-suffix"), dimension=DIM, model=MODEL, model_fingerprint="")


def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(StoreUnavailable, match="Milvus") as info:
        VectorStore(uri, dimension=DIM, model=MODEL, model_fingerprint="", timeout_s=2)
    assert uri in str(info.value)


@pytest.mark.parametrize("index_type", ["HNSW", "IVF_FLAT"])
def test_approximate_indexes_work(open_store: OpenStore, index_type: str) -> None:
    vectors = unit_vectors(300, seed=5)
    store = open_store(index_type=index_type)
    assert store.index_type == index_type
    store.upsert([image(i, vectors[i]) for i in range(300)])
    assert ids_of(store.search(vectors[7], top_k=1)[0]) == [f"{7:064x}"]
    store.close()
    assert open_store(index_type="FLAT").index_type == index_type  # the collection's wins


def test_lite_file_is_locked_while_open_and_free_after_close(tmp_path: Path) -> None:
    # A Milvus Lite matter only: not parametrised over backends.
    store_uri = str(tmp_path / "milvus.db")
    store = VectorStore(store_uri, collection="locked", dimension=DIM, model=MODEL,
                        model_fingerprint=FINGERPRINT)
    store.upsert([image(1, unit_vectors(1)[0])])
    probe = (
        "import sys\n"
        "from search_service.store import VectorStore, StoreUnavailable\n"
        "try:\n"
        f"    s = VectorStore(sys.argv[1], collection={store.collection!r}, dimension={DIM},"
        f" model={MODEL!r}, model_fingerprint={FINGERPRINT!r})\n"
        "except StoreUnavailable as e:\n"
        "    print('UNAVAILABLE', e)\n"
        "else:\n"
        "    print('COUNT', s.count())\n"
        "    s.close()\n"
    )

    def run_probe() -> str:
        done = subprocess.run(
            [sys.executable, "-c", probe, store_uri], capture_output=True, text=True, timeout=60
        )
        return done.stdout.strip()

    assert run_probe().startswith("UNAVAILABLE Milvus at")  # another process holds the lock
    store.close()
    assert run_probe() == "COUNT 1"  # close() released the file


# ---- writes -------------------------------------------------------------------------------


def test_upsert_is_idempotent_and_last_write_wins(store: VectorStore) -> None:
    v = unit_vectors(3)
    store.upsert([image(1, v[0]), image(2, v[1])])
    store.upsert([image(1, v[0]), image(2, v[1])])
    assert store.count() == 2
    store.upsert([image(1, v[0], uri="file:///a.jpg"), image(1, v[2], uri="file:///b.jpg")])
    assert store.count() == 2
    [hit] = store.search(v[2], top_k=1, expression=f'id == "{1:064x}"')[0]
    assert hit.uri == "file:///b.jpg"
    assert hit.score == pytest.approx(1.0, abs=1e-5)
    store.upsert([])
    assert store.count() == 2


def test_upsert_checks_rows(store: VectorStore) -> None:
    with pytest.raises(StoreError, match="dimension"):
        store.upsert([image(1, np.ones(DIM + 1, dtype=np.float32))])
    with pytest.raises(ValueError, match="JSON object"):
        store.upsert([StoredImage("a" * 64, unit_vectors(1)[0], "u", 1, 1, 1, "[1]")])
    assert store.count() == 0


def test_existing_ids(store: VectorStore) -> None:
    v = unit_vectors(5)
    store.upsert([image(i, v[i]) for i in range(5)])
    wanted = [f"{i:064x}" for i in (0, 3, 7, 3)] + ['" or id != "']
    assert store.existing_ids(wanted) == {f"{0:064x}", f"{3:064x}"}
    assert store.existing_ids([]) == set()


def test_delete_by_ids_and_by_filter(store: VectorStore) -> None:
    v = unit_vectors(10)
    store.upsert([image(i, v[i], group=str(i % 2)) for i in range(10)])
    assert store.delete_ids([f"{i:064x}" for i in (0, 1, 99)]) == 2
    assert store.count() == 8
    assert store.delete_ids([f"{0:064x}"]) == 0
    odd = build_expression(StructuredFilter(metadata=(MetadataMatch("group", ("1",)),)), False)
    assert store.delete_where(odd) == 4
    assert store.count() == 4
    assert store.delete_where(odd) == 0
    remaining = store.search(v, top_k=10)
    assert all(len(hits) == 4 for hits in remaining)
    assert {int(h.id, 16) for h in remaining[0]} == {2, 4, 6, 8}
    with pytest.raises(FilterError):
        store.delete_where("  ")
    with pytest.raises(FilterError):
        store.delete_where("group ==")
    assert store.count() == 4


# ---- search -----------------------------------------------------------------------------


@pytest.fixture
def filled(store: VectorStore) -> tuple[VectorStore, np.ndarray, list[StoredImage]]:
    """2000 random unit vectors in three metadata groups and two uri folders."""
    data = unit_vectors(2000, seed=1)
    rows = [
        image(i, data[i], uri=f"s3://{'cats' if i % 5 else 'dogs'}/{i}.jpg", group=str(i % 3))
        for i in range(2000)
    ]
    store.upsert(rows)
    return store, data, rows


@pytest.mark.parametrize("k", [10, 1000])
def test_search_is_exact_top_k(
    filled: tuple[VectorStore, np.ndarray, list[StoredImage]], k: int
) -> None:
    store, data, rows = filled
    queries = unit_vectors(4, seed=2)
    results = store.search(queries, top_k=k)
    assert len(results) == 4  # one list per query, from one call
    ids = [r.id for r in rows]
    for query, hits in zip(queries, results, strict=True):
        assert_exact_top_k(hits, data, ids, query, k)


@pytest.mark.parametrize("k", [10, 1000])
def test_filtered_search_is_exact_top_k_of_matching_rows(
    filled: tuple[VectorStore, np.ndarray, list[StoredImage]], k: int
) -> None:
    store, data, rows = filled
    f = StructuredFilter(uri_prefix="s3://cats/", metadata=(MetadataMatch("group", ("1", "2")),))
    keep = [i for i, r in enumerate(rows) if r.uri.startswith("s3://cats/") and i % 3 != 0]
    queries = unit_vectors(3, seed=3)
    results = store.search(queries, top_k=k, expression=build_expression(f, allow_raw=False))
    ids = [rows[i].id for i in keep]
    for query, hits in zip(queries, results, strict=True):
        assert_exact_top_k(hits, data[keep], ids, query, k)


def test_multi_query_search_returns_one_list_per_query(store: VectorStore) -> None:
    v = unit_vectors(30, seed=4)
    store.upsert([image(i, v[i]) for i in range(30)])
    results = store.search(v[:7], top_k=3)
    assert [ids_of(hits)[0] for hits in results] == [f"{i:064x}" for i in range(7)]
    assert all(len(hits) == 3 for hits in results)
    assert store.search(v[:0], top_k=3) == []
    assert len(store.search(v[0], top_k=MAX_TOP_K)[0]) == 30  # fewer rows than k
    for bad_k in (0, MAX_TOP_K + 1):
        with pytest.raises(ValueError):
            store.search(v[:1], top_k=bad_k)
    with pytest.raises(StoreError):
        store.search(np.ones((1, DIM + 1), dtype=np.float32), top_k=1)


# ---- filters on the real backend ----------------------------------------------------------

TRICKY_URIS = [
    "file:///a%b/1.jpg",
    "file:///axb/1.jpg",
    "file:///a_b/1.jpg",
    'file:///a"b/1.jpg',
    "file:///a'b/1.jpg",
    "file:///a\\b/1.jpg",
    "file:///a\\%b/1.jpg",
    "file:///ab/1.jpg",
    "file:///a%b",
]


@pytest.fixture
def tricky(store: VectorStore) -> tuple[VectorStore, np.ndarray]:
    v = unit_vectors(len(TRICKY_URIS), seed=6)
    store.upsert(
        [image(i, v[i], uri=u, tag=u, group=str(i % 2)) for i, u in enumerate(TRICKY_URIS)]
    )
    return store, v


def matching_uris(store: VectorStore, f: StructuredFilter, allow_raw: bool = False) -> set[str]:
    hits = store.search(
        np.ones(DIM, dtype=np.float32), top_k=100, expression=build_expression(f, allow_raw)
    )[0]
    return {h.uri for h in hits}


@pytest.mark.parametrize(
    "prefix",
    ["file:///a%b", "file:///a_b", 'file:///a"b', "file:///a'b", "file:///a\\", "file:///a%"],
)
def test_uri_prefix_matches_literally(tricky: tuple[VectorStore, np.ndarray], prefix: str) -> None:
    store, _ = tricky
    expected = {u for u in TRICKY_URIS if u.startswith(prefix)}
    assert expected
    assert matching_uris(store, StructuredFilter(uri_prefix=prefix)) == expected
    # Also with a JSON condition in the same expression (another evaluation path in Lite).
    with_json = StructuredFilter(uri_prefix=prefix, metadata=(MetadataMatch("group", ("0", "1")),))
    assert matching_uris(store, with_json) == expected


def test_metadata_equals_and_in(tricky: tuple[VectorStore, np.ndarray]) -> None:
    store, _ = tricky
    one = StructuredFilter(metadata=(MetadataMatch("tag", ('file:///a"b/1.jpg',)),))
    assert matching_uris(store, one) == {'file:///a"b/1.jpg'}
    several = ("file:///a\\b/1.jpg", "file:///a%b", "not there")
    assert matching_uris(store, StructuredFilter(metadata=(MetadataMatch("tag", several),))) == {
        "file:///a\\b/1.jpg",
        "file:///a%b",
    }
    both = StructuredFilter(
        metadata=(MetadataMatch("group", ("0",)), MetadataMatch("tag", several))
    )
    expected = {u for i, u in enumerate(TRICKY_URIS) if i % 2 == 0 and u in several}
    assert matching_uris(store, both) == expected
    missing_key = StructuredFilter(metadata=(MetadataMatch("nokey", ("x",)),))
    assert matching_uris(store, missing_key) == set()


@pytest.mark.parametrize(
    "f",
    [
        StructuredFilter(uri_prefix='" or id != "'),
        StructuredFilter(uri_prefix="' or id != '"),
        StructuredFilter(uri_prefix='file:///" or uri like "%'),
        StructuredFilter(uri_prefix='\\" or true or "'),
        StructuredFilter(metadata=(MetadataMatch("tag", ('"] or true or ["',)),)),
        StructuredFilter(metadata=(MetadataMatch("tag", ('x" or metadata["group"] != "',)),)),
        StructuredFilter(metadata=(MetadataMatch("tag", ("x\\", ' or true or "')),)),
        StructuredFilter(metadata=(MetadataMatch("tag", ("x\n or true",)),)),
    ],
)
def test_injection_attempts_match_nothing(
    tricky: tuple[VectorStore, np.ndarray], f: StructuredFilter
) -> None:
    assert matching_uris(tricky[0], f) == set()


def test_raw_expressions(tricky: tuple[VectorStore, np.ndarray]) -> None:
    store, _ = tricky
    raw = StructuredFilter(expression="width >= 107")
    with pytest.raises(RawFilterDenied):
        matching_uris(store, raw)
    assert matching_uris(store, raw, allow_raw=True) == set(TRICKY_URIS[7:])
    with pytest.raises(FilterError, match="invalid filter expression"):
        matching_uris(store, StructuredFilter(expression="width >= "), allow_raw=True)
    with pytest.raises(FilterError):
        matching_uris(store, StructuredFilter(expression="width >>> 3"), allow_raw=True)
