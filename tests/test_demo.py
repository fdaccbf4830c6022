"""The shipped demo checkpoints: complete, small, and `m141jax generate --preset demo` makes a clip of the
right shape from text alone on CPU (text → image → video)."""

import imageio.v3 as iio
import numpy as np
import pytest

from m141jax import cli, components, demo
from m141jax.demo import recipe

MAX_MB = 20


def test_checkpoints_are_complete_and_small():
    for name in components.LAYOUT:
        components.locate(demo.CHECKPOINTS, name)
    assert components.read_config(demo.CHECKPOINTS, "dit", "fp32").architecture() == recipe.I2V.architecture()
    assert components.read_config(demo.CHECKPOINTS, "t2i", "fp32").architecture() == recipe.T2V.architecture()
    size = sum(f.stat().st_size for f in demo.CHECKPOINTS.rglob("*") if f.is_file()) / 2 ** 20
    assert size <= MAX_MB, f"demo checkpoints take {size:.1f} MB"


@pytest.mark.parametrize("seconds", [None, 4.0])
def test_generate_demo_preset(tmp_path, seconds):
    out = tmp_path / "demo.mp4"
    argv = ["generate", "--preset", "demo", "--prompt", "a blue circle moving right", "--out", str(out), "--quiet"]
    if seconds is not None:  # 33 frames at 8 fps: two clips of the sliding window
        argv += ["--seconds", str(seconds)]
    assert cli.main(argv) == 0
    video = np.stack(list(iio.imiter(out)))
    frames = 17 if seconds is None else 33
    assert video.shape == (frames, 32, 32, 3)
    assert video.std() > 5  # not a blank clip
