"""DMD2 adversarial step distillation (release.md F): a few-step generator learns from a frozen teacher.

Three networks, all the DiT architecture:
- the **generator** G (the student, initialised from the teacher) maps the noisy latent at one of its
  inference σ's to x̂₀ = x_σ − σ·v_G. Its inputs come from *backward simulation*: a shared random k of
  the N student steps is run, without gradients, with the release's Euler sampler (release.md C.1) from pure
  noise, so the generator trains on exactly the states it meets at inference;
- the frozen **teacher** (real score) with CFG v_u + w·(v_c − v_u), the unconditional branch being the
  empty prompt with image tokens and reference kept: this is where CFG is distilled;
- the **fake score** F, trained online with the flow-matching loss on generator samples, with a
  discriminator **head** on its image tokens after the double-stream blocks.

Losses, with stop-gradients where DMD2 puts them:
- distribution matching: x_t = (1−σ)x̂₀ + σε, p = x̂₀ − x̂₀^teacher(x_t), q = x̂₀ − x̂₀^fake(x_t),
  g = (p − q) / mean|p| per sample (all without gradients), L_dm = ½·mean((x̂₀ − sg(x̂₀ − g))²);
- generator GAN: softplus(−D(x̂₀)) through the (not updated) fake score and head;
- critic: flow loss of F on sg(x̂₀) + λ·[softplus(D(sg(x̂₀))) + softplus(−D(x_real))].
Two time scales: every step updates the critic (F and head); every `critic_steps`-th step first updates
the generator against the current critic, as DMD2 does. The teacher is an input, never differentiated.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct as struct
import jax
import jax.numpy as jnp
import optax

from m141jax import sampling
from m141jax.config import dtype_of
from m141jax.models.layers import LayerNorm, dense
from m141jax.sampling import interpolate, predict_x0
from m141jax.train.config import DistillConfig, DMDConfig
from m141jax.train.flow import Velocity, dit_velocity, drop_text, flow_loss, micro_batches, split_batch
from m141jax.train.optim import make_optimizer

sg = jax.lax.stop_gradient


class DiscriminatorHead(nn.Module):
    """Per-token logits from fake-score features [B, N, D] (LN → Linear → SiLU → Linear), averaged: [B]."""

    hidden: int

    @nn.compact
    def __call__(self, features):
        h = LayerNorm(affine=True, name="norm")(features)
        h = nn.silu(dense(self.hidden, ("embed", "mlp"), name="fc1")(h))
        return dense(1, ("mlp", None), name="fc2")(h)[..., 0].mean(-1)


@struct.dataclass
class DMDState:
    """Completed steps; generator params + AdamW state; critic {'fake': DiT params, 'head': ...} + state."""

    step: Any
    generator: Any
    generator_opt: Any
    critic: Any
    critic_opt: Any


def _optimizers(cfg: DistillConfig):
    gen_updates = math.ceil(cfg.run.steps / cfg.dmd.critic_steps)
    return (make_optimizer(cfg.generator_optimizer, gen_updates, cfg.sparsity, cfg.model),
            make_optimizer(cfg.critic_optimizer, cfg.run.steps))


def host_fields(cfg: DistillConfig) -> tuple[str, ...]:
    """The DMDState fields kept in host memory between steps (`state_memory: host` of their optimizer)."""
    return tuple(field for field, opt in (("generator_opt", cfg.generator_optimizer), ("critic_opt", cfg.critic_optimizer))
                 if opt.state_memory == "host")


def head_width(cfg: DistillConfig) -> int:
    return cfg.dmd.head_hidden or cfg.model.hidden_size


def init_dmd_state(cfg: DistillConfig, teacher, rng, features: int | None = None) -> DMDState:
    """Generator and fake score start as copies of the teacher (in the model's parameter dtype); the
    discriminator head is freshly initialised for features of width `features` (default: the DiT's)."""
    def copy(params):
        return jax.tree.map(lambda a: jnp.array(a, dtype_of(cfg.model.param_dtype)), params)

    dummy = jnp.zeros((1, 1, features or cfg.model.hidden_size))
    head = nn.unbox(DiscriminatorHead(head_width(cfg)).init(rng, dummy)["params"])
    generator, critic = copy(teacher), {"fake": copy(teacher), "head": head}
    (gen_tx, _), (critic_tx, _) = _optimizers(cfg)
    return DMDState(jnp.zeros((), jnp.int32), generator, gen_tx.init(generator), critic, critic_tx.init(critic))


# ------------------------------------------------------------------ pieces (pure, model passed in)

def backward_simulate(velocity: Velocity, params, noise, cond, extra, sigmas, k):
    """The generator's Euler sampler (`sampling.euler_loop`) run for the first k (traced) of its steps from
    noise, no gradients."""
    params, b = sg(params), noise.shape[0]
    return sg(sampling.euler_loop(lambda x, s: velocity(params, x, jnp.full((b,), s), cond, extra), noise, sigmas, k))


def generate(velocity: Velocity, params, noise, cond, extra, sigmas, k):
    """x̂₀ = x_σk − σ_k·v_G(x_σk) with x_σk from backward simulation; differentiable in params."""
    x = backward_simulate(velocity, params, noise, cond, extra, sigmas, k)
    sigma = jnp.full((noise.shape[0],), sigmas[k])
    return predict_x0(x, velocity(params, x, sigma, cond, extra), sigma)


def dm_gradient(x0, x0_real, x0_fake):
    """DMD2's normalised distribution-matching direction (p_real − p_fake) / mean|p_real| per sample."""
    p_real, p_fake = x0 - x0_real, x0 - x0_fake
    norm = jnp.abs(p_real).mean(axis=tuple(range(1, x0.ndim)), keepdims=True)
    return jnp.nan_to_num((p_real - p_fake) / norm)


def dm_loss_from_gradient(x0, grad):
    """½·mean((x₀ − sg(x₀ − g))²): its gradient in x₀ is g / x₀.size."""
    return 0.5 * jnp.mean(jnp.square(x0 - sg(x0 - grad)))


def generator_gan_loss(logits_fake):
    """Non-saturating generator loss softplus(−D(x_gen))."""
    return jax.nn.softplus(-logits_fake).mean()


def discriminator_loss(logits_fake, logits_real):
    """softplus(D(x_gen)) + softplus(−D(x_real))."""
    return jax.nn.softplus(logits_fake).mean() + jax.nn.softplus(-logits_real).mean()


class DMD:
    """The DMD2 losses for one configuration; `velocity` is the DiT (or a stand-in for tests)."""

    def __init__(self, cfg: DistillConfig, velocity: Velocity | None = None):
        self.cfg, self.dmd = cfg, cfg.dmd
        self.velocity = velocity or dit_velocity(cfg.model)
        self.head = DiscriminatorHead(head_width(cfg))
        self.sigmas = jnp.asarray(sampling.schedule(cfg.dmd.student_steps, cfg.dmd.shift))

    def logits(self, critic, x0, cond, extra, rng):
        """D(x): the head on fake-score features of x noised to σ ~ U[0, gan_sigma_max)."""
        k_sigma, k_eps = jax.random.split(rng)
        sigma = jax.random.uniform(k_sigma, (x0.shape[0],), maxval=self.dmd.gan_sigma_max)
        x = interpolate(x0, jax.random.normal(k_eps, x0.shape), sigma)
        _, features = self.velocity(critic["fake"], x, sigma, cond, extra, features=True)
        return self.head.apply({"params": critic["head"]}, features)

    def teacher_velocity(self, teacher, x, sigma, cond, uncond, extra):
        """The real score with CFG v_u + w·(v_c − v_u) (`sampling.guided`: one forward of batch 2B; one
        conditional pass when the release would skip CFG, w ≤ 1)."""
        cfg_on = sampling.uses_cfg(self.dmd.real_guidance)
        inputs = (cond, extra, sigma)
        if cfg_on:
            inputs = sampling.cfg_rows((uncond, extra, sigma), inputs)
        c, e, s = inputs
        return sampling.guided(lambda xs: self.velocity(teacher, xs, s, c, e), x, self.dmd.real_guidance, cfg_on)

    def dm_loss(self, x0, teacher, fake, cond, uncond, extra, rng):
        """The distribution-matching loss of generator samples x0 (differentiable in x0 only)."""
        d = self.dmd
        k_sigma, k_eps = jax.random.split(rng)
        u = jax.random.uniform(k_sigma, (x0.shape[0],), minval=d.dm_sigma_min, maxval=d.dm_sigma_max)
        sigma = sampling.shift_sigma(u, d.dm_shift)
        x_t = interpolate(sg(x0), jax.random.normal(k_eps, x0.shape), sigma)
        x0_fake = predict_x0(x_t, self.velocity(sg(fake), x_t, sigma, cond, extra), sigma)
        x0_real = predict_x0(x_t, self.teacher_velocity(sg(teacher), x_t, sigma, cond, uncond, extra), sigma)
        grad = sg(dm_gradient(sg(x0), x0_real, x0_fake))
        return dm_loss_from_gradient(x0, grad), {"dm_grad_norm": jnp.sqrt(jnp.sum(jnp.square(grad)))}

    def generator_loss(self, generator, critic, teacher, noise, cond, uncond, extra, k, rng):
        """(weighted DM + GAN loss, (x̂₀, metrics)); only `generator` receives gradients."""
        k_dm, k_gan = jax.random.split(rng)
        x0 = generate(self.velocity, generator, noise, cond, extra, self.sigmas, k)
        l_dm, aux = self.dm_loss(x0, teacher, critic["fake"], cond, uncond, extra, k_dm)
        l_gan = generator_gan_loss(self.logits(sg(critic), x0, cond, extra, k_gan))
        total = self.dmd.dm_weight * l_dm + self.dmd.gen_gan_weight * l_gan
        return total, (sg(x0), {"gen_loss_dm": l_dm, "gen_loss_gan": l_gan, **aux})

    def critic_loss(self, critic, x0_gen, x_real, cond, extra, null, rng):
        """(fake-score flow loss + λ·discriminator loss, metrics); generator samples are constants."""
        k_flow, k_gan = jax.random.split(rng)
        x0_gen = sg(x0_gen)
        l_fake, _ = flow_loss(self.velocity, critic["fake"], self.dmd.fake_flow, x0_gen, cond, extra, null, k_flow)
        both, both_extra = jax.tree.map(lambda a: jnp.concatenate([a, a]), (cond, extra))
        logits_fake, logits_real = jnp.split(
            self.logits(critic, jnp.concatenate([x0_gen, x_real]), both, both_extra, k_gan), 2)
        l_disc = discriminator_loss(logits_fake, logits_real)
        total = l_fake + self.dmd.critic_gan_weight * l_disc
        return total, {"critic_loss_fake": l_fake, "critic_loss_disc": l_disc,
                       "d_real": jax.nn.sigmoid(logits_real).mean(), "d_fake": jax.nn.sigmoid(logits_fake).mean()}


def generator_turn(step: int, dmd: DMDConfig) -> bool:
    """True on the steps that also update the generator (0, k, 2k, ...)."""
    return step % dmd.critic_steps == 0


def make_dmd_step(cfg: DistillConfig, velocity: Velocity | None = None):
    """dmd_step(state, teacher, batch, rng, update_generator) -> (state, metrics): one DMD2 iteration.

    update_generator is static (jit it with static_argnums=4); take it from `generator_turn(step)`. With
    cfg.accumulate = n > 1 both turns run their batch as n micro-batches one after another (lax.map),
    averaging gradients and metrics; each micro-batch draws its own σ's and noise (fold_in of the turn's
    key by its index), so the step is the large-batch step in expectation, not bit for bit.
    """
    losses = DMD(cfg, velocity)
    (gen_tx, gen_schedule), (critic_tx, critic_schedule) = _optimizers(cfg)
    n_img = cfg.n_image_tokens

    n_micro = cfg.accumulate

    def gen_grads(generator, critic, teacher, rows, k, rng):
        """((loss, (x̂₀ [B], metrics)), grads) of the generator loss; with accumulation, over micro-batches
        (each drawing its own randomness by fold_in(rng, j)), x̂₀ reassembled in batch order."""
        def one(m, key):
            noise, cond, uncond, extra = m
            return jax.value_and_grad(losses.generator_loss, has_aux=True)(
                generator, critic, teacher, noise, cond, uncond, extra, k, key)
        if n_micro == 1:
            return one(rows, rng)
        micro = micro_batches(rows, n_micro)
        (loss, (x0s, ms)), grads = jax.lax.map(lambda jm: one(jm[1], jax.random.fold_in(rng, jm[0])),
                                                (jnp.arange(n_micro), micro))
        x0 = x0s.swapaxes(0, 1).reshape(-1, *x0s.shape[2:])  # inverse of micro_batches
        return (loss.mean(), (x0, jax.tree.map(jnp.mean, ms))), jax.tree.map(lambda g: g.mean(0), grads)

    def critic_grads(critic, rows, null, rng):
        def one(m, key):
            x0_gen, x_real, cond, extra = m
            return jax.value_and_grad(losses.critic_loss, has_aux=True)(critic, x0_gen, x_real, cond, extra, null,
                                                                         key)
        if n_micro == 1:
            return one(rows, rng)
        (loss, ms), grads = jax.lax.map(lambda jm: one(jm[1], jax.random.fold_in(rng, jm[0])),
                                        (jnp.arange(n_micro), micro_batches(rows, n_micro)))
        return (loss.mean(), jax.tree.map(jnp.mean, ms)), jax.tree.map(lambda g: g.mean(0), grads)

    def dmd_step(state: DMDState, teacher, batch: dict, rng, update_generator: bool):
        x_real, cond, extra, null = split_batch(batch)
        b = x_real.shape[0]
        uncond = drop_text(cond, jnp.ones((b,), bool), null, n_img)
        k_noise, k_sim, k_gen, k_critic = jax.random.split(rng, 4)
        noise = jax.random.normal(k_noise, x_real.shape)
        k = jax.random.randint(k_sim, (), 0, cfg.dmd.student_steps)
        metrics = {}
        generator, generator_opt = state.generator, state.generator_opt
        if update_generator:
            (_, (x0_gen, gm)), grads = gen_grads(generator, state.critic, teacher, (noise, cond, uncond, extra), k,
                                                 k_gen)
            updates, generator_opt = gen_tx.update(grads, generator_opt, generator)
            generator = optax.apply_updates(generator, updates)
            metrics.update(gm, gen_grad_norm=optax.tree.norm(grads),
                           gen_lr=gen_schedule(state.step // cfg.dmd.critic_steps))
        elif n_micro == 1:
            x0_gen = sg(generate(losses.velocity, generator, noise, cond, extra, losses.sigmas, k))
        else:
            x0s = jax.lax.map(lambda m: sg(generate(losses.velocity, generator, m[0], m[1], m[2], losses.sigmas, k)),
                              micro_batches((noise, cond, extra), n_micro))
            x0_gen = x0s.swapaxes(0, 1).reshape(-1, *x0s.shape[2:])
        (_, cm), grads = critic_grads(state.critic, (x0_gen, x_real, cond, extra), null, k_critic)
        updates, critic_opt = critic_tx.update(grads, state.critic_opt, state.critic)
        critic = optax.apply_updates(state.critic, updates)
        metrics.update(cm, critic_grad_norm=optax.tree.norm(grads), critic_lr=critic_schedule(state.step),
                       sim_steps=k)
        return DMDState(state.step + 1, generator, generator_opt, critic, critic_opt), metrics

    return dmd_step
