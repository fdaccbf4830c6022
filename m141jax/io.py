"""Small atomic file writers shared by the command-line tools."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays to an .npz file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_npz(path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Arrays of an .npz file; a one-line error names any required array that is absent."""
    with np.load(path) as z:
        missing = [k for k in required if k not in z]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; it holds {sorted(z.files)}")
        return {k: z[k] for k in (*required, *optional) if k in z}
