"""What the benchmark scripts share: `RESULT` lines and wall-clock timing of jitted calls."""

from __future__ import annotations

import time

import jax


def result(name: str, **kv) -> None:
    """Print `RESULT name k=v ...` (floats to 4 significant digits), the line the benchmarks report."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"RESULT {name} " + " ".join(f"{k}={fmt(v)}" for k, v in kv.items()), flush=True)


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, including compilation; best of `repeats` later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, min(times)
