"""N:M-sparse training: the gradual schedule and sparsity-preserving optimizer updates.

The paper names "parameter sparsification" as its memory optimisation; the release ships only weight
quantization (release.md G). The N:M masks and the compact format are `m141jax.compress.nm`; this module
keeps a model N:M sparse while it trains:

- `kept_per_group(cfg, step)`: the gradual schedule (`config.SparsityConfig`): dense, then a cubic ramp
  of the sparsity 1 − n_t/m from 0 to 1 − n/m between begin_step and end_step.
- `sparse_training(optimizer, cfg, chosen)`: wraps any optax optimizer (AdamW, a chain, ...). Gradients
  of pruned weights are zeroed before the optimizer sees them, and the update of a pruned weight is
  −weight, so after `optax.apply_updates` it is exactly 0 whatever the optimizer did (weight decay,
  clipping ...). The masks live in the optimizer state, so they are saved with it in Orbax checkpoints.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from m141jax.compress.layout import Layout
from m141jax.compress.nm import check, nm_masks
from m141jax.config import SparsityConfig


def kept_per_group(cfg: SparsityConfig, step):
    """n_t, the weights kept per group of m at `step` (an int or a traced integer)."""
    if cfg.end_step == cfg.begin_step:
        return jnp.where(step >= cfg.begin_step, cfg.n, cfg.m)
    frac = jnp.clip((step - cfg.begin_step) / (cfg.end_step - cfg.begin_step), 0.0, 1.0)
    sparsity = (1.0 - cfg.n / cfg.m) * (1.0 - (1.0 - frac) ** 3)
    return jnp.clip(jnp.round(cfg.m * (1.0 - sparsity)), cfg.n, cfg.m).astype(jnp.int32)


def is_mask_step(cfg: SparsityConfig, step):
    """Whether the masks are recomputed before the update of `step`."""
    in_ramp = (step >= cfg.begin_step) & (step <= cfg.end_step)
    return in_ramp & (((step - cfg.begin_step) % cfg.frequency == 0) | (step == cfg.end_step))


class SparseState(NamedTuple):
    """Optimizer state of `sparse_training`: the update count, the masks, the wrapped optimizer's state."""

    count: jax.Array
    masks: Any
    inner: optax.OptState


def sparse_training(optimizer: optax.GradientTransformation, cfg: SparsityConfig,
                    chosen: dict[str, Layout]) -> optax.GradientTransformation:
    """`optimizer` keeping the chosen kernels N:M sparse on the schedule of `cfg`.

    Masks are recomputed from the current weights' magnitudes at the schedule's steps (at init for
    step 0). Gradients outside the masks are zeroed before `optimizer`; updates outside the masks are
    −params, so the pruned weights are exactly zero after every step. `update` needs params.
    """
    check(chosen, cfg.m)

    def masks_at(params, step):
        return nm_masks(params, chosen, kept_per_group(cfg, step), cfg.m)

    def init(params):
        return SparseState(jnp.zeros((), jnp.int32), masks_at(params, 0), optimizer.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("sparse_training needs the parameters: call update(grads, state, params)")
        masks = jax.lax.cond(is_mask_step(cfg, state.count), lambda: masks_at(params, state.count),
                             lambda: state.masks)
        grads = jax.tree_util.tree_map(lambda g, keep: jnp.where(keep, g, jnp.zeros((), g.dtype)), grads, masks)
        updates, inner = optimizer.update(grads, state.inner, params)
        updates = jax.tree_util.tree_map(lambda u, p, keep: jnp.where(keep, u, -p.astype(u.dtype)),
                                         updates, params, masks)
        return updates, SparseState(state.count + 1, masks, inner)

    return optax.GradientTransformation(init, update)
