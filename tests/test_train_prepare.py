"""`m141jax prepare-data` on tiny random VAE / encoders: shapes, the empty prompt, errors, and that the
result feeds the training pipeline."""

import json

import numpy as np
import pytest
from fixtures import write_tiny_checkpoints

from m141jax import media
from m141jax.cli import main
from m141jax.config import preset
from m141jax.train import data
from m141jax.train.config import DataConfig


def _video(path, frames, seed):
    rng = np.random.default_rng(seed)
    with media.VideoWriter(path, fps=8) as w:
        w.append(rng.integers(0, 255, (frames, 40, 56, 3), dtype=np.uint8))


@pytest.mark.slow
def test_prepare_data(tmp_path, capsys):
    ckpts = write_tiny_checkpoints(tmp_path / "ckpt")
    src = tmp_path / "videos"
    src.mkdir()
    for i, caption in enumerate(["a cat walks on the grass", "a red car at night"]):
        _video(src / f"clip{i}.mp4", 7, i)
        (src / f"clip{i}.txt").write_text(caption)
    out = tmp_path / "data"
    argv = ["prepare-data", "--checkpoints", str(ckpts), "--input", str(src), "--output", str(out),
            "--frames", "5", "--size", "32x48", "--dtype", "fp32", "--quiet"]
    assert main(argv) == 0
    meta = json.loads((out / data.META).read_text())
    assert meta["samples"] == 2 and meta["files"] == ["clip0.mp4", "clip1.mp4"]
    n_img = meta["n_image_tokens"]
    source = data.LatentSource(out)
    s0, s1 = source[0], source[1]
    c = s0["latents"].shape[-1]
    assert s0["latents"].shape == (2, 4, 6, c) and s0["ref_latents"].shape == (1, 4, 6, c)  # 5 frames -> 2 latents
    L, D = s0["text_states"].shape
    assert n_img > 0 and s0["text_mask"][:n_img].all() and L > n_img
    assert not np.allclose(s0["text_states"][n_img:], s1["text_states"][n_img:])  # different captions
    null = source.null()
    assert null["text_states"].shape == (L - n_img, D) and null["text_mask"].shape == (L - n_img,)
    model = preset("tiny-i2v", text_dim=D, pooled_dim=s0["text_states_2"].shape[0], out_channels=c,
                   in_channels=2 * c + 1)
    batch = next(data.make_iterator(data.open_source(DataConfig(source=str(out), batch_size=2), model, n_img),
                                    DataConfig(source=str(out), batch_size=2)))
    assert batch["latents"].shape == (2, 2, 4, 6, c) and batch["null_text_states"].shape == (L - n_img, D)

    capsys.readouterr()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    (src / "clip1.txt").unlink()
    assert main([*argv, "--overwrite"]) == 2 and "no caption file (NAME.txt) for clip1.mp4" in capsys.readouterr().err
    (src / "clip1.txt").write_text("x")
    assert main([*argv[:-5], "--frames", "9", "--size", "32x48", "--overwrite", "--quiet"]) == 2
    assert "has 7 frames, fewer than --frames 9" in capsys.readouterr().err
    assert main([*argv[:-5], "--frames", "6", "--size", "32x48", "--quiet"]) == 2
    assert "--frames 6 must be 4k+1" in capsys.readouterr().err
