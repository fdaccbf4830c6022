"""Small stand-ins shared by the training tests: a per-position MLP velocity model with the DiT's
calling convention (velocity(params, x, σ, cond, extra, features=False)), cheap to compile."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m141jax.models.conditioning import Conditioning
from m141jax.train.config import DISTILL_PRESETS, TRAIN_PRESETS, DataConfig, RunConfig


class PixelModel(nn.Module):
    """v = MLP(x, reference, σ, pooled text, masked-mean text) at every latent position; the hidden
    activations are the 'features' (one token per position)."""

    hidden: int = 16

    @nn.compact
    def __call__(self, x, sigma, cond, extra):
        b, f, h, w, c = x.shape
        m = cond.text_mask.astype(jnp.float32)[..., None]
        text = (cond.text_states * m).sum(1) / m.sum(1)
        ctx = jnp.concatenate([sigma[:, None], cond.text_states_2, text], -1)[:, None, None, None]
        parts = [x, jnp.broadcast_to(ctx, (b, f, h, w, ctx.shape[-1]))]
        if "ref_latents" in extra:
            parts.append(jnp.broadcast_to(extra["ref_latents"], x.shape))
        hid = nn.silu(nn.Dense(self.hidden)(jnp.concatenate(parts, -1)))
        return nn.Dense(c)(hid), hid.reshape(b, -1, self.hidden)


def pixel_velocity():
    module = PixelModel()

    def velocity(params, x, sigma, cond, extra, features=False):
        v, feats = module.apply({"params": params}, x, sigma, cond, extra)
        return (v, feats) if features else v
    return velocity


def pixel_params(model_cfg, rng, text_len=8):
    c = model_cfg.out_channels
    cond = Conditioning(jnp.zeros((1, text_len, model_cfg.text_dim)), jnp.ones((1, text_len)),
                        jnp.zeros((1, model_cfg.pooled_dim)))
    extra = {"ref_latents": jnp.zeros((1, 1, 2, 2, c))}
    return PixelModel().init(rng, jnp.zeros((1, 1, 2, 2, c)), jnp.zeros((1,)), cond, extra)["params"]


@functools.cache
def pixel_flow_step(cfg):
    """The jitted flow step of the stand-in model (one compile shared by the tests using cfg)."""
    from m141jax.train.flow import make_train_step
    return jax.jit(make_train_step(cfg, pixel_velocity()))


@functools.cache
def pixel_dmd_step(cfg):
    """The jitted DMD2 step of the stand-in model (update_generator static)."""
    from m141jax.train.dmd import make_dmd_step
    return jax.jit(make_dmd_step(cfg, pixel_velocity()), static_argnums=4)


def tiny_train_config(**run):
    cfg = TRAIN_PRESETS["tiny-i2v"]
    return dataclasses.replace(cfg, data=DataConfig(batch_size=2, num_samples=6),
                               run=dataclasses.replace(RunConfig(steps=6, checkpoint_every=3, log_every=2), **run))


def tiny_distill_config(**run):
    cfg = DISTILL_PRESETS["tiny-i2v"]
    return dataclasses.replace(cfg, data=DataConfig(batch_size=2, num_samples=6),
                               run=dataclasses.replace(RunConfig(steps=6, checkpoint_every=3, log_every=2), **run))


def tree_equal(a, b) -> bool:
    """Bitwise equality of two pytrees of arrays (same structure)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))

