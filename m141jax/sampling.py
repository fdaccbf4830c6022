"""The flow-matching sampler of the release (release.md C): schedule, Euler step, CFG, the compiled loop.

- `schedule(steps, shift, reverse)`: σ'_i of C.1 (SD3 time shift of linspace(1, 0, N+1)), float32.
  The model sees timesteps t_i = 1000·σ'_i; the Euler step is x ← x + v·(σ'_{i+1} − σ'_i).
- `sample(...)`: the whole denoising loop as one jit-compiled program (`lax.fori_loop` over the
  steps), batched over prompts. Classifier-free guidance (`uncond + g·(cond − uncond)`, only when
  g > 1 as in the release) runs both branches as ONE forward of batch 2B; the unconditional branch
  keeps the same reference latent and whatever image tokens its text states carry (the release keeps
  the VLM tokens). Models with a guidance embedding (the T2V / text-to-image DiT) instead get the
  embedded guidance scale × 1000 as an input. The state is float32 throughout.

The compiled loop depends only on shapes, the DiT config and whether CFG is on: the σ values, the
guidance scales and every array may change between calls without recompiling.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m141jax import parallel
from m141jax.config import DiTConfig
from m141jax.models.dit import dit_forward

NUM_TRAIN_TIMESTEPS = 1000


class Text(NamedTuple):
    """The DiT's text inputs for a batch: states [B, L, D], mask [B, L] (valid prefix), pooled [B, D2]."""

    states: jax.Array
    mask: jax.Array
    pooled: jax.Array


def schedule(steps: int, shift: float = 5.0, reverse: bool = True) -> np.ndarray:
    """The N+1 sigmas σ'_i of release.md C.1 in float32 (as the release computes them in torch float32).

    σ_i = linspace(1, 0, N+1), σ'_i = s·σ_i / (1 + (s−1)·σ_i); reverse=False maps σ' to 1 − σ'.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    s = np.float32(shift)
    sigmas = np.linspace(1, 0, steps + 1, dtype=np.float32)
    sigmas = (s * sigmas) / (np.float32(1) + (s - np.float32(1)) * sigmas)
    return sigmas if reverse else np.float32(1) - sigmas


def timesteps(sigmas) -> np.ndarray:
    """The model's timestep inputs 1000·σ'_i for the N steps (the last sigma is the end point)."""
    return (np.asarray(sigmas, np.float32)[:-1] * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float32)


def euler_step(x, velocity, sigma, sigma_next):
    """One Euler step of dx/dσ = v from σ to σ_next (dt < 0 while denoising), in float32."""
    return x + velocity.astype(jnp.float32) * (sigma_next - sigma)


def guide(v_uncond, v_cond, scale):
    """Classifier-free guidance as the release combines it: uncond + g·(cond − uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def uses_cfg(guidance_scale: float) -> bool:
    """The release runs the unconditional branch only when the guidance scale is above 1."""
    return guidance_scale > 1.0


@functools.partial(jax.jit, static_argnames=("cfg",))
def denoise(params, cfg: DiTConfig, noise, sigmas, ref_latents, text: Text, neg_text: Text | None,
             guidance_scale, embedded_guidance):
    """The jit-compiled loop on prepared float32 arrays (`sample` checks and prepares them; this is the
    entry for AOT lowering): noise [B, F, H, W, C] at σ'_0 -> latents at σ'_N, all steps inside.
    guidance_scale: a scalar used when neg_text is given; embedded_guidance: [B] (scale × 1000) or None."""
    b = noise.shape[0]
    cfg_on = neg_text is not None
    if cfg_on:  # one forward of batch 2B: rows [0, B) unconditional, [B, 2B) conditional (release order)
        text = Text(*(jnp.concatenate([u, c]) for u, c in zip(neg_text, text)))
        if ref_latents is not None:
            ref_latents = jnp.concatenate([ref_latents, ref_latents])
        if embedded_guidance is not None:
            embedded_guidance = jnp.concatenate([embedded_guidance, embedded_guidance])
    rows = 2 * b if cfg_on else b

    def velocity(x, t):
        xs = jnp.concatenate([x, x]) if cfg_on else x
        v = dit_forward(params, cfg, xs, ref_latents, jnp.full((rows,), t, jnp.float32), text.states, text.mask,
                        text.pooled, embedded_guidance)
        return guide(v[:b], v[b:], guidance_scale) if cfg_on else v

    def step(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        return euler_step(x, velocity(x, sigma * NUM_TRAIN_TIMESTEPS), sigma, sigma_next)

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, noise.astype(jnp.float32))


def _as_text(text, name: str) -> Text:
    if len(text) != 3:
        raise ValueError(f"{name} must be (text_states, text_mask, text_states_2), got {len(text)} arrays")
    states, mask, pooled = text
    return Text(jnp.asarray(states, jnp.float32), jnp.asarray(mask, jnp.int32), jnp.asarray(pooled, jnp.float32))


def sample(params, cfg: DiTConfig, noise, text, *, sigmas, ref_latents=None, neg_text=None,
           guidance_scale: float = 1.0, embedded_guidance: float | None = None, mesh=None) -> jax.Array:
    """Denoise `noise` [B, F, H, W, C] (channels-last) along `sigmas` (from `schedule`); float32 latents.

    text / neg_text: (text_states [B, L, D], text_mask [B, L], text_states_2 [B, D2]); neg_text is the
    unconditional branch, needed when guidance_scale > 1 (the release's CFG) and ignored otherwise.
    ref_latents [B, 1, H, W, C]: the scaled reference latent of the image-to-video model.
    embedded_guidance: the scale fed (× 1000) to models with a guidance embedding (required there).
    mesh: the device mesh `params` are placed on (`parallel.dit_on_mesh`); the inputs are split over
    its batch axes, the loop runs under its rules, and the latents come back whole on one device.
    """
    text = _as_text(text, "text")
    b = noise.shape[0]
    if text.states.shape[0] != b:
        raise ValueError(f"text states have batch {text.states.shape[0]}, noise has batch {b}")
    if uses_cfg(guidance_scale):
        if neg_text is None:
            raise ValueError(f"guidance scale {guidance_scale} > 1 needs the unconditional (negative) text inputs")
        neg_text = _as_text(neg_text, "neg_text")
        if any(n.shape != t.shape for n, t in zip(neg_text, text)):
            raise ValueError(f"negative text shapes {[n.shape for n in neg_text]} differ from the text shapes "
                             f"{[t.shape for t in text]}")
    else:
        neg_text = None
    if cfg.guidance_embed != (embedded_guidance is not None):
        raise ValueError("this DiT has a guidance embedding: pass embedded_guidance" if cfg.guidance_embed else
                         f"this DiT has no guidance embedding: embedded_guidance {embedded_guidance} cannot apply")
    g = None if embedded_guidance is None else jnp.full((b,), embedded_guidance * 1000.0, jnp.float32)
    ref = None if ref_latents is None else jnp.asarray(ref_latents, jnp.float32)
    args = (jnp.asarray(noise, jnp.float32), jnp.asarray(sigmas, jnp.float32), ref, text, neg_text,
            jnp.float32(guidance_scale), g)
    if mesh is None:
        return denoise(params, cfg, *args)
    rows = lambda x: parallel.put(x, parallel.batch_sharding(mesh, x.ndim, b))  # noqa: E731
    whole = NamedSharding(mesh, P())
    noise, sigmas, ref, text, neg_text, scale, g = args
    args = (rows(noise), parallel.put(sigmas, whole), jax.tree.map(rows, ref), jax.tree.map(rows, text),
            jax.tree.map(rows, neg_text), parallel.put(scale, whole), jax.tree.map(rows, g))
    with parallel.activate(mesh, 2 * b if neg_text is not None else b):
        latents = denoise(params, cfg, *args)
    return jnp.asarray(parallel.gather(latents))
