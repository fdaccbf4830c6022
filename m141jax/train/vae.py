"""Training the causal VAE: reconstruction + β·KL to N(0, I) (the demo trains its tiny VAE with it).

    loss = mean w·|x̂ − x| + mean w·(x̂ − x)² + γ · mean w·|∇x̂ − ∇x| + β · mean KL(q(z|x) ‖ N(0, I)),
    x̂ = decode(z + u·α·s·ε), z ~ q(z|x)

over videos [B, F, H, W, 3] in [−1, 1] (F = 1 or 4k+1), means over every element. L1 keeps edges sharp,
the squared error punishes colour shifts, and the small KL keeps the posterior narrow and its means
bounded (it does not centre them: each channel settles on its own offset and spread). The per-pixel
weight w is 1, or (`foreground_weight`) larger on pixels away from the video's background colour: small
objects on a plain background are otherwise learned long after the background. With `foreground_margin`
m, the background pixels within m px of the object (a (2m+1)² window on each frame) weigh as much: weighed
on the object alone, a blur costs little outside it and much inside, so the decoder learns to bleed the
object's colour outwards. The optional gradient
term (γ = `edge_weight`; ∇ = the differences between neighbouring pixels along height and width) asks
for the edges themselves: a pixel error spread evenly over an edge (a blur) costs L1 and L2 little, a
wrong gradient on the edge costs it fully. The optional latent noise (α = `latent_noise`; s = the batch's
per-channel std of z, u ~ U(0, 1) per video, ε ~ N(0, I)) trains the decoder on latents as far off as a
DiT's, where the small KL leaves the posterior's own noise at a few percent of the latents' spread; s is
measured from z itself, so scaling the latents up does not escape the noise. After training,
`latent_statistics` measures the per-channel mean and std of the posterior means, which normalise the
latents for the DiTs (`VAEConfig.latents_mean/std`).
"""

from __future__ import annotations

from typing import Any

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from m141jax.config import VAEConfig
from m141jax.models import vae as vae_lib


@struct.dataclass
class VAEState:
    step: Any
    params: Any
    opt_state: Any


def _apply(params, cfg: VAEConfig, method, x):
    return vae_lib.CausalVAE(cfg).apply({"params": params}, x, method=method)


def posterior(params, cfg: VAEConfig, video):
    """(mean, logvar) [B, f, h, w, C] of q(z|x), logvar clamped as `vae.encode` does; differentiable."""
    mean, logvar = jnp.split(_apply(params, cfg, vae_lib.CausalVAE.moments, video).astype(jnp.float32), 2, -1)
    return mean, jnp.clip(logvar, *vae_lib.LOGVAR_RANGE)


def foreground_weights(video, weight: float, margin: int = 0):
    """Per-pixel weights [B, F, H, W, 1]: 1 + weight where a pixel's colour is farther than 0.1 from its
    video's median colour (the objects on a plain background) or, with `margin`, within `margin` px of such
    a pixel on its frame (Chebyshev distance, not wrapping at the frame's edges), else 1."""
    b = video.shape[0]
    background = jnp.median(video.reshape(b, -1, video.shape[-1]), axis=1)
    far = (jnp.linalg.norm(video - background[:, None, None, None], axis=-1, keepdims=True) > 0.1).astype(video.dtype)
    if margin:
        window = (1, 1, 2 * margin + 1, 2 * margin + 1, 1)
        far = jax.lax.reduce_window(far, 0.0, jax.lax.max, window, (1,) * 5, "SAME")
    return 1.0 + weight * far


def gradient_error(recon, video, w):
    """mean w·|∇x̂ − ∇x| over the height and width differences of videos [B, F, H, W, 3] (w: 1 or per-pixel
    weights [B, F, H, W, 1], each difference weighed by the larger weight of its two pixels)."""
    total = 0.0
    for axis in (2, 3):
        d = jnp.abs(jnp.diff(recon, axis=axis) - jnp.diff(video, axis=axis))
        if not isinstance(w, float):
            n = w.shape[axis]
            first, second = (jax.lax.slice_in_dim(w, s, s + n - 1, axis=axis) for s in (0, 1))
            d = d * jnp.maximum(first, second)
        total = total + d.mean()
    return total / 2


def noised_latents(z, rng, latent_noise: float):
    """z + u·latent_noise·s·ε (see the module docstring) for latents [B, f, h, w, C]: s the per-channel std
    of the batch's z (no gradient flows through it), u ~ U(0, 1) per video, ε ~ N(0, I)."""
    spread = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]).std(0))
    level, noise = jax.random.split(rng)
    u = jax.random.uniform(level, (z.shape[0],) + (1,) * (z.ndim - 1))
    return z + u * latent_noise * spread * jax.random.normal(noise, z.shape)


def vae_loss(params, cfg: VAEConfig, video, rng, kl_weight: float, foreground_weight: float = 0.0,
             edge_weight: float = 0.0, latent_noise: float = 0.0, foreground_margin: int = 0):
    """(loss, metrics) of a batch of videos in [−1, 1]; with `foreground_weight` the reconstruction terms
    weigh the pixels away from the background colour, and those within `foreground_margin` px of them,
    1 + foreground_weight times (`foreground_weights`);
    with `edge_weight` the gradient term joins them (`gradient_error`); with `latent_noise` the decoder
    reads noised latents (`noised_latents`)."""
    mean, logvar = posterior(params, cfg, video)
    z = vae_lib.sample_posterior(mean, logvar, rng)
    if latent_noise:
        z = noised_latents(z, jax.random.fold_in(rng, 1), latent_noise)
    recon = _apply(params, cfg, vae_lib.CausalVAE.decode, z).astype(jnp.float32)
    w = foreground_weights(video, foreground_weight, foreground_margin) if foreground_weight else 1.0
    l1, l2 = (w * jnp.abs(recon - video)).mean(), (w * jnp.square(recon - video)).mean()
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar).mean()
    loss, metrics = l1 + l2 + kl_weight * kl, {"l1": l1, "mse": l2, "kl": kl}
    if edge_weight:
        metrics["gradient"] = gradient_error(recon, video, w)
        loss = loss + edge_weight * metrics["gradient"]
    return loss, metrics


def init_vae_state(params, tx: optax.GradientTransformation) -> VAEState:
    return VAEState(jnp.zeros((), jnp.int32), params, tx.init(params))


def make_vae_step(cfg: VAEConfig, tx: optax.GradientTransformation, kl_weight: float, foreground_weight: float = 0.0,
                  edge_weight: float = 0.0, latent_noise: float = 0.0, foreground_margin: int = 0):
    """vae_step(state, video, rng) -> (state, metrics): one optimizer update (jit it)."""
    def vae_step(state: VAEState, video, rng):
        (loss, metrics), grads = jax.value_and_grad(vae_loss, has_aux=True)(state.params, cfg, video, rng, kl_weight,
                                                                             foreground_weight, edge_weight,
                                                                             latent_noise, foreground_margin)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return VAEState(state.step + 1, params, opt_state), {"loss": loss, **metrics}

    return vae_step


def latent_statistics(params, cfg: VAEConfig, videos) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the posterior means of `videos` (an iterable of [B, F, H, W, 3] batches in
    [−1, 1]): the `latents_mean` / `latents_std` that normalise the latents for the DiTs."""
    means = np.concatenate([np.asarray(vae_lib.encode(params, cfg, v, tiling=False)[0]).reshape(-1, cfg.latent_channels)
                            for v in videos])
    return tuple(float(v) for v in means.mean(0)), tuple(float(v) for v in means.std(0))
