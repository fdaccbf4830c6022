"""A tiny DiT and fixed inputs shared by the quantization and sparsity tests."""

import functools

import jax
import jax.numpy as jnp

from m141jax import sampling
from m141jax.config import preset
from m141jax.models import dit
from m141jax.models.conditioning import Conditioning

CFG = preset("tiny-i2v", param_dtype="fp32", dtype="fp32")


@functools.lru_cache(maxsize=None)
def tiny_params():
    return dit.init_params(CFG, jax.random.PRNGKey(0))


def inputs(batch: int = 1):
    """(latents, timestep, cond, ref_latents): `dit_forward`'s inputs for the tiny I2V DiT."""
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    latents = jax.random.normal(k[0], (batch, 2, 8, 8, CFG.out_channels))
    mask = jnp.ones((batch, 5), jnp.int32).at[:, 4:].set(0)
    cond = Conditioning(jax.random.normal(k[1], (batch, 5, CFG.text_dim)), mask,
                        jax.random.normal(k[2], (batch, CFG.pooled_dim)))
    return latents, jnp.full((batch,), 700.0), cond, latents[:, :1]


def rel_l2(a, b) -> float:
    """‖a − b‖ / ‖b‖."""
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def sample(params):
    """The 4-step sampling run (release schedule) of the tiny DiT from fixed noise, text and reference."""
    latents, _, cond, ref = inputs(batch=2)
    return sampling.sample(params, CFG, latents, cond, sigmas=sampling.schedule(4), ref_latents=ref)
