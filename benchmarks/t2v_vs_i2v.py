"""The paper's central claim at toy scale (its Fig. 5): step distillation converges much faster for
image-to-video than for text-to-video, because the first frame already fixes most of the video.

With the demo's VAE and encoders (from the shipped checkpoints), on the same training clips as
`tools/train_demo.py`:
1. the image-to-video teacher is the shipped one (`teacher/`, trained by `tools/train_demo.py`); a
   text-to-video teacher (the T2V architecture at the I2V's depth on whole clips, prompt only) is trained
   here by flow matching with the same recipe, clips, number of steps and learning rate (`recipe.VIDEOS`,
   `recipe.TEACHER_STEPS`, `recipe.TEACHER_LR`);
2. each is distilled into a 4-step student by DMD2 with the same settings and budget;
3. every --every distillation steps the student's 4-step clips for the held-out captions are scored by
   the analyser (`m141jax.demo.quality.score`: the mean of the colour, shape, direction and
   consistency accuracies).
The curves go to docs/t2v_vs_i2v.png (needs the `bench` extra: matplotlib).

    python benchmarks/t2v_vs_i2v.py [--distill-steps 400] [--every 50]   (the defaults: 28–29 min on 2 CPU cores)
    RESULT t2v_vs_i2v step=… i2v=… t2v=…            (one line per evaluation)
    RESULT t2v_vs_i2v_teachers i2v50=… t2v50=… i2v4=… t2v4=… total_s=…
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout

from m141jax import checkpoint, components, demo
from m141jax.data import shapes
from m141jax.demo import data as demo_data
from m141jax.demo import encoders as demo_encoders
from m141jax.demo import quality, recipe


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", default=str(demo.CHECKPOINTS), help="the folder tools/train_demo.py wrote")
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--per-combination", type=int, default=8)
    p.add_argument("--plot", default=str(ROOT / "docs" / "t2v_vs_i2v.png"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start, progress = time.perf_counter(), not args.quiet
    root = Path(args.checkpoints)
    vae = components.load_component(root, "vae", "fp32")
    enc = demo_encoders.load(root)
    train = shapes.ShapesDataset(recipe.VIDEOS, "train")  # the shipped teacher's clips
    items = [train[i] for i in range(len(train))]
    prepared = demo_data.prepare(vae, enc, np.stack([v for v, _ in items]), [c for _, c in items], progress)
    clips, captions = quality.eval_clips(args.per_combination)
    held = demo_data.prepare(vae, enc, clips, captions, progress=False)

    t2v_source = demo_data.t2v_source(prepared, recipe.T2I_GUIDANCE)
    _, i2v_model, i2v_teacher = checkpoint.load(root / "teacher", ("dit",), "fp32")
    t2v_model = recipe.T2V_CLIPS
    t2v_teacher = recipe.train_flow(t2v_model, t2v_source, recipe.TEACHER_STEPS, 0, lr=recipe.TEACHER_LR,
                                    desc="t2v teacher", progress=progress)
    kinds = {"i2v": (i2v_model, i2v_teacher, demo_data.i2v_source(prepared), recipe.N_IMAGE_TOKENS),
             "t2v": (t2v_model, t2v_teacher, t2v_source, 0)}
    curves, teachers = {}, {}
    for kind, (model, teacher, source, n_image) in kinds.items():
        for steps in (50, 4):
            teachers[f"{kind}{steps}"] = quality.score(
                quality.generate(model, teacher, vae, held, steps, recipe.GUIDANCE), captions)
        curve = curves[kind] = {}

        def evaluate(step, params, model=model, curve=curve):
            curve[step] = quality.score(quality.generate(model, params, vae, held, 4), captions)

        recipe.distill(model, teacher, source, args.distill_steps, n_image, desc=f"{kind} student", progress=progress,
                       every=args.every, callback=evaluate)

    for step in curves["i2v"]:
        print(f"RESULT t2v_vs_i2v step={step} i2v={curves['i2v'][step]:.3f} t2v={curves['t2v'][step]:.3f}")
    print("RESULT t2v_vs_i2v_teachers " + " ".join(f"{k}={v:.3f}" for k, v in teachers.items())
          + f" total_s={time.perf_counter() - start:.1f}")

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for kind, colour in (("i2v", "tab:blue"), ("t2v", "tab:orange")):
        steps = sorted(curves[kind])
        ax.plot(steps, [curves[kind][s] for s in steps], "o-", color=colour, label=f"{kind.upper()} student, 4 steps")
        ax.axhline(teachers[f"{kind}50"], color=colour, ls="--", lw=1, label=f"{kind.upper()} teacher, 50 steps")
    ax.set_xlabel("DMD2 distillation steps")
    ax.set_ylabel("mean attribute accuracy, held-out")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Step distillation: image-to-video vs text-to-video", fontsize=9)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
