"""What the benchmark scripts share: `RESULT` lines, wall-clock timing of jitted calls, `--set` config overrides."""

from __future__ import annotations

import dataclasses
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


def override(cfg, assignments: list[str]):
    """A dataclass config with `name=value` assignments (--set of the demo benchmarks; tuple fields:
    comma-separated ints, bools: 1/true/yes)."""
    changes = {}
    for item in assignments:
        name, _, value = item.partition("=")
        if not hasattr(cfg, name) or not value:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME a field of {type(cfg).__name__}")
        kind = type(getattr(cfg, name))
        if kind is bool:
            changes[name] = value.lower() in ("1", "true", "yes")
        else:
            changes[name] = tuple(int(v) for v in value.split(",")) if kind is tuple else kind(value)
    return dataclasses.replace(cfg, **changes)
