"""Small shared test helpers."""

import numpy as np


def rel_err(a, b) -> float:
    """max |a − b| relative to the reference's scale (max |b|)."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
