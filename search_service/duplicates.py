"""Near-duplicate groups over a whole collection (or a filtered part), exact, with the
vectors on disk rather than in memory, on Milvus Lite and on a Milvus server alike.

A group is a connected component of the graph whose edges join two stored images at
cosine >= threshold (a chain of near-duplicates is one group). The scan:

1. **Spill**: the matching rows (id and vector) are read once with the query iterator,
   in batches of ~4 MiB of vectors. The vectors are appended as float32 to an unnamed
   temporary file (`tempfile.TemporaryFile` in `spill_dir`: on Linux it has no name, so
   nothing is left behind even if the process is killed; it is closed, and its space
   freed, when the scan ends, fails or is stopped). The ids stay in memory as UTF-8 bytes.
2. **Blocked scan**: blocks of B rows; block i against every block j >= i, as float32 dot
   products of the stored unit vectors through numpy's BLAS (`A @ B.T`), with the pairs
   at or above `float32(threshold)`; within a block only its upper triangle, so every pair
   is compared exactly once, as brute force over all rows would (same float32 comparison).
3. **Union-find** over the ids of the pairs found; its components of two or more are the
   groups. Within one block pair, the pairs are first reduced to their components in numpy
   (one union per node, not per pair), so that a large group of copies costs no more than
   the rows it has.

What the scan itself holds in memory, for a collection of N rows:
* ids: their UTF-8 length + 4 bytes per row (68 bytes for the service's sha256 hex ids);
* the block buffers: 8·B·d + 5·B² bytes (~32 MiB; B ~ 2300 at d = 512), plus ~12 MiB
  while a block pair's matching rows are reduced;
* one iterator batch while reading (~4 MiB of vectors, ~8x that as pymilvus's lists);
* ~210 bytes per row that has a near-duplicate (the union-find: id string, parent,
  best score; measured with tracemalloc over 100k ids in pairs).
The vectors are read back with `readinto` into the block buffers, not memory-mapped:
mapped pages count in the process's RSS (measured: reading a mapped 200 MB spill through
raised RSS by 200 MB; reads left it flat). Disk: 4·d bytes per row (2 GiB for 1M 512-d
rows). Time: N²·d multiply-adds at BLAS speed after one read of the rows.
Measured for the whole call (results/search_features.md, 100k rows): 72 s and +161 MB RSS
on a server, 88 s and +319 MB on Milvus Lite, whose `query()` materialises every row of
the collection for each iterator batch (its memory, in this process).

The scan calls `stop()` between batches and block pairs; when it returns True the scan
ends with `ScanStopped` (a TimeoutError: DEADLINE_EXCEEDED) and the spill is freed. The
service passes one that turns True when the call is cancelled or its deadline passes.
"""

from __future__ import annotations

import bisect
import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from search_service.store import _STRONG, VectorStore

log = logging.getLogger("clipsearch.search.duplicates")

__all__ = ["DEFAULT_THRESHOLD", "BlockedScan", "ScanStopped", "Spill", "UnionFind",
           "block_rows", "find_duplicate_groups"]

DEFAULT_THRESHOLD = 0.95
_READ_BYTES = 4 << 20  # of float32 vectors per iterator batch (2048 rows at 512-d)
_MAX_READ_ROWS = 16384  # pymilvus's largest iterator batch
_BLOCK_BYTES = 32 << 20  # the block buffers' budget (see block_rows)
_REDUCE_ROWS = 256  # matching rows of a block pair reduced at a time: bounds the pair arrays


class ScanStopped(TimeoutError):
    """The caller went away or its deadline passed; the scan stopped early."""


def _never() -> bool:
    return False


@dataclass
class UnionFind:
    """Disjoint sets over string ids, with path halving and union by size; also keeps
    each id's best similarity to another id it was joined with."""

    parent: dict[str, str] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)

    def find(self, x: str) -> str:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def note(self, x: str, score: float) -> None:
        """Records that `x` has a near-duplicate at `score` (keeps the best)."""
        if score > self.best.get(x, -2.0):
            self.best[x] = score

    def link(self, a: str, b: str) -> None:
        """Joins the sets of `a` and `b`."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size.get(ra, 1) < self.size.get(rb, 1):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] = self.size.get(ra, 1) + self.size.pop(rb, 1)

    def union(self, a: str, b: str, score: float) -> None:
        """Joins `a` and `b`, a pair at `score`."""
        self.note(a, score)
        self.note(b, score)
        self.link(a, b)

    def groups(self) -> list[list[str]]:
        """The components of two or more ids: largest first, members sorted, ties of
        size ordered by their first id."""
        by_root: dict[str, list[str]] = {}
        for x in self.parent:
            by_root.setdefault(self.find(x), []).append(x)
        found = [sorted(members) for members in by_root.values() if len(members) > 1]
        return sorted(found, key=lambda g: (-len(g), g[0]))


class Spill:
    """Rows read once: ids in memory (UTF-8 per read batch, with uint32 ends), vectors
    as float32 in an unnamed temporary file in `directory` (None: the system's)."""

    def __init__(self, dimension: int, directory: str | None = None) -> None:
        self.dimension = dimension
        self.rows = 0
        # Closed by close() / __exit__ (the scan uses it as a context manager).
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=directory,  # noqa: SIM115
                                                       prefix="clipsearch-duplicates-")
        self._firsts: list[int] = []
        self._blobs: list[bytes] = []
        self._ends: list[np.ndarray] = []

    def append(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Adds rows at the end."""
        if vectors.shape != (len(ids), self.dimension):
            raise ValueError(f"{len(ids)} ids with vectors of shape {vectors.shape}")
        encoded = [i.encode("utf-8") for i in ids]
        self._firsts.append(self.rows)
        self._blobs.append(b"".join(encoded))
        self._ends.append(np.cumsum([len(e) for e in encoded]).astype(np.uint32))
        self._file.seek(self.rows * self.dimension * 4)
        self._file.write(np.ascontiguousarray(vectors, np.float32).tobytes())
        self.rows += len(ids)

    def id(self, row: int) -> str:
        """The id of row `row` (0-based, in reading order)."""
        batch = bisect.bisect_right(self._firsts, row) - 1
        k = row - self._firsts[batch]
        ends = self._ends[batch]
        start = int(ends[k - 1]) if k else 0
        return self._blobs[batch][start:int(ends[k])].decode("utf-8")

    def read(self, first: int, out: np.ndarray) -> np.ndarray:
        """Rows first, first+1... into `out` (as many as fit); returns the filled part."""
        count = min(len(out), self.rows - first)
        self._file.seek(first * self.dimension * 4)
        view = out.data.cast("B")[:count * self.dimension * 4]
        got = self._file.readinto(view)  # type: ignore[attr-defined]
        if got != len(view):
            raise OSError(f"duplicate scan: short read of the spill file ({got} bytes)")
        return out[:count]

    def close(self) -> None:
        """Frees the file (and its disk space)."""
        self._file.close()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def block_rows(dimension: int, budget: int = _BLOCK_BYTES) -> int:
    """Rows per block so that two blocks of vectors (8·B·d bytes), their float32 scores
    (4·B²) and the triangle mask of a diagonal block (B²) fit in `budget` bytes; a
    multiple of 64, at least 64."""
    rows = (-8 * dimension + math.sqrt((8 * dimension) ** 2 + 20 * budget)) / 10
    return max(64, int(rows) // 64 * 64)


def _batches(store: VectorStore, expression: str, size: int
             ) -> Iterator[tuple[list[str], np.ndarray]]:
    """The ids and float32 vectors of the rows matching `expression`, `size` at a time."""
    with store._calls("query iterator", expression):
        iterator = store._client.query_iterator(
            store.collection, batch_size=size, filter=expression,
            output_fields=["id", "vector"], consistency_level=_STRONG, timeout=store._timeout)
    try:
        while True:
            with store._calls("query iterator", expression):
                rows = iterator.next()
            if not rows:
                return
            batch = ([str(r["id"]) for r in rows],
                     np.asarray([r["vector"] for r in rows], np.float32))
            # pymilvus decodes vectors as lists of floats, ~8x their float32 size: let them
            # go before the next batch is fetched, or two batches are alive at once.
            del rows
            yield batch
    finally:
        iterator.close()


def _components(u: np.ndarray, v: np.ndarray, nodes: int) -> np.ndarray:
    """Component labels (the smallest node of each component) of the graph with edges
    u[k]-v[k] over nodes 0..nodes-1: min-label propagation with pointer jumping."""
    labels = np.arange(nodes)
    while True:
        low = np.minimum(labels[u], labels[v])
        new = labels.copy()
        np.minimum.at(new, u, low)
        np.minimum.at(new, v, low)
        new = new[new]
        if np.array_equal(new, labels):
            return labels
        labels = new


@dataclass
class BlockedScan:
    """One FindDuplicates scan (blocking; call from a worker thread). `block` (rows per
    block) and `read_batch` (rows per iterator batch) default to the memory budgets."""

    store: VectorStore
    threshold: float
    expression: str = ""
    block: int = 0
    read_batch: int = 0
    spill_dir: str | None = None
    stop: Callable[[], bool] = _never
    scanned: int = 0
    block_pairs: int = 0
    pairs: int = 0

    def run(self) -> UnionFind:
        """Reads and scans the rows; returns the union-find of the near-duplicate pairs."""
        dimension = self.store.dimension
        batch = self.read_batch or min(_MAX_READ_ROWS, max(1, _READ_BYTES // (4 * dimension)))
        with Spill(dimension, self.spill_dir) as spill:
            for ids, vectors in _batches(self.store, self.expression, batch):
                self._check_stop()
                spill.append(ids, vectors)
            self.scanned = spill.rows
            return self._scan(spill)

    def _check_stop(self) -> None:
        if self.stop():
            raise ScanStopped("FindDuplicates stopped: the call was cancelled or its "
                              "deadline passed")

    def _scan(self, spill: Spill) -> UnionFind:
        sets = UnionFind()
        block = self.block or block_rows(spill.dimension)
        limit = np.float32(self.threshold)
        a_buffer = np.empty((block, spill.dimension), np.float32)
        b_buffer = np.empty_like(a_buffer)
        scores = np.empty((block, block), np.float32)
        below_diagonal = np.tri(block, dtype=bool)  # row >= column: self and pairs seen
        for i in range(0, spill.rows, block):
            a = spill.read(i, a_buffer)
            for j in range(i, spill.rows, block):
                self._check_stop()
                b = a if j == i else spill.read(j, b_buffer)
                s = scores[:len(a), :len(b)]
                np.matmul(a, b.T, out=s)
                if j == i:
                    np.copyto(s, -np.inf, where=below_diagonal[:len(a), :len(b)])
                self.block_pairs += 1
                matching = np.flatnonzero(s.max(axis=1) >= limit)
                for k in range(0, len(matching), _REDUCE_ROWS):
                    rows = matching[k:k + _REDUCE_ROWS]
                    self._join(sets, spill, s[rows] >= limit, s, rows, i, j)
        return sets

    def _join(self, sets: UnionFind, spill: Spill, hits: np.ndarray, s: np.ndarray,
              rows: np.ndarray, i: int, j: int) -> None:
        """Adds the pairs of `hits` (rows x columns of one block pair) to `sets`: each
        node once, linked to its component's smallest node, with its best score."""
        r, c = np.nonzero(hits)
        local_rows = rows[r]
        score = s[local_rows, c]
        self.pairs += len(score)
        nodes, inverse = np.unique(np.concatenate([i + local_rows, j + c]),
                                   return_inverse=True)
        u, v = inverse[:len(r)], inverse[len(r):]
        best = np.full(len(nodes), -np.inf, np.float32)
        np.maximum.at(best, u, score)
        np.maximum.at(best, v, score)
        labels = _components(u, v, len(nodes))
        ids = [spill.id(int(n)) for n in nodes]
        for k, x in enumerate(ids):
            sets.note(x, float(best[k]))
            if labels[k] != k:
                sets.link(x, ids[labels[k]])


def find_duplicate_groups(store: VectorStore, threshold: float, expression: str = "", *,
                          stop: Callable[[], bool] = _never, spill_dir: str | None = None
                          ) -> list[list[tuple[str, float]]]:
    """The near-duplicate groups at `threshold`: (id, best cosine to another member)."""
    scan = BlockedScan(store, threshold, expression, spill_dir=spill_dir, stop=stop)
    sets = scan.run()
    log.info("duplicate scan: %d rows, %d block pairs, %d pairs at >= %.4f", scan.scanned,
             scan.block_pairs, scan.pairs, threshold)
    return [[(x, sets.best[x]) for x in group] for group in sets.groups()]
