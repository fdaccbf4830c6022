"""The one home of flow-matching math (release.md C): schedule and time shift, interpolation, x₀, Euler, CFG,
the loop, and the compiled sampler. Training (train/flow.py, train/dmd.py) uses the same functions.

- Flow matching: x_σ = (1−σ)·x₀ + σ·ε (`interpolate`); the DiT predicts v = ε − x₀ at timestep 1000·σ,
  so x̂₀ = x_σ − σ·v (`predict_x0`).
- `shift_sigma(σ, s)`: the SD3 time shift σ' = s·σ / (1 + (s−1)·σ); `schedule(steps, shift, reverse)`:
  σ'_i of C.1 (the shift of linspace(1, 0, N+1)), float32. The model sees timesteps t_i = 1000·σ'_i; the
  Euler step is x ← x + v·(σ'_{i+1} − σ'_i) (`euler_step`), run over any velocity function by `euler_loop`.
- Classifier-free guidance `uncond + g·(cond − uncond)` (`guide`, only when g > 1 as in the release) runs
  both branches as ONE forward of batch 2B (`cfg_rows`, `guided`): rows [0, B) unconditional, [B, 2B)
  conditional, the release's order.
- `sample(...)`: the whole denoising loop as one jit-compiled program (`lax.fori_loop` over the steps),
  batched over prompts, for a `Conditioning` (models/conditioning.py). The unconditional branch keeps the
  same reference latent and whatever image tokens its text states carry (the release keeps the VLM
  tokens). Models with a guidance embedding (the T2V / text-to-image DiT) instead get the embedded
  guidance scale × 1000 as an input. The state is float32 throughout.

The compiled loop depends only on shapes, the DiT config and whether CFG is on: the σ values, the
guidance scales and every array may change between calls without recompiling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m141jax import parallel
from m141jax.config import DiTConfig
from m141jax.models.conditioning import Conditioning
from m141jax.models.dit import dit_forward

NUM_TRAIN_TIMESTEPS = 1000


# ------------------------------------------------------------------ σ's (release.md C.1, C.3)

def shift_sigma(sigma, shift):
    """The SD3 time shift σ' = s·σ / (1 + (s−1)·σ) of the inference schedule and of training σ's; it keeps
    the dtype of σ when s is a NumPy scalar of that dtype (as `schedule` calls it)."""
    return (shift * sigma) / (1 + (shift - 1) * sigma)


def schedule(steps: int, shift: float = 5.0, reverse: bool = True) -> np.ndarray:
    """The N+1 sigmas σ'_i of release.md C.1 in float32 (as the release computes them in torch float32).

    σ_i = linspace(1, 0, N+1), σ'_i = s·σ_i / (1 + (s−1)·σ_i); reverse=False maps σ' to 1 − σ'.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigmas = shift_sigma(np.linspace(1, 0, steps + 1, dtype=np.float32), np.float32(shift))
    return sigmas if reverse else np.float32(1) - sigmas


def timesteps(sigmas) -> np.ndarray:
    """The model's timestep inputs 1000·σ'_i for the N steps (the last sigma is the end point)."""
    return (np.asarray(sigmas, np.float32)[:-1] * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float32)


# ------------------------------------------------------------------ x_σ and x₀

def _per_sample(sigma, x):
    """σ as a scalar or per-sample [B], broadcast against x [B, ...]."""
    sigma = jnp.asarray(sigma)
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def interpolate(x0, eps, sigma):
    """x_σ = (1−σ)·x₀ + σ·ε, σ a scalar or per sample [B]."""
    s = _per_sample(sigma, x0)
    return (1.0 - s) * x0 + s * eps


def predict_x0(x, velocity, sigma):
    """x̂₀ = x_σ − σ·v (the clean sample a velocity v = ε − x₀ points to), σ a scalar or per sample [B]."""
    return x - _per_sample(sigma, x) * velocity


# ------------------------------------------------------------------ Euler

def euler_step(x, velocity, sigma, sigma_next):
    """One Euler step of dx/dσ = v from σ to σ_next (dt < 0 while denoising), in float32."""
    return x + velocity.astype(jnp.float32) * (sigma_next - sigma)


def euler_loop(velocity: Callable, x, sigmas, steps=None):
    """The release's Euler sampler for any velocity(x, σ_i) -> v (σ_i a scalar): x over `sigmas` (N+1
    values), or over its first `steps` steps (may be traced), as one `lax.fori_loop`; the state reached."""
    def step(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        return euler_step(x, velocity(x, sigma), sigma, sigma_next)

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1 if steps is None else steps, step, x)


# ------------------------------------------------------------------ classifier-free guidance

def guide(v_uncond, v_cond, scale):
    """Classifier-free guidance as the release combines it: uncond + g·(cond − uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def uses_cfg(guidance_scale: float) -> bool:
    """The release runs the unconditional branch only when the guidance scale is above 1."""
    return guidance_scale > 1.0


def cfg_rows(uncond, cond):
    """The inputs of one CFG forward of batch 2B: each array of the pytrees `uncond` and `cond` (the same
    structure; None leaves stay None) as rows [0, B) unconditional ‖ [B, 2B) conditional."""
    return jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)


def guided(velocity: Callable, x, scale, cfg_on: bool = True):
    """The guided velocity of x [B, ...]: `velocity(x ‖ x)` (its other inputs arranged by `cfg_rows`) as one
    forward of batch 2B, combined by `guide`; with cfg_on False, `velocity(x)` alone."""
    if not cfg_on:
        return velocity(x)
    b = x.shape[0]
    v = velocity(jnp.concatenate([x, x]))
    return guide(v[:b], v[b:], scale)


# ------------------------------------------------------------------ the compiled sampler

@functools.partial(jax.jit, static_argnames=("cfg",))
def denoise(params, cfg: DiTConfig, noise, sigmas, ref_latents, text: Conditioning, neg_text: Conditioning | None,
            guidance_scale, embedded_guidance):
    """The jit-compiled loop on prepared float32 arrays (`sample` checks and prepares them; this is the
    entry for AOT lowering): noise [B, F, H, W, C] at σ'_0 -> latents at σ'_N, all steps inside.
    guidance_scale: a scalar used when neg_text is given; embedded_guidance: [B] (scale × 1000) or None."""
    cfg_on = neg_text is not None
    if cfg_on:  # the conditioning of one forward of batch 2B, built once outside the loop
        text, ref_latents, embedded_guidance = cfg_rows((neg_text, ref_latents, embedded_guidance),
                                                        (text, ref_latents, embedded_guidance))

    def velocity(x, sigma):
        t = sigma * NUM_TRAIN_TIMESTEPS
        forward = lambda xs: dit_forward(params, cfg, xs, jnp.full((xs.shape[0],), t, jnp.float32), text,  # noqa: E731
                                         ref_latents, embedded_guidance)
        return guided(forward, x, guidance_scale, cfg_on)

    return euler_loop(velocity, noise.astype(jnp.float32), sigmas)


def _as_text(text, name: str) -> Conditioning:
    if not isinstance(text, Conditioning):
        raise TypeError(f"{name} must be a Conditioning(text_states, text_mask, text_states_2), got "
                        f"{type(text).__name__}")
    return Conditioning(jnp.asarray(text.text_states, jnp.float32), jnp.asarray(text.text_mask, jnp.int32),
                        jnp.asarray(text.text_states_2, jnp.float32))


def sample(params, cfg: DiTConfig, noise, text, *, sigmas, ref_latents=None, neg_text=None,
           guidance_scale: float = 1.0, guidance_min_sigma: float = 0.0, embedded_guidance: float | None = None,
           mesh=None) -> jax.Array:
    """Denoise `noise` [B, F, H, W, C] (channels-last) along `sigmas` (from `schedule`); float32 latents.

    text / neg_text: `Conditioning`s (text_states [B, L, D], text_mask [B, L], text_states_2 [B, D2]); neg_text
    is the unconditional branch, needed when guidance_scale > 1 (the release's CFG) and ignored otherwise.
    guidance_min_sigma: CFG only on the steps that start from σ ≥ it, the rest unguided (a guidance interval;
    at low σ CFG sharpens noise); 0: every step.
    ref_latents [B, 1, H, W, C]: the scaled reference latent of the image-to-video model.
    embedded_guidance: the scale fed (× 1000) to models with a guidance embedding (required there).
    mesh: the device mesh `params` are placed on (`parallel.dit_on_mesh`); the inputs are split over
    its batch axes, the loop runs under its rules, and the latents come back whole on one device.
    """
    guided = int((np.asarray(sigmas)[:-1] >= guidance_min_sigma).sum()) if guidance_min_sigma > 0 else len(sigmas) - 1
    if uses_cfg(guidance_scale) and guided < len(sigmas) - 1:  # the guided steps, then the others without CFG
        common = dict(ref_latents=ref_latents, embedded_guidance=embedded_guidance, mesh=mesh)
        x = noise if not guided else sample(params, cfg, noise, text, sigmas=sigmas[:guided + 1], neg_text=neg_text,
                                            guidance_scale=guidance_scale, **common)
        return sample(params, cfg, x, text, sigmas=sigmas[guided:], **common)
    text = _as_text(text, "text")
    b = noise.shape[0]
    if text.text_states.shape[0] != b:
        raise ValueError(f"text states have batch {text.text_states.shape[0]}, noise has batch {b}")
    if uses_cfg(guidance_scale):
        if neg_text is None:
            raise ValueError(f"guidance scale {guidance_scale} > 1 needs the unconditional (negative) text inputs")
        neg_text = _as_text(neg_text, "neg_text")
        shapes = lambda c: [a.shape for a in jax.tree.leaves(c)]  # noqa: E731
        if shapes(neg_text) != shapes(text):
            raise ValueError(f"negative text shapes {shapes(neg_text)} differ from the text shapes {shapes(text)}")
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
