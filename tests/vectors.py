"""Vector helpers shared by the parity tests."""

from __future__ import annotations

import numpy as np


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, dim) arrays."""
    return np.asarray(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1)
                      / np.linalg.norm(b, axis=1))
