"""`m141jax generate` settings and the errors it reports before reading any weights."""

import numpy as np
import pytest
from PIL import Image

from m141jax import pipeline
from m141jax.cli import main


def test_clip_plan():
    s = pipeline.Settings
    assert s(frames=81).clips() == [(81, 0, 81)]
    assert s(frames=21, clip_frames=81).clips() == [(21, 0, 21)]
    assert s(frames=161).clips() == [(81, 0, 81), (81, 1, 81)]
    assert s(frames=201).clips() == [(81, 0, 81), (81, 1, 81), (81, 1, 41)]
    plan = s(frames=1441).clips()  # one minute at 24 fps
    assert len(plan) == 18 and sum(end - first for _, first, end in plan) == 1441


def test_frames_for_seconds():
    assert pipeline.frames_for_seconds(3.375) == 81
    assert pipeline.frames_for_seconds(5) == 121
    assert pipeline.frames_for_seconds(60) == 1441
    assert pipeline.frames_for_seconds(1, fps=8) == 9
    with pytest.raises(ValueError, match="positive"):
        pipeline.frames_for_seconds(0)


@pytest.mark.parametrize("kw, match", [(dict(frames=80), "frames 80 must be 4k\\+1"),
                                       (dict(clip_frames=60), "clip frames 60 must be 4k\\+1"),
                                       (dict(frames=9, clip_frames=1), "cannot chain"),
                                       (dict(steps=0), "steps"),
                                       (dict(size=(540, 960)), "540x960 must be positive multiples of 16")])
def test_settings_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        pipeline.Settings(**kw)


def _run(capsys, *argv):
    code = main(["generate", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--frames", "80"], "frames 80 must be 4k\\+1"),
    (["--clip-frames", "50"], "clip frames 50 must be 4k\\+1"),
    (["--size", "540x960"], "540x960 must be positive multiples of 16"),
    (["--size", "big"], "must be HxW"),
    (["--seconds", "-1"], "seconds must be positive"),
    (["--out", "video.gif"], "must end in .mp4"),
    (["--image", "missing.png"], "image missing.png does not exist"),
])
def test_cli_errors_before_loading(capsys, tmp_path, argv, match):
    code, err = _run(capsys, "--prompt", "a cat", "--checkpoints", str(tmp_path), *argv)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(match, err), err


def test_cli_unreadable_image_and_prompts(capsys, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\x00" * 100)
    code, err = _run(capsys, "--prompt", "a cat", "--image", str(tmp_path / "bad.jpg"))
    assert code == 2 and "cannot be read as an image" in err
    (tmp_path / "p.txt").write_text("# only a comment\n\n")
    code, err = _run(capsys, "--prompts-file", str(tmp_path / "p.txt"))
    assert code == 2 and "holds no prompt" in err
    code, err = _run(capsys, "--prompts-file", str(tmp_path / "none.txt"))
    assert code == 2 and "cannot be read" in err


def test_cli_missing_checkpoints(capsys, tmp_path):
    Image.fromarray(np.zeros((90, 160, 3), np.uint8)).save(tmp_path / "first.png")
    code, err = _run(capsys, "--prompt", "a cat", "--image", str(tmp_path / "first.png"), "--checkpoints",
                     str(tmp_path / "ckpt"))
    assert code == 2 and f"{tmp_path / 'ckpt' / 'dit'} is missing: the image-to-video DiT" in err
    # without an image the text-to-image DiT is needed too
    (tmp_path / "ckpt" / "dit").mkdir(parents=True)
    code, err = _run(capsys, "--prompt", "a cat", "--checkpoints", str(tmp_path / "ckpt"))
    assert code == 2 and "dit is not an m141jax checkpoint" in err
