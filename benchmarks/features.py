"""Benchmark of issue 11's searches on Milvus Lite and a Milvus server, at the Milvus layer
and through the running services:
`python -m benchmarks.features [--sizes 10000,100000] [--backends lite,server]
[--out results/search_features.md]`.

Rows are inserted directly into the collection (no encoder): unit vectors around cluster
centres (cosine ~0.83 to their centre, ~0.69 between members), plus planted near copies
(cosine ~0.995 to their original): 1% of the rows make pairs and 0.1% triples, the groups
FindDuplicates at 0.95 must find (and nothing else is that close). The collection is made
for the encoder's model (random-weight ViT-B/32), so the search service serves it.

Per size and backend:
* Milvus layer (this process): a top-10 search, the same with min_score (range search),
  the third page of 10 (offset 20), and "more like" a stored id (its vector + a search).
* Through the services (encoder + search service processes on loopback): SearchText top-10
  (a new text each call, so each pays its encoder call), SearchText with min_score (new
  texts), the third page of a paged SearchText (its text is in the query cache after pages
  1-2), SearchSimilar (no encoder call), and FindDuplicates at 0.95 over the whole
  collection: wall time, and the search process's RSS sampled every 10 ms from
  /proc/PID/status (peak during the call minus the RSS just before it). Milvus Lite runs
  inside the search process, so its RSS includes Lite's own memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.memory import RssPeak
from client import SearchClient
from client.encoder import EncoderClient
from search_service.ranked import get_rows, search_window
from search_service.store import StoredImage, VectorStore

DIM = 512
THRESHOLD = 0.95


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered_rows(size: int, seed: int = 0
                   ) -> tuple[list[str], np.ndarray, set[frozenset[str]]]:
    """`size` ids and unit vectors, and the planted near-duplicate groups (see above)."""
    rng = np.random.default_rng(seed)
    pairs, triples = size // 100, size // 1000
    base = size - pairs - 2 * triples
    centres = _unit(rng.standard_normal((max(1, size // 50), DIM)))
    vectors = np.empty((size, DIM), np.float32)
    for start in range(0, base, 10_000):  # in slices: no size x DIM float64 temporary
        end = min(base, start + 10_000)
        around = centres[rng.integers(0, len(centres), end - start)]
        vectors[start:end] = _unit(1.5 * around + rng.standard_normal((end - start, DIM))
                                   / np.sqrt(DIM))
    ids = [f"{i:064x}" for i in rng.permutation(size)]
    planted: set[frozenset[str]] = set()
    at = base
    originals = rng.choice(base, pairs + triples, replace=False)
    for k, original in enumerate(originals):
        copies = 1 if k < pairs else 2
        group = [int(original)]
        for _ in range(copies):
            noise = 0.1 * rng.standard_normal(DIM) / np.sqrt(DIM)
            vectors[at] = _unit(vectors[group[-1]] + noise)
            group.append(at)
            at += 1
        planted.add(frozenset(ids[g] for g in group))
    return ids, vectors, planted


def _ms(work: Callable[[], Any], runs: int) -> float:
    work()
    started = time.perf_counter()
    for _ in range(runs):
        work()
    return (time.perf_counter() - started) / runs * 1000


def store_latencies(store: VectorStore, ids: list[str], vectors: np.ndarray, runs: int
                    ) -> dict[str, float]:
    """The Milvus-layer latencies (ms, mean of `runs` after a warm-up)."""
    query = vectors[7]
    cut = float(np.sort(vectors @ query)[::-1][50])

    def similar() -> None:
        [stored] = get_rows(store, [ids[7]], with_vectors=True)
        search_window(store, stored.vector, f'id != "{ids[7]}"', 0, 10)

    return {"top10_ms": _ms(lambda: search_window(store, query, "", 0, 10), runs),
            "min_score_ms": _ms(lambda: search_window(store, query, "", 0, 10, cut), runs),
            "page3_ms": _ms(lambda: search_window(store, query, "", 20, 10), runs),
            "similar_ms": _ms(similar, runs)}


def service_latencies(client: SearchClient, ids: list[str], runs: int) -> dict[str, float]:
    """The same questions through the running services (ms, mean of `runs`)."""
    texts = (f"a photo of thing {k}" for k in range(10**6))  # new texts: encoder calls
    cut = min(h.score for h in client.search_text("a photo", top_k=50))
    similar_ids = iter(ids * 2)

    def page3() -> None:
        page = client.search_page("a white dog", 10, paged=True)
        page = client.search_page("a white dog", 10, page.next_page_token)
        started = time.perf_counter()
        client.search_page("a white dog", 10, page.next_page_token)
        page3_s.append(time.perf_counter() - started)

    page3_s: list[float] = []
    page3()
    page3_s.clear()
    for _ in range(runs):
        page3()
    return {"rpc_text_ms": _ms(lambda: client.search_text(next(texts)), runs),
            "rpc_min_score_ms": _ms(lambda: client.search_text(next(texts), min_score=cut),
                                    runs),
            "rpc_page3_ms": float(np.mean(page3_s)) * 1000,
            "rpc_similar_ms": _ms(lambda: client.search_similar(next(similar_ids)), runs)}


def run(uri: str, backend: str, size: int, encoder: Any, tmp: Path) -> dict[str, Any]:
    """One collection of `size` rows: fill it, measure, drop it."""
    from tests.servers import running

    ids, vectors, planted = clustered_rows(size)
    with EncoderClient(encoder.address) as encoder_client:
        info = encoder_client.model_info()
    collection = f"bench_{uuid.uuid4().hex[:10]}"
    row: dict[str, Any] = {"backend": backend, "size": size}
    runs = 20 if size <= 10_000 else 10
    store = VectorStore(uri, collection=collection, dimension=DIM, model=info.name,
                        model_fingerprint=info.fingerprint)
    try:
        started = time.perf_counter()
        for start in range(0, size, 10_000):
            store.upsert([StoredImage(i, v, f"/b/{i}", 1, 1, 0, "{}") for i, v in
                          zip(ids[start:start + 10_000], vectors[start:start + 10_000],
                              strict=True)])
        row["insert_s"] = time.perf_counter() - started
        row.update(store_latencies(store, ids, vectors, runs))
    finally:
        store.close()  # Lite: one process per .db; the search service opens it next
    print(json.dumps(row), flush=True)
    with running(["serve", "search", "--encoder", encoder.address, "--milvus", uri,
                  "--collection", collection], tmp / f"search-{backend}-{size}.log") as search, \
            SearchClient(search.address, timeout_s=3600) as client:
        row.update(service_latencies(client, ids, runs))
        with RssPeak(search.process.pid) as rss:
            started = time.perf_counter()
            groups = list(client.find_duplicates(THRESHOLD))
            row["duplicates_s"] = time.perf_counter() - started
        row["rss_before_mb"] = rss.before
        row["rss_peak_delta_mb"] = rss.peak - rss.before
        found = {frozenset(h.id for h in g) for g in groups}
        row["groups"], row["planted"] = len(found), len(planted)
        row["groups_equal_planted"] = found == planted
    if backend == "milvus-server":
        with VectorStore(uri, collection=collection, dimension=DIM, model=info.name,
                         model_fingerprint=info.fingerprint) as store:
            store._client.drop_collection(collection)
    return row


def render(rows: list[dict[str, Any]]) -> str:
    """The markdown tables of the rows."""
    lines = [f"Machine: {platform.machine()}, {platform.python_implementation()} "
             f"{platform.python_version()}.", "",
             "Milvus layer (this process), ms, mean of 20 calls (10 at 100k) after a warm-up:",
             "", "| backend | rows | insert s | top-10 | min_score | page 3 | similar |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['backend']} | {r['size']} | {r['insert_s']:.1f} | {r['top10_ms']:.1f} | "
              f"{r['min_score_ms']:.1f} | {r['page3_ms']:.1f} | {r['similar_ms']:.1f} |"
              for r in rows]
    lines += ["", "Through the services, ms, mean of 20 calls (10 at 100k) after a warm-up; "
              "FindDuplicates at 0.95 over the whole collection:", "",
              "| backend | rows | SearchText top-10 (new texts) | min_score (new texts) | "
              "page 3 (cached text) | SearchSimilar | FindDuplicates s | search process "
              "RSS before MB | RSS peak during the call, + MB | groups (planted), equal |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['backend']} | {r['size']} | {r['rpc_text_ms']:.1f} | "
              f"{r['rpc_min_score_ms']:.1f} | {r['rpc_page3_ms']:.1f} | "
              f"{r['rpc_similar_ms']:.1f} | {r['duplicates_s']:.1f} | "
              f"{r['rss_before_mb']:.0f} | {r['rss_peak_delta_mb']:.1f} | {r['groups']} "
              f"({r['planted']}), {'yes' if r['groups_equal_planted'] else 'NO'} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    from encoder_service.testmodels import cached_random_vit_b32
    from tests.milvus_launcher import start_milvus_server
    from tests.servers import running

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000")
    parser.add_argument("--backends", default="lite,server")
    parser.add_argument("--out", default="results/search_features.md")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = None
        try:
            with running(["serve", "encoder", "--model", str(cached_random_vit_b32())],
                         tmp / "encoder.log") as encoder:
                for backend in args.backends.split(","):
                    if backend == "server" and server is None:
                        server = start_milvus_server(tmp / "server")
                    for size in (int(s) for s in args.sizes.split(",")):
                        uri = (server.uri if backend == "server" and server is not None
                               else str(tmp / f"lite-{size}.db"))
                        rows.append(run(uri, "milvus-server" if backend == "server"
                                        else "milvus-lite", size, encoder, tmp))
                        print(json.dumps(rows[-1]), flush=True)
        finally:
            if server is not None:
                server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    table = render(rows)
    Path(args.out).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
