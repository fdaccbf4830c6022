"""The demo: tiny models trained on the shapes dataset (`m141jax.data.shapes`) by `tools/train_demo.py`
and shipped in `m141jax/demo/checkpoints/`, the folder `m141jax generate --preset demo` reads."""

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

# `m141jax generate --preset demo` defaults (see m141jax/cli/generate.py): the shapes clips (17 frames of
# 32×32 at 8 fps), the student's 4 steps at the shift it was distilled with, the text-to-image model's
# sampling (CFG 3 against the empty prompt on the steps from σ ≥ 0.5: README, "The demo models"), fp32
# (tiny models run faster in fp32 on CPUs), the demo encoders' 16-token prompt window.
SHIFT = 3.0
GENERATE = dict(frames=17, clip_frames=17, fps=8, size="32x32", steps=4, shift=SHIFT, t2i_steps=30, t2i_shift=SHIFT,
                t2i_guidance=1.0, t2i_cfg=3.0, t2i_cfg_sigma=0.5, dtype="fp32", text_length=16)
