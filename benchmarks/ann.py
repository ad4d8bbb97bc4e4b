"""ANN indexes on the Milvus server: `python -m benchmarks.ann [--sizes 100000,1000000]`.

For each collection size, a fresh `milvus` 2.3.5 server (tests/milvus_launcher.py) gets the
realistic clustered set of benchmarks/ann_data.py (vectors around the sample photos'
random-ViT-B/32 vectors), inserted once and flushed; then each index type in turn is built
on it (release, drop the old index, create, wait for every row to be indexed, load) and
measured with the search parameters it would be served with:

* build time (create_index until no row is pending) and load time;
* the server's RSS: released with no index, peak while building and loading (sampled every
  0.2 s), and once loaded;
* p50/p99 of single-query searches (top 10) at concurrency 1 and 8, pymilvus's MilvusClient
  called directly (no clipsearch service in between, no output fields, Eventually
  consistency: the data is flushed and static, so this times the index, not the time tick);
  the benchmark client shares the 2 cores with the server;
* recall@10 against exact numpy search over the same rows, for held-out queries, unfiltered
  and with a 10% filter (`indexed_at < 100` on a field uniform over 0..999, the shape of
  the store's time filters; the matching rows are scattered over all segments).

Results go to results/ann.json and results/ann.md (rewritten from the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from benchmarks.ann_data import ClusteredModel, exact_top_k, photo_vectors, recall_at_k
from benchmarks.memory import RssPeak, status_mb

RESULTS = Path(__file__).resolve().parent.parent / "results"
COLLECTION = "ann_bench"
TOP_K = 10
FILTER = "indexed_at < 100"  # 10% of rows: indexed_at is uniform over 0..999
# DiskANN: in the 5k smoke run no row was indexed after 8 minutes; give it a short chance.
BUILD_TIMEOUT_S = {"DISKANN": 120.0}
_BATCH = 10_000  # rows per insert: 20 MB of vectors, far below gRPC's 64 MiB


@dataclass(frozen=True)
class IndexSpec:
    """One index type with the build params the store uses and the search values to try."""

    index_type: str
    search_key: str = ""
    search_values: tuple[int, ...] = (0,)
    build_params: dict[str, Any] = field(default_factory=dict)

    def search_params(self, value: int) -> dict[str, Any]:
        return {self.search_key: value} if self.search_key else {}


def specs() -> dict[str, IndexSpec]:
    """The index types measured, with search/store.py's build parameters."""
    from search_service.store import INDEX_TYPES

    return {
        "FLAT": IndexSpec("FLAT"),
        "HNSW": IndexSpec("HNSW", "ef", (16, 64, 128, 256, 512), INDEX_TYPES["HNSW"]),
        "IVF_FLAT": IndexSpec("IVF_FLAT", "nprobe", (8, 16, 32, 64), INDEX_TYPES["IVF_FLAT"]),
        "IVF_SQ8": IndexSpec("IVF_SQ8", "nprobe", (8, 16, 32), INDEX_TYPES["IVF_SQ8"]),
        # More lists than the store's 128: each probe scans fewer rows of a large segment.
        "IVF_FLAT_1024": IndexSpec("IVF_FLAT", "nprobe", (8, 16, 32, 64), {"nlist": 1024}),
        "DISKANN": IndexSpec("DISKANN", "search_list", (20, 50, 100), INDEX_TYPES["DISKANN"]),
    }


def load_vectors(client: MilvusClient, vectors: np.ndarray, indexed_at: np.ndarray,
                 collection: str = COLLECTION) -> float:
    """A fresh collection (int64 id, vector, indexed_at) filled and flushed; seconds taken."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
    schema.add_field("indexed_at", DataType.INT64)
    client.create_collection(collection, schema=schema, consistency_level="Strong")
    started = time.perf_counter()
    for start in range(0, len(vectors), _BATCH):
        stop = min(len(vectors), start + _BATCH)
        client.insert(collection, [{"id": i, "vector": vectors[i], "indexed_at": int(indexed_at[i])}
                                   for i in range(start, stop)])
    client.flush(collection)
    elapsed = time.perf_counter() - started
    # Merge the small flushed segments now: in the first 1M run the server's own compaction
    # went from 15 segments to 4 while the first index (FLAT) was being measured.
    job = client.compact(collection)
    deadline = time.monotonic() + 900
    while client.get_compaction_state(job) != "Completed" and time.monotonic() < deadline:
        time.sleep(1)
    return elapsed


def build(client: MilvusClient, spec: IndexSpec, rows: int, pid: int | None,
          timeout_s: float = 2400, collection: str = COLLECTION) -> dict[str, Any]:
    """Replaces the vector index with `spec`'s, waits for it, loads; times and memory."""
    client.release_collection(collection)
    if "vector" in client.list_indexes(collection):
        client.drop_index(collection, "vector")
    time.sleep(2)  # let the released segments' memory go before the baseline
    released = status_mb(pid) if pid else 0.0
    params = MilvusClient.prepare_index_params()
    params.add_index("vector", index_type=spec.index_type, metric_type="COSINE",
                     params=spec.build_params)
    with RssPeak(pid, period_s=0.2) as peak:
        started = time.perf_counter()
        client.create_index(collection, params, sync=False)
        while True:
            info = client.describe_index(collection, "vector")
            if str(info.get("state", "")) == "Failed":
                raise RuntimeError(f"{spec.index_type} build failed: {info}")
            if int(info.get("indexed_rows", 0)) >= rows and not int(
                    info.get("pending_index_rows", 0)):
                break
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"{spec.index_type}: not built after {timeout_s:.0f} s "
                                   f"({info.get('indexed_rows')} of {rows} rows indexed)")
            time.sleep(0.5)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        client.load_collection(collection, timeout=3600)
        load_s = time.perf_counter() - started
    time.sleep(1)
    return {"build_s": round(build_s, 1), "load_s": round(load_s, 1),
            "rss_released_mb": round(released), "rss_peak_mb": round(peak.peak),
            "rss_loaded_mb": round(status_mb(pid)) if pid else 0}


def _search(client: MilvusClient, query: np.ndarray, params: dict[str, Any],
            expression: str, collection: str = COLLECTION) -> tuple[float, list[int]]:
    started = time.perf_counter()
    [hits] = client.search(collection, data=[query], limit=TOP_K, filter=expression,
                           search_params={"metric_type": "COSINE", "params": params},
                           consistency_level="Eventually")
    return time.perf_counter() - started, [int(h["id"]) for h in hits]


def measure(client: MilvusClient, queries: np.ndarray, truth: np.ndarray,
            params: dict[str, Any], expression: str, collection: str = COLLECTION
            ) -> dict[str, Any]:
    """Recall@10 and latencies at concurrency 1, then latencies at concurrency 8."""
    _search(client, queries[0], params, expression, collection)  # warm-up
    single = [_search(client, q, params, expression, collection) for q in queries]
    with ThreadPoolExecutor(8) as pool:
        started = time.perf_counter()
        eight = list(pool.map(lambda q: _search(client, q, params, expression, collection)[0],
                                  queries))
        wall = time.perf_counter() - started
    ms = [s[0] * 1000 for s in single]
    ms8 = [s * 1000 for s in eight]
    return {"recall_at_10": round(recall_at_k([s[1] for s in single], truth), 4),
            "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99), "qps_c1": round(
                len(ms) / (sum(ms) / 1000), 1),
            "p50_ms_c8": _pct(ms8, 50), "p99_ms_c8": _pct(ms8, 99),
            "qps_c8": round(len(queries) / wall, 1)}


def _pct(values: list[float], p: float) -> float:
    return round(float(np.percentile(values, p)), 2)


def run_size(uri: str, pid: int | None, vectors: np.ndarray, queries: np.ndarray,
             indexes: list[str], seed: int = 0, build_timeout_s: float = 2400,
             collection: str = COLLECTION) -> dict[str, Any]:
    """Loads `vectors` into the server at `uri` and measures every index in `indexes`."""
    rng = np.random.default_rng(seed)
    indexed_at = rng.integers(0, 1000, len(vectors))
    mask = indexed_at < 100
    truths = {"unfiltered": exact_top_k(vectors, queries, TOP_K),
              "filter 10%": exact_top_k(vectors, queries, TOP_K, mask)}
    client = MilvusClient(uri, timeout=600)
    try:
        if client.has_collection(collection):
            client.drop_collection(collection)
        rss_empty = status_mb(pid) if pid else 0.0
        insert_s = load_vectors(client, vectors, indexed_at, collection)
        out: dict[str, Any] = {"size": len(vectors), "queries": len(queries),
                               "filter_share": float(mask.mean()),
                               "insert_rows_per_s": round(len(vectors) / insert_s),
                               "rss_empty_mb": round(rss_empty), "indexes": []}
        for name in indexes:
            spec = specs()[name]
            print(f"   {len(vectors)} {name}: building", flush=True)
            entry: dict[str, Any] = {"index": name, "build_params": spec.build_params}
            try:
                limit_s = min(build_timeout_s, BUILD_TIMEOUT_S.get(name, build_timeout_s))
                entry.update(build(client, spec, len(vectors), pid, limit_s, collection))
            except Exception as exc:  # e.g. DiskANN where this server cannot build it
                entry["error"] = f"{type(exc).__name__}: {exc}"
                out["indexes"].append(entry)
                print(f"   {name}: {entry['error']}", flush=True)
                continue
            entry["segments"] = _segments(uri, collection)
            entry["rows"] = []
            for value in spec.search_values:
                for filter_name, expression in (("unfiltered", ""), ("filter 10%", FILTER)):
                    row = {"search_params": spec.search_params(value), "filter": filter_name,
                           **measure(client, queries, truths[filter_name],
                                     spec.search_params(value), expression, collection)}
                    print(f"   {name} {row}", flush=True)
                    entry["rows"].append(row)
            out["indexes"].append(entry)
        client.drop_collection(collection)
        return out
    finally:
        client.close()


def _segments(uri: str, collection: str) -> int:
    """Sealed segments loaded (each is indexed and searched on its own)."""
    from pymilvus import connections, utility

    alias = f"ann-segments-{time.monotonic_ns()}"
    with warnings.catch_warnings():  # the ORM API: MilvusClient has no segment listing here
        warnings.simplefilter("ignore")
        connections.connect(alias, uri=uri)
        try:
            return len(utility.get_query_segment_info(collection, using=alias))
        finally:
            connections.disconnect(alias)


def realistic_set(size: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                   dict[str, Any]]:
    """The clustered set around the photos' random-ViT-B/32 vectors, its held-out queries,
    and the sampling model's check against the real vectors (and the tiny CLIP's)."""
    from encoder_service.testmodels import cached_random_vit_b32, cached_tiny_clip

    checks = {}
    models = {}
    for name, checkpoint in (("random ViT-B/32", cached_random_vit_b32()),
                             ("tiny CLIP", cached_tiny_clip())):
        model = ClusteredModel(photo_vectors(checkpoint))
        model.calibrate(seed)
        checks[name] = model.compare()
        models[name] = model
    model = models["random ViT-B/32"]
    rng = np.random.default_rng(seed + 1)
    return model.sample(size, rng), model.sample(queries, rng), checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ann", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--indexes", default="FLAT,HNSW,IVF_FLAT,IVF_SQ8",
                        help=f"any of {', '.join(specs())}")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--build-timeout-s", type=float, default=2400,
                        help="give up on an index not built after this long")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from tests.milvus_launcher import start_milvus_server

    indexes = [i.strip().upper() for i in args.indexes.split(",") if i.strip()]
    sizes = [int(s) for s in args.sizes.split(",")]
    store = args.out / "ann.json"
    results: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    started = time.perf_counter()
    vectors, queries, checks = realistic_set(max(sizes), args.queries)
    results["sampling_check"] = checks
    results["nn_cosine_at_size"] = {**results.get("nn_cosine_at_size", {}),
                                    **_nn_at_sizes(vectors, queries)}
    runs = {r["size"]: r for r in results.get("runs", [])}
    measured_before = {size: runs[size]["indexes"] for size in sizes if size in runs}
    for size in sizes:
        print(f"== {size} vectors", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            server = start_milvus_server(Path(tmp) / "server",
                                         extra_config={"queryNode.enableDisk": "true"})
            try:
                runs[size] = run_size(server.uri, server.pid, vectors[:size], queries, indexes,
                                      build_timeout_s=args.build_timeout_s)
                # A rerun of some indexes replaces theirs and keeps the others' entries.
                kept = [e for e in measured_before.get(size, []) if e["index"] not in indexes]
                runs[size]["indexes"] = kept + runs[size]["indexes"]
            finally:
                server.stop()
        results["runs"] = [runs[s] for s in sorted(runs)]
        results["seconds"] = round(time.perf_counter() - started, 1)
        store.write_text(json.dumps(results, indent=2))
    from benchmarks.ann_report import write

    write(results, args.out)
    print(f"results: {args.out / 'ann.md'}")
    return 0


def _nn_at_sizes(vectors: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    """Held-out queries' top-1 cosine in the first n rows, by n (how tight the set gets)."""
    out = {}
    for size in (10_000, 100_000, len(vectors)):
        if size <= len(vectors):
            top = exact_top_k(vectors[:size], queries, 1)[:, 0]
            cos = np.einsum("ij,ij->i", vectors[top], queries)
            out[str(size)] = [round(float(np.quantile(cos, q)), 4) for q in (0.05, 0.5, 0.95)]
    return out


if __name__ == "__main__":
    sys.exit(main())
