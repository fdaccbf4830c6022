"""The tiny DiT and inputs the sharding tests (single- and multi-process) share."""

import jax
import numpy as np

from m141jax.config import preset
from m141jax.models.conditioning import Conditioning

# 8 heads so Ulysses can split them over 8 devices; 8 image + 7 text tokens, a count no axis divides
CFG = preset("tiny-i2v", hidden_size=64, num_heads=8, rope_axes=(2, 2, 4), param_dtype="fp32", dtype="fp32",
             attention="xla")


def inputs(batch: int = 2):
    """latents, timestep, cond (text mask: 5 and 3 valid tokens), ref_latents, guidance: dit_forward's inputs."""
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    mask = np.array([[1] * 5 + [0] * 2, [1] * 3 + [0] * 4][:batch], np.int32)
    return (np.asarray(jax.random.normal(k[0], (batch, 2, 4, 4, 16))),
            np.array([900.0, 300.0][:batch], np.float32),
            Conditioning(np.asarray(jax.random.normal(k[2], (batch, 7, 32))), mask,
                         np.asarray(jax.random.normal(k[3], (batch, 16)))),
            np.asarray(jax.random.normal(k[1], (batch, 1, 4, 4, 16))), None)
