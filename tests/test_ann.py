"""ANN indexes: the benchmark's ground truth and recall (benchmarks/ann.py, a 5k smoke run
on the real Milvus server), its sampling model, and the `--index-type auto` /
`--search-ef` / `--search-nprobe` settings reaching Milvus."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymilvus import MilvusClient

from benchmarks.ann import run_size
from benchmarks.ann_data import ClusteredModel, exact_top_k, nn_cosines, recall_at_k
from clipsearch.cli import build_parser
from clipsearch.options import from_namespace
from search_service.config import DEFAULT_SEARCH_EF, DEFAULT_SEARCH_NPROBE, SearchConfig
from search_service.store import AUTO_SERVER_INDEX, StoredImage, StoreError, VectorStore

DIM = 16


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_exact_top_k_is_brute_force_and_recall_counts_overlap() -> None:
    rng = np.random.default_rng(0)
    vectors, queries = _unit(rng, 1000), _unit(rng, 7)
    mask = rng.random(1000) < 0.1
    for chosen in (None, mask):
        truth = exact_top_k(vectors, queries, 10, chosen, chunk=128)  # chunks cross rows
        scores = queries @ vectors.T
        if chosen is not None:
            scores[:, ~chosen] = -np.inf
            assert chosen[truth].all()
        np.testing.assert_array_equal(truth, np.argsort(-scores, axis=1)[:, :10])
    assert recall_at_k([list(t) for t in truth], truth) == 1.0
    half = [[*t[:5], -1, -2, -3, -4, -5] for t in truth]
    assert recall_at_k(half, truth) == 0.5


def test_sampling_model_matches_the_real_nn_cosines() -> None:
    """Calibrated on a clustered 'real' set, same-size draws have its median NN cosine."""
    rng = np.random.default_rng(1)
    centers = _unit(rng, 10, 32)
    real = centers[rng.integers(0, 10, 120)] + 0.3 * rng.standard_normal((120, 32))
    real = (real / np.linalg.norm(real, axis=1, keepdims=True)).astype(np.float32)
    model = ClusteredModel(real)
    model.calibrate(repeats=2)
    check = model.compare()
    assert abs(check["synthetic_nn_cosine"][2] - check["real_nn_cosine"][2]) < 0.02
    assert check["ks_distance"] < 0.3
    big = model.sample(2000, np.random.default_rng(2))
    np.testing.assert_allclose(np.linalg.norm(big, axis=1), 1, atol=1e-5)
    # More rows, closer neighbours: the reason the comparison is made at the same size.
    assert np.median(nn_cosines(big)) > check["synthetic_nn_cosine"][2]


def test_ann_smoke_on_the_server(milvus_server: str) -> None:
    """FLAT on 5k rows is exact: recall 1.0 unfiltered and under the 10% filter, so the
    benchmark's ids, ground truth and recall bookkeeping line up."""
    rng = np.random.default_rng(3)
    vectors, queries = _unit(rng, 5000, 64), _unit(rng, 20, 64)
    result = run_size(milvus_server, None, vectors, queries, ["FLAT"],
                      collection=f"ann_{uuid.uuid4().hex[:12]}")
    [flat] = result["indexes"]
    assert "error" not in flat and flat["build_s"] >= 0
    assert {r["filter"] for r in flat["rows"]} == {"unfiltered", "filter 10%"}
    for row in flat["rows"]:
        assert row["recall_at_10"] == 1.0, row
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert 0.08 < result["filter_share"] < 0.12


# ---- settings ---------------------------------------------------------------------------


def _search_config(argv: list[str]) -> SearchConfig:
    return from_namespace(SearchConfig, build_parser().parse_args(["serve", "search", *argv]))


def test_search_param_options(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _search_config([])
    assert (config.search_ef, config.search_nprobe) == (DEFAULT_SEARCH_EF, DEFAULT_SEARCH_NPROBE)
    monkeypatch.setenv("CLIPSEARCH_SEARCH_SEARCH_EF", "200")
    monkeypatch.setenv("CLIPSEARCH_SEARCH_INDEX_TYPE", "auto")
    config = _search_config(["--search-nprobe", "48"])
    assert (config.search_ef, config.search_nprobe, config.index_type) == (200, 48, "auto")
    assert _search_config(["--search-ef", "7"]).search_ef == 7  # the flag beats the variable


def _spy_search(store: VectorStore) -> list[dict[str, Any]]:
    """Records the search params of each real Milvus search the store makes."""
    seen: list[dict[str, Any]] = []
    real = store._client.search

    def search(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["search_params"]["params"])
        return real(*args, **kwargs)

    store._client.search = search  # type: ignore[method-assign]
    return seen


def _fill(store: VectorStore, n: int = 200) -> np.ndarray:
    vectors = _unit(np.random.default_rng(4), n)
    store.upsert([StoredImage(f"{i:064x}", v, f"/p/{i}", 1, 1, 0, "{}")
                  for i, v in enumerate(vectors)])
    return vectors


def test_lite_auto_is_flat_and_ef_reaches_milvus(tmp_path: Path) -> None:
    with VectorStore(str(tmp_path / "a.db"), collection="auto", dimension=DIM, model="m",
                     model_fingerprint="f", index_type="auto") as store:
        assert store.index_type == "FLAT"  # Lite's ANN indexes lose rows under filters
    with VectorStore(str(tmp_path / "h.db"), collection="hnsw", dimension=DIM, model="m",
                     model_fingerprint="f", index_type="HNSW", search_ef=90) as store:
        vectors = _fill(store)
        seen = _spy_search(store)
        [hits] = store.search(vectors[5], 10)
        assert hits[0].id == f"{5:064x}"
        [wide] = store.search(vectors[5], 120)
        assert len(wide) == 120
    assert seen == [{"ef": 90}, {"ef": 120}]  # ef is raised to top_k, never below it
    with pytest.raises(StoreError, match="search nprobe"):
        VectorStore(str(tmp_path / "x.db"), dimension=DIM, model="m", model_fingerprint="f",
                    search_nprobe=0)


def test_server_auto_builds_the_ann_index_and_nprobe_reaches_milvus(milvus_server: str) -> None:
    name = f"auto_{uuid.uuid4().hex[:12]}"
    with VectorStore(milvus_server, collection=name, dimension=DIM, model="m",
                     model_fingerprint="f", index_type="auto", search_nprobe=5) as store:
        assert store.index_type == AUTO_SERVER_INDEX
        client = MilvusClient(milvus_server)
        try:
            built = client.describe_index(name, "vector")["index_type"]
        finally:
            client.close()
        assert built == AUTO_SERVER_INDEX
        vectors = _fill(store)
        seen = _spy_search(store)
        [hits] = store.search(vectors[3], 10)
        assert hits[0].id == f"{3:064x}"
        store._client.drop_collection(name)
    expected = store.search_params(10)
    assert seen == [expected] and expected  # the index's own parameter, passed through
