"""Evidence that DMD2 distillation works: a tiny I2V DiT teacher trained with flow matching on a
synthetic conditional distribution of small latent videos, distilled into a 4-step generator.

The data: latent videos of 3 frames × 4×4 × 4 channels for 4 prompts. Frame 0 (the reference image) is
the prompt's mean image plus noise; frames 1 and 2 add one of 2⁵ motions, Σ_b s_b·M_b with random signs
s_b = ±1 over the prompt's 5 motion patterns, plus a little noise. Given prompt and reference the future
is a 32-mode mixture whose modes are too close to tell apart at the last Euler step of the release's
4-step schedule (σ = 0.625): 4-step sampling averages them (blurs), 50-step sampling does not. The
reference enters as the DiT's 33-channel-style input (here 2·4+1) and as one "image token" (a fixed
projection of it) ahead of the text tokens.

Reported: the sliced Wasserstein distance (512 random directions) between the motion (video minus
reference) of 1024 held-out videos and of videos generated for their prompts and references, per
prompt and averaged, for the teacher with 50 and with 4 Euler steps and for the 4-step student, all with
the release's sampler (`m141jax.sampling`, shift 5); `floor` is the distance between two independent
held-out sets (sampling noise); ratio = teacher4 / student4.

    python benchmarks/distill_toy.py [--teacher-steps 3000] [--distill-steps 900] [--seed 0]
    RESULT distill_toy teacher50=… teacher4=… student4=… floor=… ratio=… teacher_s=… distill_s=… total_s=…
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from m141jax import sampling
from m141jax.config import DiTConfig
from m141jax.models.conditioning import Conditioning
from m141jax.models.dit import init_params
from m141jax.train import dmd, flow
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
from m141jax.train.distance import sliced_wasserstein

F, H, W, C = 3, 4, 4, 4  # latent frames, height, width, channels
K, TEXT, TEXT_DIM, POOLED = 4, 3, 32, 16  # prompts, text tokens, their widths
BITS, AMPLITUDE, NOISE = 5, 0.4, 0.05  # motion: one of 2^BITS sign patterns per prompt, + small noise
HELD_OUT = 99  # the held-out set's data seed
MODEL = DiTConfig(in_channels=2 * C + 1, out_channels=C, hidden_size=64, num_heads=4, double_blocks=2,
                  single_blocks=2, rope_axes=(4, 6, 6), text_dim=TEXT_DIM, pooled_dim=POOLED,
                  param_dtype="fp32", dtype="fp32", attention="xla")


class ToyVideos:
    """The synthetic conditional distribution (a grain source); sample i depends only on (seed, i)."""

    def __init__(self, n: int, seed: int):
        world = np.random.default_rng(1234)  # the prompts' fixed parameters, shared by all splits
        self.mean = world.standard_normal((K, 1, H, W, C)).astype(np.float32)
        self.motion = (world.standard_normal((K, BITS, F - 1, H, W, C)) * AMPLITUDE / np.sqrt(BITS)).astype(np.float32)
        self.text = world.standard_normal((K, TEXT, TEXT_DIM)).astype(np.float32)
        self.pooled = world.standard_normal((K, POOLED)).astype(np.float32)
        self.image_proj = (world.standard_normal((H * W * C, TEXT_DIM)) / np.sqrt(H * W * C)).astype(np.float32)
        self.null_text = world.standard_normal((TEXT, TEXT_DIM)).astype(np.float32)
        self.null_pooled = world.standard_normal(POOLED).astype(np.float32)
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, int(i)])
        k = int(rng.integers(K))
        signs = rng.choice([-1.0, 1.0], BITS).astype(np.float32)
        x0 = self.mean[k] + 0.5 * rng.standard_normal((1, H, W, C), dtype=np.float32)
        future = x0 + np.tensordot(signs, self.motion[k], 1) + NOISE * rng.standard_normal((F - 1, H, W, C))
        image_token = (x0.reshape(-1) @ self.image_proj)[None]
        return {"latents": np.concatenate([x0, future]).astype(np.float32), "ref_latents": x0,
                "text_states": np.concatenate([image_token, self.text[k]]).astype(np.float32),
                "text_mask": np.ones(1 + TEXT, np.int32), "text_states_2": self.pooled[k], "prompt": np.int32(k)}

    def null(self):
        return {"text_states": self.null_text, "text_mask": np.array([1] + [0] * (TEXT - 1), np.int32),
                "text_states_2": self.null_pooled}

    def batch(self, lo: int, hi: int):
        items = [self[i] for i in range(lo, hi)]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}


def conditional_distance(videos, ref_videos, refs, ref_refs, prompts, ref_prompts, seed: int = 0) -> float:
    """Sliced Wasserstein distance between the motion (video − its reference frame) of two sets, per
    prompt, averaged over prompts (equal counts per prompt are matched by truncation)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(K):
        a, b = videos[prompts == k] - refs[prompts == k], ref_videos[ref_prompts == k] - ref_refs[ref_prompts == k]
        n = min(len(a), len(b))
        out.append(sliced_wasserstein(a[:n], b[:n], rng))
    return float(np.mean(out))


def key(args, i: int):
    """The i-th of the run's four PRNG keys (teacher init, teacher steps, critic init, distill steps)."""
    return jax.random.PRNGKey(4 * args.seed + i)


def train_teacher(args, source):
    cfg = TrainConfig(model=MODEL, flow=FlowConfig(n_image_tokens=1, cfg_dropout=0.1),
                      optimizer=OptimizerConfig(learning_rate=args.teacher_lr, warmup_steps=100, decay="cosine",
                                                final_lr_ratio=0.1, weight_decay=0.0),
                      data=DataConfig(batch_size=args.batch, seed=2 * args.seed), run=RunConfig(steps=args.teacher_steps))
    state = flow.init_train_state(cfg, init_params(MODEL, key(args, 0)))
    step = jax.jit(flow.make_train_step(cfg), donate_argnums=0)
    it = make_iterator(source, cfg.data)
    base = key(args, 1)
    for i in range(cfg.run.steps):
        state, m = step(state, next(it), jax.random.fold_in(base, i))
        if (i + 1) % 500 == 0:
            print(f"teacher step {i + 1}: loss={float(m['loss']):.4f}", flush=True)
    return state.params


def distill(args, source, teacher):
    cfg = DistillConfig(model=MODEL, teacher_dtype="fp32", n_image_tokens=1,
                        dmd=DMDConfig(real_guidance=1.0, critic_steps=args.critic_steps, gan_sigma_max=0.5,
                                      fake_flow=FlowConfig(sigma_sampling="uniform", cfg_dropout=0.0,
                                                           n_image_tokens=1)),
                        generator_optimizer=OptimizerConfig(learning_rate=args.gen_lr, decay="cosine",
                                                            weight_decay=0.0),
                        critic_optimizer=OptimizerConfig(learning_rate=args.critic_lr, decay="cosine",
                                                         weight_decay=0.0),
                        data=DataConfig(batch_size=args.batch, seed=2 * args.seed + 1),
                        run=RunConfig(steps=args.distill_steps))
    state = dmd.init_dmd_state(cfg, teacher, key(args, 2))
    step = jax.jit(dmd.make_dmd_step(cfg), static_argnums=4, donate_argnums=0)
    it = make_iterator(source, cfg.data)
    base = key(args, 3)
    for i in range(cfg.run.steps):
        state, m = step(state, teacher, next(it), jax.random.fold_in(base, i), dmd.generator_turn(i, cfg.dmd))
        if i % 150 == 0:  # a generator turn: all the losses
            print(f"distill step {i + 1}: " + " ".join(f"{k}={float(v):.4g}" for k, v in sorted(m.items())),
                  flush=True)
    return state.generator


def evaluate(params_by_name: dict, n: int) -> dict[str, float]:
    """Conditional distances to n held-out videos of the Euler samples of each (params, steps)."""
    held = ToyVideos(2 * n, seed=HELD_OUT)
    ref, other = held.batch(0, n), held.batch(n, 2 * n)
    noise = jax.random.normal(jax.random.PRNGKey(7), ref["latents"].shape)
    text = Conditioning.from_batch(ref)

    def generate(params, steps):  # the release's sampler, no CFG (guidance 1)
        return sampling.sample(params, MODEL, noise, text, sigmas=sampling.schedule(steps, 5.0),
                               ref_latents=ref["ref_latents"])

    def distance(videos):
        return conditional_distance(videos, ref["latents"], ref["ref_latents"], ref["ref_latents"], ref["prompt"],
                                    ref["prompt"])

    out = {name: distance(np.asarray(generate(params, steps))) for name, (params, steps) in params_by_name.items()}
    out["floor"] = conditional_distance(other["latents"], ref["latents"], other["ref_latents"], ref["ref_latents"],
                                        other["prompt"], ref["prompt"])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--distill-steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--gen-lr", type=float, default=1e-4)
    p.add_argument("--critic-lr", type=float, default=1e-4)
    p.add_argument("--critic-steps", type=int, default=5)
    p.add_argument("--eval", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="seeds the training data, initialisation and noise")
    args = p.parse_args()
    if not 0 <= args.seed != HELD_OUT:
        p.error(f"--seed must be a non-negative integer other than {HELD_OUT} (the held-out set's)")
    t0 = time.perf_counter()
    train_src = ToyVideos(100_000, seed=args.seed)
    teacher = train_teacher(args, train_src)
    t1 = time.perf_counter()
    generator = distill(args, train_src, teacher)
    t2 = time.perf_counter()
    results = evaluate({"teacher50": (teacher, 50), "teacher4": (teacher, 4), "student4": (generator, 4)}, args.eval)
    results["ratio"] = results["teacher4"] / results["student4"]
    print("RESULT distill_toy " + " ".join(f"{k}={v:.4f}" for k, v in results.items())
          + f" teacher_s={t1 - t0:.1f} distill_s={t2 - t1:.1f} total_s={time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
