"""Optimizers: AdamW after global-norm clipping, with a warm-up + decay schedule, its state on the device or in
host memory; parameter EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from m141jax.compress import nm
from m141jax.config import DiTConfig, SparsityConfig
from m141jax.models.dit import abstract_params
from m141jax.train.config import OptimizerConfig
from m141jax.train.sparsity import sparse_training


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over warmup_steps, then constant / cosine / linear decay to
    final_lr_ratio·learning_rate at total_steps."""
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    span = max(total_steps - warm, 1)
    if cfg.decay == "cosine":
        main = optax.cosine_decay_schedule(lr, span, alpha=cfg.final_lr_ratio)
    elif cfg.decay == "linear":
        main = optax.linear_schedule(lr, lr * cfg.final_lr_ratio, span)
    else:
        main = optax.constant_schedule(lr)
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(cfg: OptimizerConfig, total_steps: int, sparsity: SparsityConfig | None = None,
                   model: DiTConfig | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, its learning-rate schedule) for a run of total_steps updates. With `sparsity` the
    optimizer keeps the DiT (`model`) N:M sparse (`train.sparsity.sparse_training`: masks in its state).
    With cfg.state_memory 'host' its whole state lives in host memory between updates (`in_host_memory`)."""
    schedule = lr_schedule(cfg, total_steps)
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    if sparsity is not None:
        tx = sparse_training(tx, sparsity, nm.select_dit(abstract_params(model), model, sparsity))
    if cfg.state_memory == "host":
        tx = in_host_memory(tx)
    return tx, schedule


def ema_init(params, decay: float):
    """A separate copy of params when the EMA is on (decay > 0), else None."""
    return jax.tree.map(jnp.copy, params) if decay > 0 else None


def ema_update(ema, params, decay: float):
    """ema ← decay·ema + (1 − decay)·params (None stays None)."""
    if ema is None:
        return None
    return optax.incremental_update(params, ema, 1.0 - decay)


def in_host_memory(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """tx with its state in host memory between updates: each update (inside the jitted step) moves the
    state to the device, updates it and moves the new state back. The state's shardings must carry the
    host memory kind (`train.mesh.strategy`), so it enters and leaves the step there. The TPU compiler
    (libtpu 0.0.42) starts these copies early, so they are live at the step's peak: the state leaves the
    step's device arguments, the peak does not drop (README, "Training on a TPU pod"). Updating on the host instead
    (`compute_on('device_host')`) did not compile for the DiT step there (an XLA internal error)."""
    def update(updates, state, params=None):
        updates, state = tx.update(updates, jax.device_put(state, jax.memory.Space.Device), params)
        return updates, jax.device_put(state, jax.memory.Space.Host)

    return optax.GradientTransformation(tx.init, update)
