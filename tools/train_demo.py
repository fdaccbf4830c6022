"""Train the demo models from nothing with m141jax's own code and write the checkpoint folder that
`m141jax generate --preset demo` reads (default: the package's m141jax/demo/checkpoints).

Stages (sizes and settings in `m141jax/demo/recipe.py`, summarised in configs/demo/recipe.yaml), each
deterministic from --seed:
1. encoders: the word-level tokenizers and the frozen random LLaVA / CLIP (`m141jax.demo.encoders`);
2. data: --videos training clips of the shapes dataset (17 frames of 32×32, the 40 training captions);
3. vae: the tiny causal VAE trained on whole clips, its per-channel latent statistics measured;
4. latents: x₀, reference latents and conditioning of every clip (`m141jax.demo.data`);
5. t2i: the T2V-architecture DiT trained by flow matching on the first frames (one latent frame):
   the text-to-image stage;
6. teacher: the image-to-video DiT trained by flow matching on the clips;
7. student: its 4-step generator distilled with DMD2 (teacher CFG scale 3 distilled), shipped as dit/.
The teacher is kept in teacher/ for the quality harness (`benchmarks/demo_quality.py`).

The folder is written under a temporary name and renamed when complete (each checkpoint is also
written atomically). Prints the seconds of each stage and the folder's size. `--vae-from DIR` takes
the VAE stage's result from an earlier run's folder (DIR may be --out: it is replaced only at the end),
for work on the later stages: the VAE stage is two thirds of the time and gives the same VAE on every run of the same code.
`--teacher-from DIR` takes the teacher likewise (its stage is most of the rest), for work on the text-to-image
stage or the student.

    python tools/train_demo.py [--out DIR] [--vae-from DIR] [--teacher-from DIR]
    RESULT train_demo encoders_s=… data_s=… vae_s=… latents_s=… t2i_s=… teacher_s=… student_s=… total_s=… mb=…
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from m141jax import checkpoint, demo
from m141jax.components import Component
from m141jax.config import to_json_dict
from m141jax.data import shapes
from m141jax.demo import data as demo_data
from m141jax.demo import encoders as demo_encoders
from m141jax.demo import recipe


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def _reused(folder: Path, name: str, kind: str, flag: str):
    """(config, params) of checkpoint `name` of an earlier run's folder, or a one-line exit naming `flag`."""
    try:
        _, cfg, params = checkpoint.load(folder / name, (kind,), "fp32")
    except (checkpoint.CheckpointError, OSError) as e:
        raise SystemExit(f"{flag} {folder}: {e}") from None
    return cfg, params


def reused_vae(folder: Path):
    """(config, params) of the VAE of an earlier run's checkpoint folder, which must have the recipe's
    architecture (its latent statistics come with it)."""
    cfg, params = _reused(folder, "vae", "vae", "--vae-from")
    statistics = {k: getattr(recipe.VAE, k) for k in ("latents_mean", "latents_std")}
    if dataclasses.replace(cfg, **statistics) != recipe.VAE:
        raise SystemExit(f"{folder}/vae is not the recipe's VAE (another architecture); train it instead")
    return cfg, params


def reused_teacher(folder: Path) -> dict:
    """The params of the image-to-video teacher of an earlier run's checkpoint folder, which must have the
    recipe's architecture."""
    cfg, params = _reused(folder, "teacher", "dit", "--teacher-from")
    if cfg != recipe.I2V:
        raise SystemExit(f"{folder}/teacher is not the recipe's teacher (another architecture); train it instead")
    return params


def train(root: Path, args, seconds: dict[str, float], vae=None, teacher=None) -> None:
    """Every stage, writing into root (a fresh folder); `vae`: (config, params) to use instead of the VAE stage,
    `teacher`: params to use instead of the teacher stage."""
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = now - clock
        clock = now
        print(f"{stage}: {seconds[stage]:.1f} s", flush=True)

    progress = not args.quiet
    demo_encoders.write_encoders(root, seed=args.seed)
    enc = demo_encoders.load(root)
    if len(enc.vlm_prompt.keep) != recipe.N_IMAGE_TOKENS:
        raise RuntimeError(f"the demo encoders give {len(enc.vlm_prompt.keep)} image tokens, the recipe expects "
                           f"{recipe.N_IMAGE_TOKENS}")
    lap("encoders")

    dataset = shapes.ShapesDataset(args.videos, "train", seed=args.seed)
    items = [dataset[i] for i in range(len(dataset))]
    videos, captions = np.stack([v for v, _ in items]), [c for _, c in items]
    lap("data")

    if vae is not None:
        vae_cfg, vae_params = vae
    else:
        vae_cfg, vae_params = recipe.train_vae(videos, args.vae_steps, lr=args.vae_lr, seed=args.seed, progress=progress,
                                               latent_noise=args.latent_noise,
                                               foreground_margin=args.foreground_margin)
    checkpoint.save(root / "vae", "vae", to_json_dict(vae_cfg), vae_params)
    print(f"vae latent means {np.round(vae_cfg.latents_mean, 2)}, stds {np.round(vae_cfg.latents_std, 2)}", flush=True)
    lap("vae")

    prepared = demo_data.prepare(Component(vae_cfg, jax.device_put(vae_params)), enc, videos, captions, progress)
    lap("latents")

    t2i = recipe.train_flow(recipe.T2V, demo_data.t2v_source(prepared, recipe.T2I_GUIDANCE, image=True),
                            args.t2i_steps, n_image_tokens=0, lr=args.t2i_lr, seed=args.seed, desc="t2i",
                            progress=progress, ema_decay=args.ema_decay)
    checkpoint.save(root / "t2i", "dit", to_json_dict(recipe.T2V), t2i)
    lap("t2i")

    source = demo_data.i2v_source(prepared)
    if teacher is None:
        teacher = recipe.train_flow(recipe.I2V, source, args.teacher_steps, recipe.N_IMAGE_TOKENS, lr=args.teacher_lr,
                                    seed=args.seed, desc="teacher", progress=progress, ema_decay=args.ema_decay)
    checkpoint.save(root / "teacher", "dit", to_json_dict(recipe.I2V), teacher)
    lap("teacher")

    student = recipe.distill(recipe.I2V, teacher, source, args.distill_steps, recipe.N_IMAGE_TOKENS, seed=args.seed,
                             desc="student", progress=progress)
    checkpoint.save(root / "dit", "dit", to_json_dict(recipe.I2V), student)
    lap("student")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(demo.CHECKPOINTS), help="the checkpoint folder to write (replaced if present)")
    p.add_argument("--videos", type=int, default=recipe.VIDEOS, help="training clips")
    p.add_argument("--vae-steps", type=int, default=recipe.VAE_STEPS)
    p.add_argument("--vae-lr", type=float, default=recipe.VAE_LR, help="the VAE's peak learning rate")
    p.add_argument("--vae-from", metavar="DIR",
                   help="reuse the VAE of an earlier run's checkpoint folder instead of the VAE stage (which is "
                        "deterministic: a rerun of the same code gives the same VAE bit for bit; --vae-steps, "
                        "--vae-lr, --latent-noise and --foreground-margin are then unused); the other stages run as usual")
    p.add_argument("--teacher-from", metavar="DIR",
                   help="reuse the teacher of an earlier run's checkpoint folder instead of the teacher stage "
                        "(deterministic too; --teacher-steps and --teacher-lr are then unused), e.g. for work on the "
                        "text-to-image stage or the student; the student is distilled from it")
    p.add_argument("--latent-noise", type=float, default=recipe.LATENT_NOISE,
                   help="α of the VAE decoder's latent noise (m141jax.train.vae.noised_latents; 0: none)")
    p.add_argument("--foreground-margin", type=int, default=recipe.FOREGROUND_MARGIN,
                   help="px around the moving object that weigh as much as it in the VAE's loss (0: the object alone)")
    p.add_argument("--ema-decay", type=float, default=recipe.EMA_DECAY,
                   help="the text-to-image DiT and the teacher are the EMA of their parameters at this decay (0: none)")
    p.add_argument("--t2i-steps", type=int, default=recipe.T2I_STEPS)
    p.add_argument("--t2i-lr", type=float, default=recipe.T2I_LR, help="the text-to-image DiT's peak learning rate")
    p.add_argument("--teacher-steps", type=int, default=recipe.TEACHER_STEPS)
    p.add_argument("--teacher-lr", type=float, default=recipe.TEACHER_LR, help="the teacher's peak learning rate")
    p.add_argument("--distill-steps", type=int, default=recipe.DISTILL_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main() -> int:
    args = parser().parse_args()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    # read before anything is replaced
    vae = reused_vae(Path(args.vae_from)) if args.vae_from else None
    teacher = reused_teacher(Path(args.teacher_from)) if args.teacher_from else None
    out = checkpoint.atomic_dir(args.out, lambda root: train(root, args, seconds, vae, teacher), overwrite=True)
    seconds["total"] = time.perf_counter() - start
    print("RESULT train_demo " + " ".join(f"{k}_s={v:.1f}" for k, v in seconds.items()) + f" mb={folder_mb(out):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
