"""A realistic vector set for the ANN benchmark (benchmarks/ann.py): CLIP-like clustered
vectors sampled around real photos' vectors, calibrated on their nearest-neighbour cosines.

Uniform random unit vectors are a poor stand-in for CLIP's: in 512-d they are all nearly
orthogonal (nearest-neighbour cosine ~0.2 at 1M), so every index sees an unstructured ball,
while real image vectors sit in a low-dimensional, clustered region. The model here:

1. `real` = the sample photos' vectors from a real encoder (random-weight ViT-B/32: 512-d,
   the production dimension and the 1M set; the tiny CLIP trained here: 64-d, a second
   check of the sampling model on vectors with learnt structure), unit length.
2. A synthetic vector is `normalise(c + alpha * e)`: `c` one real vector drawn at random (a
   "photo"), `e` Gaussian noise with the real vectors' own covariance (so spread follows
   the directions real photos vary in) plus an isotropic floor of `FLOOR` of its variance
   (so the set is not confined to the ~200-d span of the photos).
3. `alpha` is calibrated by bisection so that a synthetic set of the *same size* as the
   real one (where the comparison is fair: nearest-neighbour cosines rise with set size)
   has the same median nearest-neighbour cosine as the real vectors; `compare` then reports
   the quantiles of both distributions and their Kolmogorov-Smirnov distance.

Held-out queries are fresh draws from the same model (not rows of the collection), which
is what a new photo (or a query vector near the photos) looks like to the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
FLOOR = 0.1  # share of the noise variance spread isotropically over all dimensions
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def photo_vectors(checkpoint: Path, photos: Path = PHOTOS, batch: int = 32) -> np.ndarray:
    """(n, dim) unit vectors of the sample photos through `checkpoint` (fp32, CPU)."""
    from encoder_service.images import PreprocessStages, image_pixels
    from encoder_service.model import load_model

    model = load_model(str(checkpoint), device="cpu", precision="fp32", download=False)
    stages = PreprocessStages.split(model.preprocess)
    paths = sorted(p for p in photos.iterdir() if p.is_file())
    out = []
    for start in range(0, len(paths), batch):
        pixels = [image_pixels(p.read_bytes(), stages, 10**8) for p in paths[start:start + batch]]
        out.append(model.encode_images(stages.batch(pixels)))
    return np.concatenate(out).astype(np.float32)


def nn_cosines(vectors: np.ndarray) -> np.ndarray:
    """Each row's cosine to its nearest other row (rows are unit vectors)."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return np.asarray(sims.max(axis=1))


@dataclass
class ClusteredModel:
    """normalise(center + alpha * noise), noise ~ N(0, cov(real) + isotropic floor)."""

    real: np.ndarray  # (n, dim) unit vectors
    alpha: float = 1.0

    def __post_init__(self) -> None:
        self.real = np.asarray(self.real, dtype=np.float32)
        n, dim = self.real.shape
        # Gaussian with the real covariance: w @ deviations / sqrt(n - 1), w ~ N(0, I_n).
        self._deviations = (self.real - self.real.mean(axis=0)) / np.sqrt(n - 1)
        total = float((self._deviations ** 2).sum())  # trace of the covariance
        self._structured = np.sqrt(1 - FLOOR)
        self._floor_sd = np.sqrt(FLOOR * total / dim)

    def sample(self, count: int, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
        """(count, dim) float32 unit vectors, built in chunks (1M x 512 is 2 GB)."""
        n, dim = self.real.shape
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, chunk):
            size = min(chunk, count - start)
            noise = rng.standard_normal((size, n), dtype=np.float32) @ self._deviations
            noise *= self._structured
            noise += rng.standard_normal((size, dim), dtype=np.float32) * self._floor_sd
            block = self.real[rng.integers(0, n, size)] + self.alpha * noise
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start:start + size] = block
        return out

    def calibrate(self, seed: int = 0, repeats: int = 5) -> float:
        """Sets alpha so that same-size synthetic sets match the real median NN cosine."""
        target = float(np.median(nn_cosines(self.real)))
        n = len(self.real)

        def median_at(alpha: float) -> float:
            self.alpha = alpha
            return float(np.median([np.median(nn_cosines(self.sample(n, np.random.default_rng(
                seed + r)))) for r in range(repeats)]))

        low, high = 0.0, 1.0
        while median_at(high) > target:  # more noise, lower cosines
            high *= 2
        for _ in range(30):
            middle = (low + high) / 2
            low, high = (middle, high) if median_at(middle) > target else (low, middle)
        self.alpha = (low + high) / 2
        return self.alpha

    def compare(self, seed: int = 100) -> dict[str, Any]:
        """NN-cosine quantiles of the real set and of same-size synthetic sets (fresh seed)."""
        n = len(self.real)
        real = nn_cosines(self.real)
        synthetic = np.concatenate([nn_cosines(self.sample(n, np.random.default_rng(seed + r)))
                                    for r in range(5)])
        grid = np.sort(np.concatenate([real, synthetic]))
        ks = float(np.max(np.abs(np.searchsorted(np.sort(real), grid, side="right") / len(real)
                                 - np.searchsorted(np.sort(synthetic), grid, side="right")
                                 / len(synthetic))))
        return {"size": n, "dimension": int(self.real.shape[1]), "alpha": self.alpha,
                "quantiles": list(QUANTILES),
                "real_nn_cosine": [float(np.quantile(real, q)) for q in QUANTILES],
                "synthetic_nn_cosine": [float(np.quantile(synthetic, q)) for q in QUANTILES],
                "ks_distance": ks,
                "mean_pair_cosine_real": _mean_pair(self.real),
                "mean_pair_cosine_synthetic": _mean_pair(self.sample(n, np.random.default_rng(
                    seed)))}


def _mean_pair(vectors: np.ndarray) -> float:
    sims = vectors @ vectors.T
    n = len(vectors)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int,
                mask: np.ndarray | None = None, chunk: int = 200_000) -> np.ndarray:
    """(q, k) row indices of the exact top-k by inner product (cosine for unit rows), best
    first, over the rows where `mask` is true (all when None): the ground truth."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        scores = queries @ vectors[start:start + chunk].T
        if mask is not None:
            scores[:, ~mask[start:start + chunk]] = -np.inf
        take = min(k, scores.shape[1])
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], 1)
        best_ids = np.concatenate([best_ids, part + start], 1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, 1)
        best_ids = np.take_along_axis(best_ids, keep, 1)
    return best_ids


def recall_at_k(found: list[list[int]], truth: np.ndarray) -> float:
    """Mean share of each query's true top-k that was found."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t.tolist())) / k for f, t in zip(found, truth,
                                                                                strict=True)]))
