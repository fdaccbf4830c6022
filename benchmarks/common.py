"""What the benchmark scripts share: `RESULT` lines and wall-clock timing of jitted calls."""

from __future__ import annotations

import os
import time

import jax


def fix_threads(n: int | None = None) -> int:
    """Pin this process to `n` CPU cores (default: every core it may use) and give PyTorch `n` threads, so
    JAX's CPU client (which sizes its thread pool by the schedulable cores) and PyTorch use the same
    count. Call before JAX's first computation; returns n (print it in the RESULT lines)."""
    cores = sorted(os.sched_getaffinity(0))
    n = min(n or len(cores), len(cores))
    os.sched_setaffinity(0, cores[:n])
    try:
        import torch
    except ImportError:
        return n
    torch.set_num_threads(n)
    return n


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
