"""Distances between sample sets, for judging a generator against held-out data (distillation evidence)."""

from __future__ import annotations

import numpy as np


def sliced_wasserstein(a, b, rng: np.random.Generator, n_dirs: int = 512) -> float:
    """Mean over n_dirs random unit directions of the 1-D Wasserstein-1 distance between two equal-size
    sample sets a, b [N, ...] (each sample flattened)."""
    a, b = np.asarray(a).reshape(len(a), -1), np.asarray(b).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"sample sets must have equal shapes, got {a.shape} and {b.shape}")
    d = rng.standard_normal((a.shape[1], n_dirs))
    d /= np.linalg.norm(d, axis=0, keepdims=True)
    return float(np.mean(np.abs(np.sort(a @ d, 0) - np.sort(b @ d, 0))))
