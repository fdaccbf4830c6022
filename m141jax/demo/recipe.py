"""How the demo models are made: their configs and the training stages of `tools/train_demo.py`, which
the demo benchmarks reuse.

- the VAE: the causal 3D VAE at 3 blocks (4× spatial, 4× temporal compression) to 8 latent channels,
  trained on whole 17-frame clips (each rolled on the torus by a random offset, which keeps it a valid
  clip): its GroupNorms normalise over every frame, so a VAE trained on shorter crops degrades on the
  later latent frames of a whole clip. The pixels of the moving object weigh 1 + FOREGROUND_WEIGHT in
  the reconstruction loss (it covers a few percent of the frame and is otherwise learned last), and so do
  the background pixels within FOREGROUND_MARGIN px of it;
- the DiTs: HunyuanVideo-style MMDiTs of width 96 (6 heads) reading the demo encoders' 64-wide text
  states and 32-wide CLIP vector. `I2V` (3 double-stream, 2 single-stream blocks) has the release's
  2C+1-channel input (noise ‖ reference ‖ mask); `T2V` (2 double-stream, 1 single-stream block) is the
  text-to-video form with the guidance embedding, used at one latent frame as the text-to-image stage
  and, at the I2V's depth (`T2V_CLIPS`), in `benchmarks/t2v_vs_i2v.py` on whole clips;
- `train_flow`: flow matching (`m141jax.train.flow`) with CFG dropout to the empty prompt, σ drawn
  logit-normal with the time shift SHIFT the models are sampled with (the direction of motion, like all
  coarse structure, is decided at high σ, which a plain logit-normal rarely draws);
- `distill`: DMD2 (`m141jax.train.dmd`) into the 4-step generator, CFG distilled from the teacher;
- `sample`: the release's Euler sampler (`m141jax.sampling`) with the demo's shift, the CFG negative
  branch being the empty prompt the models were trained to be unconditional on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from m141jax import media, sampling
from m141jax.config import DiTConfig, VAEConfig
from m141jax.demo import SHIFT
from m141jax.models import dit as dit_lib
from m141jax.models import vae as vae_lib
from m141jax.models.conditioning import Conditioning
from m141jax.train import dmd, flow
from m141jax.train import vae as vae_train
from m141jax.train.config import (
    DataConfig,
    DistillConfig,
    DMDConfig,
    FlowConfig,
    OptimizerConfig,
    RunConfig,
    TrainConfig,
)
from m141jax.train.data import make_iterator

LATENT = 8  # latent channels
VAE = VAEConfig(block_out_channels=(8, 16, 32), spatial_compression_ratio=4, norm_num_groups=4, latent_channels=LATENT,
                layers_per_block=1, mid_block_add_attention=False, sample_size=32, sample_tsize=32,
                param_dtype="fp32", dtype="fp32")
VAE_STEPS = 5400  # clip steps (each followed by an image step) of tools/train_demo.py's VAE stage
VAE_LR = 1e-3  # the VAE's peak learning rate (Adam, warm-up, then cosine to 5 %)
KL_WEIGHT = 1e-4
FOREGROUND_WEIGHT = 10.0
# px around the object that weigh as much (`m141jax.train.vae.foreground_weights`): 2 halved the decoder's
# outward bleed and sharpened the edges, but the clips' shape did not follow (README); none
FOREGROUND_MARGIN = 0
EDGE_WEIGHT = 0.0  # γ of the gradient term (`m141jax.train.vae.gradient_error`)
# α of the decoder's latent noise (`m141jax.train.vae.noised_latents`); 0.5 made the decoder robust to noise
# but the DiTs' clips no better, and the VAE's own reconstructions worse (README)
LATENT_NOISE = 0.0
IMAGE_BATCH = 16  # single frames of the VAE's image step after each clip step (0: clips only)
_DIT = dict(out_channels=LATENT, hidden_size=96, num_heads=6, double_blocks=2, single_blocks=1, refiner_blocks=1,
            rope_axes=(4, 6, 6), text_dim=64, pooled_dim=32, param_dtype="fp32", dtype="fp32")
T2V = DiTConfig(in_channels=LATENT, guidance_embed=True, **_DIT)
# the image-to-video DiTs are deeper (3 double-stream, 2 single-stream blocks): at equal training time a
# deeper teacher keeps the object's shape and oneness better; 3 + 2 keeps the folder under 20 MB
I2V = DiTConfig(in_channels=2 * LATENT + 1, **{**_DIT, "double_blocks": 3, "single_blocks": 2})

# the T2V form at the I2V's depth: a text-to-video teacher of whole clips comparable to the I2V one
T2V_CLIPS = dataclasses.replace(T2V, double_blocks=I2V.double_blocks, single_blocks=I2V.single_blocks)

N_IMAGE_TOKENS = 17  # VLM image tokens ahead of the prompt tokens (the demo encoders keep 17 of 65)
GUIDANCE = 3.0  # the teacher's CFG scale, distilled into the student
VIDEOS = 1200  # training clips of tools/train_demo.py
DISTILL_STEPS = 900  # DMD2 steps of the 4-step student
STUDENT_LR = 1e-4  # peak learning rate of the student and its critic (cosine to a tenth)
# flow-matching steps of the text-to-image DiT: 32000 instead of 16000 raised its images' shape on the development
# captions from 0.66 to 0.83, 48000 to 0.89 (README)
T2I_STEPS = 48000
# flow-matching steps of the image-to-video teacher: 12000 instead of 6000 raised its shape on the development
# clips from 0.69 to 0.74 and on its own training clips from 0.74 to 0.82 (README)
TEACHER_STEPS = 12000
# peak learning rates of the two flow-matching stages (warm-up, then cosine to a tenth). The teacher underfit
# at 1e-3: twice the rate raised its shape on the development clips from 0.44 to 0.60 in the same steps (on the
# earlier 10–14 px shapes); 3e-3 instead of 2e-3 raised the student's shape from the true first frames from 0.80 to 0.86,
# and 4e-3 lowered it to 0.82.
# The text-to-image DiT at 2e-3 draws the shape better (images 0.57 -> 0.62, clips from
# text 0.54 -> 0.57) but one object in every frame less often (0.90 -> 0.88, under its target; README)
T2I_LR = 1e-3
TEACHER_LR = 3e-3
T2I_GUIDANCE = 1.0  # the embedded guidance the T2V-form models are trained and run with
SIGMA_SAMPLING = "logit_normal"  # the density of the DiTs' training σ's (`FlowConfig.sigma_sampling`), then shift SHIFT
EMA_DECAY = 0.0  # decay of the parameter EMA the flow-matching stages return (`TrainConfig.ema_decay`; 0: none)


def _optimizer(lr: float, warmup: int = 0) -> OptimizerConfig:
    return OptimizerConfig(learning_rate=lr, warmup_steps=warmup, decay="cosine", final_lr_ratio=0.1, weight_decay=0.0)


def _bar(n: int, desc: str, progress: bool):
    return tqdm(range(n), desc=desc, disable=not progress, dynamic_ncols=True)


def train_vae(videos: np.ndarray, steps: int, batch: int = 2, lr: float = VAE_LR, seed: int = 0,
              progress: bool = True, cfg: VAEConfig = VAE, kl_weight: float = KL_WEIGHT,
              edge_weight: float = EDGE_WEIGHT, image_batch: int = IMAGE_BATCH,
              latent_noise: float = LATENT_NOISE,
              foreground_margin: int = FOREGROUND_MARGIN) -> tuple[VAEConfig, dict]:
    """The demo VAE (`cfg` and the loss weights: others to try) trained on uint8 videos [N, F, H, W, 3]
    rolled on the torus; with `image_batch`, each of the `steps` steps on `batch` clips is followed by one
    on `image_batch` single frames (random frames of random clips), which trains the one-frame path the
    text-to-image stage's images and the reference latents take, as video VAEs are trained on images and
    videos together. Its config carries the per-channel mean and std of the posterior means of (up to)
    256 videos, which normalise the latents."""
    updates = steps * (2 if image_batch else 1)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(20, updates - 1), updates, 0.05 * lr),
                                b2=0.99))
    state = vae_train.init_vae_state(vae_lib.init_params(cfg, jax.random.PRNGKey(seed)), tx)
    step = jax.jit(vae_train.make_vae_step(cfg, tx, kl_weight, FOREGROUND_WEIGHT, edge_weight, latent_noise,
                                           foreground_margin),
                   donate_argnums=0)
    rng, base = np.random.default_rng(seed), jax.random.PRNGKey(seed + 1)

    def rolled(x):
        return media.to_signed(np.roll(x, tuple(int(r) for r in rng.integers(0, videos.shape[2], 2)), axis=(2, 3)))

    bar = _bar(steps, "vae", progress)
    for i in bar:
        state, m = step(state, rolled(videos[rng.integers(0, len(videos), batch)]), jax.random.fold_in(base, i))
        if image_batch:
            frames = videos[rng.integers(0, len(videos), image_batch), rng.integers(0, videos.shape[1], image_batch)]
            state, _ = step(state, rolled(frames[:, None]), jax.random.fold_in(base, steps + i))
        if i % 10 == 0:
            bar.set_postfix(l1=f"{float(m['l1']):.4f}")
    sample = media.to_signed(videos[:256])
    mean, std = vae_train.latent_statistics(state.params, cfg, (sample[i:i + 16] for i in range(0, len(sample), 16)))
    return dataclasses.replace(cfg, latents_mean=mean, latents_std=std), jax.device_get(state.params)


def train_flow(model: DiTConfig, source, steps: int, n_image_tokens: int, batch: int = 16, lr: float = T2I_LR,
               seed: int = 0, desc: str = "flow", progress: bool = True,
               sigma_sampling: str = SIGMA_SAMPLING, ema_decay: float = EMA_DECAY) -> dict:
    """A DiT trained from scratch by flow matching on a source of latents + conditioning (CFG dropout 0.1,
    σ drawn from `sigma_sampling`'s density at shift SHIFT); with `ema_decay` > 0, the EMA of its parameters."""
    cfg = TrainConfig(model=model, flow=FlowConfig(sigma_sampling=sigma_sampling, n_image_tokens=n_image_tokens,
                                                   cfg_dropout=0.1, shift=SHIFT),
                      optimizer=_optimizer(lr, warmup=100), data=DataConfig(batch_size=batch, seed=seed),
                      run=RunConfig(steps=steps), ema_decay=ema_decay)
    state = flow.init_train_state(cfg, dit_lib.init_params(model, jax.random.PRNGKey(seed)))
    step = jax.jit(flow.make_train_step(cfg), donate_argnums=0)
    batches, base = make_iterator(source, cfg.data), jax.random.PRNGKey(seed + 1)
    bar = _bar(steps, desc, progress)
    for i in bar:
        state, m = step(state, next(batches), jax.random.fold_in(base, i))
        if i % 20 == 0:
            bar.set_postfix(loss=f"{float(m['loss']):.4f}")
    return jax.device_get(state.params if state.ema is None else state.ema)


def distill(model: DiTConfig, teacher: dict, source, steps: int, n_image_tokens: int, batch: int = 16,
            lr: float = STUDENT_LR, seed: int = 0, desc: str = "dmd2", progress: bool = True,
            every: int = 0, callback: Callable[[int, dict], None] | None = None) -> dict:
    """The 4-step DMD2 generator of `teacher` (CFG scale GUIDANCE distilled, shift SHIFT); with `every`,
    callback(step, generator params) runs before the first step and every `every` steps after it."""
    fake_flow = FlowConfig(sigma_sampling="uniform", cfg_dropout=0.0, n_image_tokens=n_image_tokens)
    cfg = DistillConfig(model=model, teacher_dtype="fp32", n_image_tokens=n_image_tokens,
                        dmd=DMDConfig(shift=SHIFT, real_guidance=GUIDANCE, critic_steps=5, gan_sigma_max=0.5,
                                      fake_flow=fake_flow),
                        generator_optimizer=_optimizer(lr), critic_optimizer=_optimizer(lr),
                        data=DataConfig(batch_size=batch, seed=seed), run=RunConfig(steps=steps))
    state = dmd.init_dmd_state(cfg, teacher, jax.random.PRNGKey(seed))
    step = jax.jit(dmd.make_dmd_step(cfg), static_argnums=4, donate_argnums=0)
    batches, base = make_iterator(source, cfg.data), jax.random.PRNGKey(seed + 1)
    bar = _bar(steps, desc, progress)
    for i in bar:
        if every and i % every == 0:
            callback(i, state.generator)
        state, m = step(state, teacher, next(batches), jax.random.fold_in(base, i), dmd.generator_turn(i, cfg.dmd))
        if i % 20 == 0:
            bar.set_postfix(dm=f"{float(m['gen_loss_dm']):.4f}", fake=f"{float(m['critic_loss_fake']):.4f}")
    if every:
        callback(steps, state.generator)
    return jax.device_get(state.generator)


def sample(model: DiTConfig, params, cond: dict, null: dict, steps: int, n_image_tokens: int,
           guidance: float = 1.0, seed: int = 0, guidance_min_sigma: float = 0.0) -> jax.Array:
    """Latents [B, F, h, w, C] from noise by `steps` Euler steps at shift SHIFT for a batch of conditioning
    (`latents` gives the shape; `ref_latents`, `guidance` when the model takes them), with CFG scale
    `guidance` against the empty prompt `null` (on the steps from σ ≥ `guidance_min_sigma`)."""
    cond = {k: jnp.asarray(v) for k, v in cond.items()}
    text = Conditioning.from_batch(cond)
    b = text.text_states.shape[0]
    uncond = flow.drop_text(text, jnp.ones((b,), bool), Conditioning.from_batch(jax.tree.map(jnp.asarray, null)),
                            n_image_tokens)
    noise = jax.random.normal(jax.random.PRNGKey(seed), cond["latents"].shape, jnp.float32)
    embedded = float(cond["guidance"][0]) / 1000.0 if model.guidance_embed else None
    return sampling.sample(params, model, noise, text, sigmas=sampling.schedule(steps, SHIFT),
                           ref_latents=cond.get("ref_latents"), neg_text=uncond, guidance_scale=guidance,
                           guidance_min_sigma=guidance_min_sigma, embedded_guidance=embedded)
