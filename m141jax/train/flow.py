"""Flow-matching training of the DiT (release.md C.2, C.3, F).

x_σ = (1−σ)·x₀ + σ·ε and the DiT predicts v = ε − x₀ at timestep 1000·σ. σ is drawn logit-normal,
uniform or with the release's "mode" density, optionally time-shifted; the loss is a (weighted) MSE.
CFG dropout is prepared as the release does: a dropped sample's LLM text tokens, their mask and the
pooled CLIP vector become the empty prompt's, while the leading VLM image tokens and the reference
latent stay, so the model learns a text-unconditional but image-conditional branch.

A batch is a dict (channels-last, fp32): `latents` x₀ [B,F,H,W,C], `ref_latents` [B,1,H,W,C] (I2V
models), `guidance` [B] (models with a guidance embedding), `text_states` [B,L,D], `text_mask` [B,L],
`text_states_2` [B,D2] (read as one `Conditioning`), and the empty prompt `null_text_states`
[L−n_image_tokens, D], `null_text_mask` [L−n_image_tokens], `null_text_states_2` [D2] (another).
The flow-matching math (σ shift, x_σ, x̂₀, Euler, CFG) is `m141jax.sampling`'s.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct as struct
import jax
import jax.numpy as jnp
import optax

from m141jax import sampling
from m141jax.config import DiTConfig
from m141jax.models.conditioning import Conditioning
from m141jax.models.dit import dit_forward
from m141jax.train.config import FlowConfig, TrainConfig
from m141jax.train.optim import ema_init, ema_update, make_optimizer

EXTRA_KEYS = ("ref_latents", "guidance")  # the DiT inputs of a batch besides x and its Conditioning

# velocity(params, x, sigma [B], cond: Conditioning, extra: {ref_latents?, guidance?}) -> v [B,F,H,W,C] fp32;
# with features=True also the DiT features
Velocity = Callable[..., Any]


# ------------------------------------------------------------------ σ's (release.md C.1, C.3)

def sample_sigmas(rng, n: int, cfg: FlowConfig):
    """n training σ's in (0, 1): u from the configured density, then the time shift (`sampling.shift_sigma`)."""
    if cfg.sigma_sampling == "logit_normal":
        u = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, (n,)))
    else:
        u = jax.random.uniform(rng, (n,))
        if cfg.sigma_sampling == "mode":
            u = 1.0 - u - cfg.mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1.0 + u)
    return sampling.shift_sigma(u, cfg.shift)


def loss_weight(sigma, weighting: str):
    """Per-sample loss weights: 1, σ⁻² (sigma_sqrt) or 2/(π(1−2σ+2σ²)) (cosmap)."""
    if weighting == "sigma_sqrt":
        return sigma ** -2.0
    if weighting == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * sigma + 2.0 * sigma ** 2))
    return jnp.ones_like(sigma)


# ------------------------------------------------------------------ conditioning

def split_batch(batch: dict) -> tuple[Any, Conditioning, dict, Conditioning]:
    """(x₀, conditioning, the other DiT inputs {ref_latents, guidance} the batch holds, the empty prompt's
    conditioning `null_*`) of a batch."""
    extra = {k: batch[k] for k in EXTRA_KEYS if k in batch}
    return (batch["latents"].astype(jnp.float32), Conditioning.from_batch(batch), extra,
            Conditioning.from_batch(batch, prefix="null_"))


def drop_text(cond: Conditioning, drop, null: Conditioning, n_image_tokens: int) -> Conditioning:
    """cond with the text of the samples where drop [B] is True replaced by the empty prompt `null` (one
    unbatched row: states [L − n_image_tokens, D], mask, pooled): the tokens after the first
    n_image_tokens, their mask, and the pooled vector. The image tokens stay (and the reference latent,
    which is not part of the conditioning)."""
    ts, mask = cond.text_states, cond.text_mask
    n_text = ts.shape[1] - n_image_tokens
    if null.text_states.shape != (n_text, ts.shape[2]) or null.text_mask.shape != (n_text,):
        raise ValueError(f"empty-prompt states {tuple(null.text_states.shape)} / mask "
                         f"{tuple(null.text_mask.shape)} must cover the {n_text} text tokens after the "
                         f"{n_image_tokens} image tokens of text states {tuple(ts.shape)}")
    d = drop[:, None]
    text = jnp.where(d[..., None], null.text_states[None].astype(ts.dtype), ts[:, n_image_tokens:])
    text_mask = jnp.where(d, null.text_mask[None].astype(mask.dtype), mask[:, n_image_tokens:])
    pooled = jnp.where(d, null.text_states_2[None].astype(cond.text_states_2.dtype), cond.text_states_2)
    return Conditioning(jnp.concatenate([ts[:, :n_image_tokens], text], 1),
                        jnp.concatenate([mask[:, :n_image_tokens], text_mask], 1), pooled)


def dit_velocity(cfg: DiTConfig) -> Velocity:
    """The DiT as velocity(params, x, σ, cond, extra, features=False) at timestep 1000·σ."""
    def velocity(params, x, sigma, cond, extra, features=False):
        return dit_forward(params, cfg, x, 1000.0 * sigma, cond, extra.get("ref_latents"), extra.get("guidance"),
                           return_features=features)
    return velocity


# ------------------------------------------------------------------ loss

def flow_matching_loss(v, x0, eps, sigma, weighting: str = "none", skip_frames: int = 0):
    """mean_b w(σ_b)·mean((v − (ε − x₀))²) over the frames from skip_frames on."""
    err = jnp.square(v - (eps - x0))[:, skip_frames:]
    return jnp.mean(loss_weight(sigma, weighting) * err.mean(axis=tuple(range(1, err.ndim))))


def flow_noise(rng, x0, cfg: FlowConfig):
    """The randomness of a flow-matching loss on x₀ [B, ...]: (σ [B], ε like x₀, text dropped [B])."""
    k_sigma, k_eps, k_drop = jax.random.split(rng, 3)
    b = x0.shape[0]
    return (sample_sigmas(k_sigma, b, cfg), jax.random.normal(k_eps, x0.shape, jnp.float32),
            jax.random.uniform(k_drop, (b,)) < cfg.cfg_dropout)


def flow_loss_at(velocity: Velocity, params, cfg: FlowConfig, x0, cond: Conditioning, extra: dict,
                 null: Conditioning, noise):
    """The flow-matching loss of `params` on x₀ with the randomness `noise` (`flow_noise`); (loss, metrics)."""
    sigma, eps, drop = noise
    if cfg.cfg_dropout > 0:
        cond = drop_text(cond, drop, null, cfg.n_image_tokens)
    v = velocity(params, sampling.interpolate(x0, eps, sigma), sigma, cond, extra)
    skip = 0 if cfg.ref_frame_loss or "ref_latents" not in extra else extra["ref_latents"].shape[1]
    loss = flow_matching_loss(v, x0, eps, sigma, cfg.weighting, skip)
    return loss, {"sigma_mean": sigma.mean()}


def flow_loss(velocity: Velocity, params, cfg: FlowConfig, x0, cond: Conditioning, extra: dict, null: Conditioning,
              rng):
    """The flow-matching loss of `params` on clean latents x₀ with CFG dropout; returns (loss, metrics)."""
    return flow_loss_at(velocity, params, cfg, x0, cond, extra, null, flow_noise(rng, x0, cfg))


def micro_batches(tree, n: int):
    """Every array of `tree` [B, ...] as [n, B/n, ...]: micro-batch j holds rows j, j+n, j+2n, ... (so
    a device's block of consecutive rows holds its share of every micro-batch)."""
    def split(a):
        if a.shape[0] % n:
            raise ValueError(f"a batch of {a.shape[0]} rows does not split into {n} micro-batches")
        return a.reshape(a.shape[0] // n, n, *a.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, tree)


def accumulated_value_and_grad(loss_fn, params, batched, n: int):
    """(mean loss, mean metrics), mean gradient of loss_fn(params, micro_batch) -> (loss, metrics) over the
    n equal micro-batches of `batched` (a tree of [B, ...] arrays), one micro-batch at a time (lax.scan):
    the large-batch step's values, with the activations of B/n rows. n = 1 is the plain value_and_grad."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if n == 1:
        return grad_fn(params, batched)

    def body(acc, micro):
        out = grad_fn(params, micro)
        return jax.tree.map(jnp.add, acc, out), None

    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         jax.eval_shape(grad_fn, params, jax.tree.map(lambda a: a[0], micro_batches(batched, n))))
    total, _ = jax.lax.scan(body, zeros, micro_batches(batched, n))
    return jax.tree.map(lambda a: a / n, total)


# ------------------------------------------------------------------ training step

@struct.dataclass
class TrainState:
    """Completed steps, parameters, optimizer state and the parameter EMA (None when off)."""

    step: Any
    params: Any
    opt_state: Any
    ema: Any = None


def host_fields(cfg: TrainConfig) -> tuple[str, ...]:
    """The TrainState fields kept in host memory between steps (`optimizer.state_memory: host`)."""
    return ("opt_state",) if cfg.optimizer.state_memory == "host" else ()


def init_train_state(cfg: TrainConfig, params) -> TrainState:
    tx, _ = make_optimizer(cfg.optimizer, cfg.run.steps, cfg.sparsity, cfg.model)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), ema_init(params, cfg.ema_decay))


def make_train_step(cfg: TrainConfig, velocity: Velocity | None = None):
    """train_step(state, batch, rng) -> (state, metrics): one AdamW update on the flow-matching loss (its
    gradient accumulated over `cfg.accumulate` micro-batches)."""
    velocity = velocity or dit_velocity(cfg.model)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.run.steps, cfg.sparsity, cfg.model)

    def train_step(state: TrainState, batch: dict, rng):
        x0, cond, extra, null = split_batch(batch)
        rows = (x0, cond, extra, flow_noise(rng, x0, cfg.flow))  # the randomness of the whole batch, then split
        (loss, aux), grads = accumulated_value_and_grad(
            lambda p, m: flow_loss_at(velocity, p, cfg.flow, m[0], m[1], m[2], null, m[3]), state.params, rows,
            cfg.accumulate)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **aux}
        return TrainState(state.step + 1, params, opt_state, ema_update(state.ema, params, cfg.ema_decay)), metrics

    return train_step
