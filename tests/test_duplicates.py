"""FindDuplicates' blocked scan against brute force on Milvus Lite and the Milvus server
(block sizes below, not dividing and above the row count; a filter), its spill file (in
the given directory while the scan runs, freed afterwards, also when stopped), and the
service's stop wiring (a cancelled call or a passed deadline stops the scan)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from clipsearch.search.v1 import search_pb2
from search_service import queries
from search_service.duplicates import (
    BlockedScan,
    ScanStopped,
    block_rows,
    find_duplicate_groups,
)
from search_service.store import StoredImage, VectorStore
from tests.milvus_server import store_on

DIM = 32
ROWS = 700


@pytest.fixture(params=["lite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    yield from store_on(request, tmp_path, DIM, "d")


def _clustered(seed: int = 3) -> tuple[list[str], np.ndarray]:
    """ROWS unit vectors: 60 clusters of 2-12 members spread at three noise levels (so some
    pairs of a cluster are above the threshold and some below, making chains), the rest
    lone random vectors. Ids are shuffled against the clusters."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(ROWS, DIM))
    at = 0
    for _ in range(60):
        members = int(rng.integers(2, 13))
        centre = rng.normal(size=DIM)
        centre /= np.linalg.norm(centre)
        noise = float(rng.choice([0.02, 0.03, 0.04]))
        vectors[at:at + members] = centre + noise * rng.normal(size=(members, DIM))
        at += members
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(ROWS)
    return [f"{i:064x}" for i in order], vectors.astype(np.float32)


def _threshold(vectors: np.ndarray, near: float) -> float:
    """Midway between the two distinct pair scores around `near`: no pair on the line, so
    any order of float32 summation gives the same side."""
    scores = np.unique((vectors @ vectors.T)[np.triu_indices(len(vectors), 1)])
    k = int(np.searchsorted(scores, near))
    return float(scores[k - 1] + scores[k]) / 2


def _brute_force(ids: list[str], vectors: np.ndarray, threshold: float
                 ) -> dict[tuple[str, ...], dict[str, float]]:
    """Connected components of the float32 "score >= threshold" graph, by breadth-first
    search over the full matrix: {sorted member ids: {id: best score to another}}."""
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    edges = scores >= np.float32(threshold)
    seen: set[int] = set()
    groups = {}
    for start in range(len(ids)):
        if start in seen or not edges[start].any():
            continue
        component, frontier = {start}, [start]
        while frontier:
            nxt = [int(j) for i in frontier for j in np.flatnonzero(edges[i])
                   if int(j) not in component]
            component.update(nxt)
            frontier = nxt
        seen |= component
        groups[tuple(sorted(ids[i] for i in component))] = {
            ids[i]: float(scores[i][edges[i]].max()) for i in component}
    return groups


def _fill(store: VectorStore, ids: list[str], vectors: np.ndarray) -> None:
    store.upsert([StoredImage(i, v, f"/d/{k}", 1, 1, 0, f'{{"k": "{k % 3}"}}')
                  for k, (i, v) in enumerate(zip(ids, vectors, strict=True))])


def _check(found: list[list[tuple[str, float]]],
           expected: dict[tuple[str, ...], dict[str, float]]) -> None:
    assert {tuple(x for x, _ in g) for g in found} == set(expected)
    for group in found:
        best = expected[tuple(x for x, _ in group)]
        np.testing.assert_allclose([s for _, s in group], [best[x] for x, _ in group],
                                   atol=2e-6)
    sizes = [len(g) for g in found]
    assert sizes == sorted(sizes, reverse=True)  # largest first


def test_blocked_scan_equals_brute_force(store: VectorStore, tmp_path: Path) -> None:
    ids, vectors = _clustered()
    _fill(store, ids, vectors)
    threshold = _threshold(vectors, 0.96)
    expected = _brute_force(ids, vectors, threshold)
    # The data exercises what matters: many groups, large ones, and chains (a group whose
    # members are not all pairwise above the threshold).
    assert len(expected) >= 30 and max(len(g) for g in expected) >= 6
    index = {x: k for k, x in enumerate(ids)}
    chains = [g for g in expected if not all(
        float(vectors[index[a]] @ vectors[index[b]]) >= threshold for a in g for b in g)]
    assert chains
    for block, batch in ((64, 350), (100, 701), (256, 300), (1024, 1000)):
        scan = BlockedScan(store, threshold, block=block, read_batch=batch)
        sets = scan.run()
        assert scan.scanned == ROWS
        _check([[(x, sets.best[x]) for x in g] for g in sets.groups()], expected)
    _check(find_duplicate_groups(store, threshold), expected)  # the service's defaults
    # A filter: only rows with k != "2" are compared.
    keep = [k % 3 != 2 for k in range(ROWS)]
    kept_ids = [x for x, k in zip(ids, keep, strict=True) if k]
    filtered = _brute_force(kept_ids, vectors[np.array(keep)], threshold)
    assert filtered != expected and filtered
    scan = BlockedScan(store, threshold, 'metadata["k"] != "2"', block=96, read_batch=250)
    sets = scan.run()
    assert scan.scanned == len(kept_ids)
    _check([[(x, sets.best[x]) for x in g] for g in sets.groups()], filtered)


def _spill_files(directory: Path) -> dict[str, int]:
    """This process's open files in `directory` (unnamed ones included): fd -> size."""
    open_files = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)):
                open_files[fd] = os.stat(f"/proc/self/fd/{fd}").st_size
        except OSError:
            continue  # closed meanwhile (the listing's own fd)
    return open_files


def test_the_spill_file_is_freed_after_a_scan_and_a_stopped_scan(tmp_path: Path) -> None:
    ids, vectors = _clustered()
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    with VectorStore(str(tmp_path / "m.db"), collection="d", dimension=DIM, model="m",
                     model_fingerprint="sha256:m") as store:
        _fill(store, ids, vectors)
        sizes: list[int] = []

        def watch() -> bool:
            sizes.extend(_spill_files(spill_dir).values())
            return False

        scan = BlockedScan(store, 0.97, block=128, spill_dir=str(spill_dir), stop=watch)
        scan.run()
        assert max(sizes) == ROWS * DIM * 4  # every vector went to one file in spill_dir
        assert _spill_files(spill_dir) == {} and list(spill_dir.iterdir()) == []
        # Stopped in the middle of the block pairs: ScanStopped, and the file is freed.
        calls = iter(range(10**6))
        stopping = BlockedScan(store, 0.97, block=64, read_batch=100,
                               spill_dir=str(spill_dir), stop=lambda: next(calls) >= 20)
        with pytest.raises(ScanStopped, match="cancelled or its deadline"):
            stopping.run()
        assert stopping.block_pairs == 20 - 7  # 7 read batches, then 13 block pairs
        assert _spill_files(spill_dir) == {} and list(spill_dir.iterdir()) == []


def test_block_rows_fit_the_budget() -> None:
    for dimension in (32, 512, 768, 1024):
        rows = block_rows(dimension)
        assert rows % 64 == 0
        assert 8 * rows * dimension + 5 * rows**2 <= 32 << 20
        assert 8 * (rows + 64) * dimension + 5 * (rows + 64) ** 2 > 32 << 20


# ---- the service passes a stop that turns True when the call ends ----------------------------


class _Context:
    """A grpc.aio servicer context, as much as FindDuplicates uses."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.callbacks: list[Any] = []
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    def add_done_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


def _servicer(monkeypatch: pytest.MonkeyPatch, stopped_at: list[float]) -> Any:
    """A SearchServicer whose scan runs until its stop() turns True (at most 10 s)."""
    from search_service.config import SearchConfig
    from search_service.server import SearchServicer

    def scan(store: Any, threshold: float, expression: str, *, stop: Any,
             spill_dir: Any) -> list[list[tuple[str, float]]]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if stop():
                stopped_at.append(time.monotonic())
                raise ScanStopped("FindDuplicates stopped: the call was cancelled or its "
                                  "deadline passed")
            time.sleep(0.01)
        return []

    monkeypatch.setattr(queries, "find_duplicate_groups", scan)
    encoder = type("E", (), {"encode_texts": None})()
    servicer = SearchServicer(SearchConfig(), encoder)
    servicer.store = object()  # type: ignore[assignment]
    return servicer


def test_a_passed_deadline_stops_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    stopped_at: list[float] = []
    servicer = _servicer(monkeypatch, stopped_at)
    context = _Context(remaining=0.3)

    async def call() -> None:
        async for _ in servicer.FindDuplicates(search_pb2.FindDuplicatesRequest(), context):
            pass

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(call())
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.3 <= stopped_at[0] - started < 1.0
    servicer._db.shutdown(wait=True)


def test_a_cancelled_call_stops_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    stopped_at: list[float] = []
    servicer = _servicer(monkeypatch, stopped_at)

    async def call(end: str) -> float:
        context = _Context(remaining=None)

        async def consume() -> None:
            async for _ in servicer.FindDuplicates(search_pb2.FindDuplicatesRequest(),
                                                   context):
                pass
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        assert not stopped_at  # no deadline: still scanning
        ended = time.monotonic()
        if end == "task":
            task.cancel()  # what grpc.aio does to the handler of a cancelled call
            with pytest.raises(asyncio.CancelledError):
                await task
        else:  # grpc.aio also runs the done callbacks when a call ends
            [callback] = context.callbacks
            callback(context)
            with pytest.raises(RuntimeError, match="aborted"):
                await task
        return ended

    for end in ("task", "callback"):
        stopped_at.clear()
        ended = asyncio.run(call(end))
        deadline = time.monotonic() + 2
        while not stopped_at and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stopped_at and stopped_at[0] - ended < 0.5, end
    servicer._db.shutdown(wait=True)
