"""DMD2 distillation evidence that fits CI: the project's DMD2 step (`m141jax.train.dmd`) must turn a teacher
whose 4-step Euler samples are blurred into a 4-step generator that is measurably sharper.

The target is a mixture of K narrow Gaussians on a circle (one 2-channel latent "pixel" per sample). The
teacher is that mixture's exact flow-matching velocity E[ε − x₀ | x_σ] (closed form), so its many-step
samples are the target; at the release's 4-step schedule (shift 5) the last step jumps from σ = 0.625 to 0,
where the modes are not yet told apart, and x̂₀ averages them. Every network (teacher, generator, fake
score) is that exact velocity plus a residual MLP whose output layer starts at zero: the teacher's residual
is zero, the generator and the fake score start as copies of it, as DMD2 does, and learn their residuals.
Distance: sliced Wasserstein to held-out target samples; `floor` is that of a second held-out set."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m141jax import sampling
from m141jax.train import dmd
from m141jax.train.config import DataConfig, DistillConfig, DMDConfig, FlowConfig, OptimizerConfig, RunConfig
from m141jax.train.distance import sliced_wasserstein

K, RADIUS, STD = 8, 1.0, 0.04  # the mixture: K modes on a circle
MEANS = RADIUS * np.stack([np.cos(2 * np.pi * np.arange(K) / K), np.sin(2 * np.pi * np.arange(K) / K)], 1)
SHAPE = (1, 1, 1, 2)  # one latent [F, H, W, C] per sample


def target(rng: np.random.Generator, n: int):
    """n samples of the mixture, shaped as latents [n, 1, 1, 1, 2]."""
    x = MEANS[rng.integers(K, size=n)] + STD * rng.standard_normal((n, 2))
    return x.reshape(n, *SHAPE).astype(np.float32)


def exact_velocity(x, sigma):
    """E[ε − x₀ | x_σ = x] for x_σ = (1−σ)x₀ + σε, x₀ from the mixture: per mode, (x, x₀, ε) are jointly
    Gaussian, so E[ε − x₀ | x, k] = (σ − (1−σ)s²)/τ²·(x − (1−σ)μ_k) − μ_k with τ² = (1−σ)²s² + σ², and the
    modes are weighted by their posterior."""
    s = sigma[:, None, None]
    tau2 = (1 - s) ** 2 * STD ** 2 + s ** 2
    d = x[:, None, :] - (1 - s) * jnp.asarray(MEANS, jnp.float32)[None]  # [B, K, 2]
    w = jax.nn.softmax(-jnp.sum(d ** 2, -1) / (2 * tau2[..., 0]), -1)[..., None]
    return jnp.sum(w * ((s - (1 - s) * STD ** 2) / tau2 * d - jnp.asarray(MEANS, jnp.float32)[None]), 1)


class Residual(nn.Module):
    """MLP(x, σ) added to the exact velocity; its output layer starts at zero. Hidden activations are the
    features the discriminator head reads (one token)."""

    hidden: int = 128

    @nn.compact
    def __call__(self, x, sigma):
        h = jnp.concatenate([x, sigma[:, None], jnp.cos(np.pi * sigma)[:, None]], -1)
        h = nn.silu(nn.Dense(self.hidden)(h))
        h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(2, kernel_init=nn.initializers.zeros)(h), h[:, None]


def velocity(params, x, sigma, cond, extra, features=False):
    """The DiT's calling convention: v [B, 1, 1, 1, 2] (and features [B, 1, hidden])."""
    flat = x.reshape(x.shape[0], 2)
    r, h = Residual().apply({"params": params}, flat, sigma)
    v = (exact_velocity(flat, sigma) + r).reshape(x.shape)
    return (v, h) if features else v


def batch(rng: np.random.Generator, n: int) -> dict:
    """A distillation batch: target samples, a one-token dummy prompt and the empty prompt."""
    return {"latents": target(rng, n), "text_states": np.zeros((n, 1, 1), np.float32),
            "text_mask": np.ones((n, 1), np.int32), "text_states_2": np.zeros((n, 1), np.float32),
            "null_text_states": np.zeros((1, 1), np.float32), "null_text_mask": np.ones(1, np.int32),
            "null_text_states_2": np.zeros(1, np.float32)}


def sample(params, noise, steps: int):
    """The release's Euler sampler over the 4-step (or any) shift-5 schedule, no CFG."""
    return sampling.euler_loop(lambda x, s: velocity(params, x, jnp.full((x.shape[0],), s), None, {}), noise,
                               jnp.asarray(sampling.schedule(steps, 5.0)))


def distill(steps: int, **losses):
    """The generator after `steps` DMD2 iterations (`dmd.make_dmd_step`) with the given loss weights, and
    the undistilled one (the initial state's copy of the teacher)."""
    cfg = DistillConfig(teacher_dtype="fp32", n_image_tokens=0,
                        dmd=DMDConfig(real_guidance=1.0, critic_steps=5, head_hidden=32, **losses,
                                      fake_flow=FlowConfig(sigma_sampling="uniform", cfg_dropout=0.0,
                                                           n_image_tokens=0)),
                        generator_optimizer=OptimizerConfig(learning_rate=1e-3, weight_decay=0.0),
                        critic_optimizer=OptimizerConfig(learning_rate=1e-3, weight_decay=0.0),
                        data=DataConfig(batch_size=256), run=RunConfig(steps=steps))
    teacher = Residual().init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    state = dmd.init_dmd_state(cfg, teacher, jax.random.PRNGKey(1), features=Residual.hidden)
    undistilled = state.generator
    step = jax.jit(dmd.make_dmd_step(cfg, velocity), static_argnums=4)
    rng = np.random.default_rng(0)
    for i in range(steps):
        state, _ = step(state, teacher, batch(rng, cfg.data.batch_size), jax.random.PRNGKey(100 + i),
                        dmd.generator_turn(i, cfg.dmd))
    return teacher, undistilled, state.generator


def gap_closed(steps: int, **losses) -> dict[str, float]:
    """Distances to 4096 held-out samples (floor: a second held-out set; the teacher's 50- and 4-step samples)
    and the fraction of the gap teacher4 − teacher50 that the undistilled and the distilled generator close."""
    teacher, undistilled, student = distill(steps, **losses)
    held = np.random.default_rng(1)
    ref, other = target(held, 4096), target(held, 4096)
    noise = jax.random.normal(jax.random.PRNGKey(2), ref.shape)

    def distance(x):
        return sliced_wasserstein(np.asarray(x), ref, np.random.default_rng(3), 256)

    out = {"floor": distance(other), "teacher50": distance(sample(teacher, noise, 50)),
           "teacher4": distance(sample(teacher, noise, 4))}
    for name, params in (("undistilled", undistilled), ("distilled", student)):
        out[name] = (out["teacher4"] - distance(sample(params, noise, 4))) / (out["teacher4"] - out["teacher50"])
    return out


BAR = 0.6  # the fraction of the gap a distilled generator must close (measured at 800 steps: 0.71 and 0.75)


@pytest.mark.slow
@pytest.mark.parametrize("losses", [{"gen_gan_weight": 0.0, "critic_gan_weight": 0.0}, {}],
                         ids=["distribution-matching-only", "with-gan"])
def test_dmd2_closes_the_four_step_gap(losses):
    """25 s of CPU each (up to a minute on 2 busy cores). Many teacher steps reach the target and 4 blur
    it; 800 DMD2 steps must close ≥ BAR of that gap while the undistilled generator (the teacher) closes
    none. The distribution-matching term alone must do it (the GAN terms off: a GAN alone also sharpens),
    and so must the full loss. A negated DM gradient (NaN) or one that ignores the fake score (−0.1)
    fails (measured at 1000 steps)."""
    got = gap_closed(800, **losses)
    assert got["teacher50"] < 2 * got["floor"] and got["teacher4"] > 10 * got["teacher50"], got
    assert got["undistilled"] < BAR <= got["distilled"], got

def test_sliced_wasserstein_hand_cases():
    """0 between a set and itself (in any order); a shift by c along every axis of d dimensions moves each
    projection by c·Σ dᵢ, whose mean |.| over random unit directions is below c·√d."""
    a = np.random.default_rng(0).standard_normal((500, 3))
    assert sliced_wasserstein(a, a[::-1], np.random.default_rng(1)) == 0.0
    shifted = sliced_wasserstein(a, a + 1.0, np.random.default_rng(1), n_dirs=4096)
    assert 0.5 < shifted < np.sqrt(3)
    assert sliced_wasserstein(a[:, :1], a[:, :1] + 2.0, np.random.default_rng(1)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="equal shapes"):
        sliced_wasserstein(a, a[:10], np.random.default_rng(1))
