"""How good can the demo's DiTs be on the shipped VAE? One DiT stage of `tools/train_demo.py` trained again
(optionally at another size, length or learning rate) on the latents of a checkpoint folder's VAE and
encoders, then scored on the development split's clips of `benchmarks/demo_quality.py` (`m141jax.demo.quality`:
held-out and training captions; the held-out clips' noise is the same, the training captions' not, as they
are drawn here in one batch sequence after the held-out ones).
Tuning a DiT this way skips the VAE stage, two thirds of the script's time.

- `--stage t2i`: the text-to-image DiT (the T2V form at one latent frame) on the training clips' first
  frames; scored on its images for the split's captions (`quality.image_accuracies`: colour, shape,
  exactly one object) with `m141jax generate --preset demo`'s text-to-image settings, its CFG scale
  against the empty prompt included (`--guidance`: another, 1 = none);
- `--stage teacher`: the image-to-video teacher on the clips; scored on its clips from the split's true
  first frames, 50 Euler steps with CFG `--guidance` (default: the scale the student distils), by the
  demo's targets (`quality.metrics`) and the shape per latent frame (`quality.shape_by_latent_frame`),
  and on the same measures for `--fit-clips` of its own training clips (does it fit what it saw?);
- `--stage student`: the 4-step student distilled by DMD2 from the folder's teacher (`teacher/`), scored
  as the teacher is but in 4 steps without CFG (`--guidance` 1), as `m141jax generate` runs it.

    python benchmarks/demo_dit.py --stage t2i|teacher|student [--steps N] [--set hidden_size=128 --set num_heads=8]
                                  [--lr LR] [--ema-decay D] [--guidance G] [--per-combination 12]
                                  [--training-per-combination 3] [--fit-clips 96] [--videos 1200]
    RESULT demo_dit stage=… steps=… config=… train_s=… ms_per_step=… split=dev n=… colour=… shape=… …
    RESULT demo_dit_shape_by_latent_frame stage=teacher|student clips=dev|fit f0=… f1=… …
    RESULT demo_dit_fit stage=teacher|student n=… colour=… shape=… …

`--steps 0` scores the checkpoint folder's own DiT of the stage (`t2i/`, `teacher/` or the student `dit/`)
without training. `--set`, `--sigma-sampling` and `--ema-decay` are the flow-matching stages' (t2i, teacher).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from common import override, result  # noqa: E402

from m141jax import checkpoint, demo  # noqa: E402
from m141jax.data import shapes  # noqa: E402
from m141jax.demo import data as demo_data  # noqa: E402
from m141jax.demo import quality, recipe  # noqa: E402
from m141jax.train.config import SIGMA_SAMPLINGS  # noqa: E402

# stage: (model, steps, learning rate, CFG scale of the scoring, sampling steps of the scoring, folder)
STAGES = {"t2i": (recipe.T2V, recipe.T2I_STEPS, recipe.T2I_LR, demo.GENERATE["t2i_cfg"], None, "t2i"),
          "teacher": (recipe.I2V, recipe.TEACHER_STEPS, recipe.TEACHER_LR, recipe.GUIDANCE, 50, "teacher"),
          "student": (recipe.I2V, recipe.DISTILL_STEPS, recipe.STUDENT_LR, 1.0, 4, "dit")}


def subset(p: demo_data.Prepared, n: int) -> demo_data.Prepared:
    """The first n clips of prepared data."""
    rows = lambda d: {k: v[:n] for k, v in d.items()}  # noqa: E731
    return dataclasses.replace(p, latents=p.latents[:n], ref_latents=p.ref_latents[:n], image_text=rows(p.image_text),
                               text=rows(p.text))


def train(stage: str, cfg, prepared: demo_data.Prepared, steps: int, lr: float, sigma_sampling: str,
          ema_decay: float, teacher: dict | None) -> dict:
    if stage == "student":
        return recipe.distill(cfg, teacher, demo_data.i2v_source(prepared), steps, recipe.N_IMAGE_TOKENS, lr=lr,
                              desc="student")
    if stage == "t2i":
        source = demo_data.t2v_source(prepared, recipe.T2I_GUIDANCE, image=True)
        return recipe.train_flow(cfg, source, steps, 0, lr=lr, desc="t2i", sigma_sampling=sigma_sampling,
                                 ema_decay=ema_decay)
    return recipe.train_flow(cfg, demo_data.i2v_source(prepared), steps, recipe.N_IMAGE_TOKENS, lr=lr, desc="teacher",
                             sigma_sampling=sigma_sampling, ema_decay=ema_decay)


def scores(stage: str, cfg, params, vae, prepared: demo_data.Prepared, truth: np.ndarray, captions: list[str],
           guidance: float) -> tuple[dict[str, float], list[float]]:
    """(the stage's scores, the shape per latent frame: image-to-video only) of a DiT on prepared clips."""
    if stage == "t2i":
        images = quality.text_to_image(cfg, params, vae, prepared, guidance=guidance)
        return quality.image_accuracies(images, captions), []
    clips = quality.generate(cfg, params, vae, prepared, STAGES[stage][4], guidance)
    return quality.metrics(clips, captions, truth), quality.shape_by_latent_frame(clips, captions)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=sorted(STAGES), required=True)
    p.add_argument("--checkpoints", default=str(demo.CHECKPOINTS), help="the folder whose VAE and encoders to use")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's; 0: score the folder's DiT)")
    p.add_argument("--set", action="append", default=[], help="a DiTConfig field, e.g. hidden_size=128")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's for the stage)")
    p.add_argument("--sigma-sampling", choices=SIGMA_SAMPLINGS, default=recipe.SIGMA_SAMPLING,
                   help="the density of the training σ's, shifted by the demo's shift (default: the recipe's)")
    p.add_argument("--ema-decay", type=float, default=recipe.EMA_DECAY,
                   help="score the EMA of the parameters at this decay (default: the recipe's; 0: the parameters)")
    p.add_argument("--guidance", type=float,
                   help="CFG scale of the scoring (default: t2i generate's t2i_cfg, teacher 3, student 1 = none)")
    p.add_argument("--per-combination", type=int, default=12, help="dev clips per held-out combination (8 of them)")
    p.add_argument("--training-per-combination", type=int, default=3,
                   help="dev clips per training combination (40 of them)")
    p.add_argument("--fit-clips", type=int, default=96, help="training clips the image-to-video DiT is also scored on")
    p.add_argument("--videos", type=int, default=recipe.VIDEOS, help="training clips (the recipe's: tools/train_demo.py's)")
    args = p.parse_args()
    base, default_steps, default_lr, default_guidance, _, folder = STAGES[args.stage]
    lr = default_lr if args.lr is None else args.lr
    steps = default_steps if args.steps is None else args.steps
    guidance = default_guidance if args.guidance is None else args.guidance
    root = Path(args.checkpoints)
    if args.stage == "student" and (args.set or args.sigma_sampling != recipe.SIGMA_SAMPLING or args.ema_decay):
        raise SystemExit("--set, --sigma-sampling and --ema-decay are for the flow-matching stages (t2i, teacher)")
    models = quality.load_models(root)
    clips = [quality.split_clips("dev", "held_out", args.per_combination),
             quality.split_clips("dev", "training", args.training_per_combination)]
    truth, captions = np.concatenate([v for v, _ in clips]), [c for _, cs in clips for c in cs]
    dev = demo_data.prepare(models.vae, models.encoders, truth, captions, progress=False)
    data = shapes.ShapesDataset(args.videos, "train", seed=0)  # tools/train_demo.py's clips (its first N)
    items = [data[i] for i in range(len(data))]
    videos, train_captions = np.stack([v for v, _ in items]), [c for _, c in items]
    if steps:
        if args.stage == "student":  # the generator starts as a copy of the folder's teacher: its architecture
            _, cfg, teacher = checkpoint.load(root / "teacher", ("dit",), "fp32")
        else:
            cfg, teacher = override(base, args.set), None
        prepared = demo_data.prepare(models.vae, models.encoders, videos, train_captions, progress=False)
        start = time.perf_counter()
        params = train(args.stage, cfg, prepared, steps, lr, args.sigma_sampling, args.ema_decay, teacher)
        train_s = time.perf_counter() - start
    else:
        if args.set:
            raise SystemExit("--set needs training (--steps > 0)")
        _, cfg, params = checkpoint.load(root / folder, ("dit",), "fp32")
        prepared, train_s = None, 0.0
    dev_scores, by_frame = scores(args.stage, cfg, params, models.vae, dev, truth, captions, guidance)
    result("demo_dit", stage=args.stage, steps=steps, config=",".join(args.set) or "recipe", lr=lr,
           sigma_sampling=args.sigma_sampling, ema_decay=args.ema_decay,
           guidance=guidance, train_s=train_s, ms_per_step=1000 * train_s / max(steps, 1), split="dev",
           n=len(captions), **dev_scores)
    lines = {"dev": by_frame}
    if args.stage != "t2i" and args.fit_clips:
        n = min(args.fit_clips, len(videos))
        if prepared is None:
            prepared = demo_data.prepare(models.vae, models.encoders, videos[:n], train_captions[:n], progress=False)
        fit_scores, lines["fit"] = scores(args.stage, cfg, params, models.vae, subset(prepared, n), videos[:n],
                                          train_captions[:n], guidance)
        result("demo_dit_fit", stage=args.stage, n=n, **fit_scores)
    for name, values in lines.items():
        if values:
            result("demo_dit_shape_by_latent_frame", stage=args.stage, clips=name,
                   **{f"f{i}": v for i, v in enumerate(values)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
