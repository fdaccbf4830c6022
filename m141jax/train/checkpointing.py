"""Run checkpoints with Orbax's CheckpointManager: the training state (any pytree: TrainState, DMDState)
together with the grain iterator's position, every N steps, keeping the last K, written asynchronously.

Resuming restores both onto the current shardings, so a run continued from step s reads the same
batches and draws the same random numbers (they are folded from the step) as an uninterrupted run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from m141jax import parallel


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class RunCheckpoints:
    """Checkpoints of one run under `directory` (step-numbered subdirectories)."""

    def __init__(self, directory: str | Path, every: int, keep: int, use_async: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint_every {every} and keep_checkpoints {keep} must be ≥ 1")
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, force: bool = False) -> bool:
        """Save when `step` is a multiple of `every` (or force); returns whether a save started."""
        if step % self.every and not force:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter))
        return self.manager.save(step, args=args, force=True)

    def restore(self, state, data_iter, step: int | None = None):
        """The state saved at `step` (default: the latest) placed like `state`; data_iter is rewound in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(state)),
                                  data=grain.checkpoint.CheckpointRestore(data_iter))
        return self.manager.restore(step, args=args).state

    def restore_newest(self, state, data_iter):
        """(state, step) of the newest checkpoint that restores, or None when there is none. A checkpoint
        that fails to restore (a truncated array file, a deleted _METADATA ...) is skipped with a line on
        stderr naming it and the reason, and the next older one is tried; the skipped ones stay on disk."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                return self.restore(state, data_iter, step), step
            except Exception as e:  # Orbax / tensorstore / pytree errors alike: this checkpoint is unusable
                reason = " ".join(str(e).split())[:200] or type(e).__name__
                moved = self._set_aside(step)
                print(f"warning: skipping checkpoint step {step} in {self.manager.directory}: it does not restore "
                      f"({type(e).__name__}: {reason}); moved to {moved}", file=sys.stderr)
        if steps:
            raise ValueError(f"no checkpoint in {self.manager.directory} restores (tried steps "
                             f"{', '.join(map(str, steps))}); move the folder away to start the run afresh")
        return None

    def _set_aside(self, step: int) -> Path:
        """Move a damaged step's folder to `damaged-checkpoints/` beside the checkpoints, so the run can
        save that step again; returns where it went."""
        src = Path(self.manager.directory) / str(step)
        dst = Path(self.manager.directory).parent / "damaged-checkpoints" / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
        parallel.sync(f"m141jax set aside checkpoint {step}")
        self.manager.reload()
        return dst

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
