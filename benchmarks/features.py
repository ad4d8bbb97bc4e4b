"""Benchmark of issue 11's searches at the Milvus layer, on Lite and a Milvus server:
`python -m benchmarks.features [--sizes 10000,100000] [--out results/search_features.md]`.

Per size and backend: a plain top-10 search, the same with min_score (range search), the
third page of 10 (offset 20), "more like" a stored id (fetch its vector + search: what
SearchSimilar does, with no encoder call), and FindDuplicates at 0.95 over the whole
collection (time, and the peak of Python allocations during the scan). The rows are
random unit vectors plus 1% near copies (cosine ~0.99) so that groups exist. Encoder
time is not included: through the services a SearchText adds its encoder call (see
results/benchmarks.md for that), SearchSimilar has none.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from search_service.duplicates import BlockScan, DuplicateFinder
from search_service.ranked import get_rows, search_window
from search_service.store import StoredImage, VectorStore

DIM = 512


def _rows(size: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(size, DIM)).astype(np.float32)
    copies = size // 100
    vectors[size - copies:] = vectors[:copies] + 0.07 * rng.normal(size=(copies, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [f"{i:064x}" for i in range(size)], vectors


def _ms(work: Callable[[], Any], runs: int = 20) -> float:
    work()
    started = time.perf_counter()
    for _ in range(runs):
        work()
    return (time.perf_counter() - started) / runs * 1000


def run(uri: str, backend: str, size: int, duplicates: bool = True) -> dict[str, Any]:
    ids, vectors = _rows(size)
    store = VectorStore(uri, collection=f"bench_{uuid.uuid4().hex[:10]}", dimension=DIM,
                        model="bench", model_fingerprint="bench")
    try:
        for start in range(0, size, 5000):
            store.upsert([StoredImage(i, v, f"/b/{i}", 1, 1, 0, "{}") for i, v in
                          zip(ids[start:start + 5000], vectors[start:start + 5000],
                              strict=True)])
        query = vectors[7]
        cut = float(np.sort(vectors @ query)[::-1][50])
        row: dict[str, Any] = {"backend": backend, "size": size}
        row["top10_ms"] = _ms(lambda: search_window(store, query, "", 0, 10))
        row["min_score_ms"] = _ms(lambda: search_window(store, query, "", 0, 10, cut))
        row["page3_ms"] = _ms(lambda: search_window(store, query, "", 20, 10))

        def similar() -> None:
            [stored] = get_rows(store, [ids[7]], with_vectors=True)
            search_window(store, stored.vector, f'id != "{ids[7]}"', 0, 10)

        row["similar_ms"] = _ms(similar)
        if not duplicates:
            return row
        tracemalloc.start()
        started = time.perf_counter()
        finder = (BlockScan(store, 0.95) if backend == "milvus-lite"  # as the service does
                  else DuplicateFinder(store, 0.95))
        groups = finder.run().groups()
        row["duplicates_s"] = time.perf_counter() - started
        row["duplicates_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        row["strategy"] = type(finder).__name__
        row["groups"] = len(groups)
        row["expected_groups"] = size // 100
        if backend == "milvus-server":
            store._client.drop_collection(store.collection)
        return row
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000")
    parser.add_argument("--backends", default="lite,server")
    parser.add_argument("--out", default="results/search_features.md")
    parser.add_argument("--no-duplicates", action="store_true", help="skip FindDuplicates")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        try:
            for backend in args.backends.split(","):
                if backend == "server" and server is None:
                    from tests.milvus_server import start_milvus_server

                    server = start_milvus_server(Path(tmp) / "server")
                for size in (int(s) for s in args.sizes.split(",")):
                    uri = (server.uri if backend == "server" and server is not None
                           else str(Path(tmp) / f"lite-{size}.db"))
                    rows.append(run(uri, "milvus-server" if backend == "server"
                                    else "milvus-lite", size, not args.no_duplicates))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if server is not None:
                server.stop()
    lines = [f"# Search features (issue 11), Milvus layer, {platform.processor() or 'cpu'}",
             "", "| backend | rows | top-10 ms | min_score ms | page 3 ms | similar ms | "
             "FindDuplicates s | peak MB | groups (planted) | strategy |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['backend']} | {r['size']} | {r['top10_ms']:.1f} | {r['min_score_ms']:.1f} "
              f"| {r['page3_ms']:.1f} | {r['similar_ms']:.1f} | "
              + (f"{r['duplicates_s']:.1f} | {r['duplicates_peak_mb']:.1f} | {r['groups']} "
                 f"({r['expected_groups']}) | {r['strategy']} |" if "groups" in r
                 else "- | - | - | - |")
              for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
