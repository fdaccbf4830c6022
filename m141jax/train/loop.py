"""The run loop shared by `train` and `distill`: steps, metrics, checkpoints, the non-finite stop.

Step i (0-based) draws its randomness from fold_in(PRNGKey(seed), i) and its batch from the grain
iterator, so an interrupted run resumed from its latest checkpoint continues bit-identically. Metrics go
to a progress bar, to the console every `log_every` steps (window means plus samples/s, step time, model TFLOP/s per device
and MFU when the step's FLOPs and the chip's peak are known, memory in use per device where the backend
reports it), to a CSV file in long form (step, metric, value) and to TensorBoard event files
(`observe.EventWriter`); steps [run.profile_start, run.profile_start + run.profile_steps) are traced by
`jax.profiler` (`observe.ProfileWindow`). A non-finite metric stops the run with its step number before
anything of that step is saved, so the last checkpoint on disk is the last good one.
"""

from __future__ import annotations

import csv
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from m141jax.train import observe
from m141jax.train.checkpointing import RunCheckpoints
from m141jax.train.config import RunConfig


class NonFiniteLoss(ValueError):
    """A loss (or other metric) became NaN/Inf; the message names the step and the last good checkpoint."""


class MetricsLog:
    """Append-only CSV of (step, metric, value); rows after `resume_step` (a previous, unfinished run's
    tail) are dropped when resuming, and so is a row a kill cut short."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if len(r) == 3 and int(r[0]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "metric", "value"])
            w.writerows(rows)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows([step, k, repr(float(v))] for k, v in sorted(metrics.items()))


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def run_loop(step_fn: Callable, state, data_iter, to_device: Callable, run: RunConfig, ckpt: RunCheckpoints,
             log: MetricsLog | None, start: int, batch_size: int, desc: str = "train", console: bool = True, *,
             flops: Callable | None = None, events: observe.EventWriter | None = None,
             profile: observe.ProfileWindow | None = None):
    """Run steps start..run.steps−1 of step_fn(state, batch, rng, step) -> (state, metrics); returns the
    final state after saving it. Raises NonFiniteLoss on a NaN/Inf metric.

    flops(state, batch, rng, step): the model FLOPs of that step (all devices together), or None; called
    before the step (whose state may be donated). log / events: where each window's metrics go (None: not
    on this process).
    profile: the profiler window."""
    base = jax.random.PRNGKey(run.seed)
    window: dict[str, list[float]] = defaultdict(list)
    window_flops: float | None = 0.0
    peak, n_devices = observe.peak_flops(), jax.device_count()
    t0, n0 = time.perf_counter(), start
    bar = tqdm(range(start, run.steps), initial=start, total=run.steps, desc=desc, disable=not console,
               dynamic_ncols=True)
    try:
        for step in bar:
            batch, rng = to_device(next(data_iter)), jax.random.fold_in(base, step)
            f = flops(state, batch, rng, step) if flops is not None else None
            window_flops = None if f is None or window_flops is None else window_flops + f
            if profile is not None:
                profile.before(step)
            state, metrics = step_fn(state, batch, rng, step)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if profile is not None:
                profile.after(step, state)
            bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
            if bad:
                ckpt.wait()
                raise NonFiniteLoss(f"non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)} at step {step}; "
                                    f"stopped, the last good checkpoint is step {ckpt.latest_step()}")
            for k, v in metrics.items():
                window[k].append(v)
            done = step + 1
            if done % run.log_every == 0 or done == run.steps:
                dt = time.perf_counter() - t0
                means = {k: float(np.mean(v)) for k, v in window.items()}
                means["samples_per_s"] = (done - n0) * batch_size / dt
                means["steps_per_s"] = (done - n0) / dt
                means["step_time_s"] = dt / (done - n0)
                if window_flops:
                    means.update(observe.window_rates(window_flops, dt, n_devices, peak))
                means.update(observe.memory_in_use())
                if log is not None:
                    log.write(done, means)
                if events is not None:
                    events.scalars(done, means)
                bar.set_postfix_str(_format({k: means[k] for k in sorted(means)[:4]}))
                if console:
                    tqdm.write(f"{desc} step {done}: {_format(means)}")
                window.clear()
                window_flops = 0.0
                t0, n0 = time.perf_counter(), done
            ckpt.save(done, state, data_iter)
    finally:
        if profile is not None:
            profile.close()
    ckpt.wait()
    if ckpt.latest_step() != run.steps:
        ckpt.save(run.steps, state, data_iter, force=True)
    ckpt.wait()
    return state
