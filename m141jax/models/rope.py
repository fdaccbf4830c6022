"""3D rotary position embedding of the image tokens (release.md B.5): interleaved pairs, axes (t, h, w)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_tables(grid: tuple[int, int, int], axes: tuple[int, ...], theta: float):
    """cos, sin tables [T·H·W, sum(axes)] in fp32 for a token grid, flattened t-major.

    Per axis i with d_i channels: ω_k = θ^(−2k/d_i), angle = position·ω_k, each value repeated twice
    (interleaved pairs); the three axes are concatenated in the order (t, h, w).
    """
    coords = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in grid], indexing="ij")
    angles = []
    for pos, d in zip(coords, axes):
        # host constant, rounded as the release's float32 arithmetic rounds it
        power = np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)).astype(np.float64)
        omega = np.float32(1.0) / power.astype(np.float32)
        angles.append(jnp.repeat(pos.reshape(-1)[:, None] * omega[None], 2, axis=-1))
    angle = jnp.concatenate(angles, axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x, cos, sin):
    """Rotate x [B, S, H, D] by tables [S, D]: out[2k] = x[2k]cos − x[2k+1]sin, out[2k+1] = x[2k+1]cos + x[2k]sin.

    Computed in fp32 and cast back to x's dtype.
    """
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
