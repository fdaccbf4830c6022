"""Issue 20's failures of `generate` / `parity` / the demo tokenizer: outputs and arguments refused before
any weights are read, SIGTERM / SIGINT finishing the MP4 with the clips done (exit 143 / 130), non-finite
stage outputs and parity inputs refused with one line, unknown words of the demo tokenizer warned about."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
from fixtures import TINY_I2V, dit_inputs, tiny_dit_params

from m141jax import checkpoint, components, demo, encoders
from m141jax.cli import main
from m141jax.config import to_json_dict

pytestmark = pytest.mark.filterwarnings("ignore:os.fork")
ROOT = Path(__file__).resolve().parent.parent


def _one_line_error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def _no_reading(monkeypatch):
    """Fail the test if any weights are read."""
    def refuse(*a, **k):
        raise AssertionError("weights were read before the arguments were checked")
    monkeypatch.setattr(components, "load_models", refuse)


# ------------------------------------------------------------------------ refused before loading

@pytest.mark.parametrize("out, match", [
    ("folder.mp4", "is an existing folder"),
    ("afile/video.mp4", "is a file, not a folder"),
    ("afile/deeper/video.mp4", "is a file, not a folder"),
    ("/proc/video.mp4", "cannot be written in /proc"),
])
def test_out_refused_up_front(capsys, tmp_path, monkeypatch, out, match):
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "folder.mp4" / "keep.txt").write_text("a user's file")
    (tmp_path / "afile").write_text("not a folder")
    _no_reading(monkeypatch)
    out = out if out.startswith("/") else str(tmp_path / out)
    err = _one_line_error(capsys, ["generate", "--prompt", "a cat", "--checkpoints", str(tmp_path), "--out", out])
    assert re.search(match, err), err
    assert (tmp_path / "folder.mp4" / "keep.txt").read_text() == "a user's file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no probe left behind


@pytest.mark.parametrize("argv, match", [
    (["--fps", "0"], "fps 0 must be a positive whole number"),
    (["--fps", "-3"], "fps -3 must be a positive whole number"),
    (["--seconds", "2", "--fps", "0"], "fps 0 must be a positive whole number"),
    (["--seconds", "nan"], "seconds must be positive and finite, got nan"),
    (["--seconds", "inf"], "seconds must be positive and finite, got inf"),
    (["--seconds", "-2"], "seconds must be positive"),
    (["--shift", "nan"], "shift nan must be a finite number"),
    (["--guidance", "inf"], "guidance inf must be a finite number"),
    (["--t2i-cfg", "nan"], "t2i cfg nan must be a finite number"),
    (["--t2i-cfg-sigma", "1.5"], "t2i cfg sigma 1.5 must be in [0, 1]"),
])
def test_numbers_refused_up_front(capsys, tmp_path, monkeypatch, argv, match):
    _no_reading(monkeypatch)
    err = _one_line_error(capsys, ["generate", "--prompt", "a cat", "--checkpoints", str(tmp_path), *argv])
    assert match in err, err


# ----------------------------------------------------------------------------------------- signals

def _read(path):
    with imageio.get_reader(path, format="FFMPEG") as r:
        return np.stack(list(r.iter_data()))


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_video(ckpt, image, tmp_path, sig, code):
    """A signal after the first clip is written: the MP4 holds the clips done, the partial-file message, the
    exit status 128 + signal, no traceback."""
    out = tmp_path / "long.mp4"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    argv = [sys.executable, "-m", "m141jax", "generate", "--checkpoints", str(ckpt), "--dtype", "fp32", "--size",
            "32x32", "--image", str(image), "--prompt", "a cat", "--frames", "401", "--clip-frames", "5", "--steps",
            "1", "--quiet", "--out", str(out)]
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            deadline = time.time() + 240
            while not list(tmp_path.glob(".long.partial-*.mp4")):  # the first clip is being written
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "err.txt").read_text()
                time.sleep(0.05)
            proc.send_signal(sig)
            assert proc.wait(timeout=120) == code
        finally:
            proc.kill()
    text = (tmp_path / "err.txt").read_text()
    name = signal.Signals(sig).name
    m = re.search(rf"error: clip (\d+) of 100 interrupted by {name}; {re.escape(str(out))} holds clips 1-(\d+) "
                  rf"\((\d+) frames each, playable\)", text)
    assert m, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    done, frames = int(m[2]), int(m[3])
    assert 1 <= done < 100 and frames == 5 + 4 * (done - 1)
    assert _read(out).shape == (frames, 32, 32, 3)
    assert not list(tmp_path.glob(".long.partial-*"))


# ------------------------------------------------------------------------------- non-finite values

def _nan_dit(ckpt, tmp_path):
    """A copy of the checkpoint folder (by links) whose I2V DiT holds NaNs."""
    meta = checkpoint.read_meta(ckpt / "dit")
    params = jax.tree.map(lambda x: np.full(x.shape, np.nan, np.float32), checkpoint.load_params(ckpt / "dit"))
    checkpoint.save(tmp_path / "nan_dit", "dit", meta["config"], params)
    root = tmp_path / "nan"
    root.mkdir()
    for name in components.LAYOUT:
        (root / name).symlink_to(tmp_path / "nan_dit" if name == "dit" else ckpt / name)
    return root


def test_nan_dit_stops_generate(ckpt, image, tmp_path, capsys):
    root = _nan_dit(ckpt, tmp_path)
    out = tmp_path / "nan.mp4"
    assert main(["generate", "--checkpoints", str(root), "--dtype", "fp32", "--size", "32x32", "--image", str(image),
                 "--prompt", "a cat", "--frames", "5", "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: clip 1 of 1 failed (NonFiniteError: the sampling stage produced non-finite values" in err, err
    assert "no video was written" in err and not out.exists()


def _dit_inputs():
    latents, t, cond, ref = dit_inputs()
    move = lambda x: np.moveaxis(np.asarray(x), -1, 1)
    return {"latents": move(latents), "timestep": np.asarray(t), "text_states": np.asarray(cond.text_states),
            "text_mask": np.asarray(cond.text_mask), "text_states_2": np.asarray(cond.text_states_2),
            "ref_latents": move(ref)}


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "dit"
    checkpoint.save(path, "dit", to_json_dict(TINY_I2V), tiny_dit_params())
    return path


@pytest.mark.parametrize("name, value, match", [
    ("latents", np.nan, "latents holds 1 non-finite value"),
    ("timestep", np.inf, "timestep holds 1 non-finite value"),
    ("text_states_2", np.nan, "text_states_2 holds 1 non-finite value"),
    ("text_mask", 0, r"text_mask row\(s\) \[0\] mask out every token"),
])
def test_parity_dit_refuses_bad_inputs(dit_ckpt, tmp_path, capsys, name, value, match):
    z = _dit_inputs()
    if name == "text_mask":
        z[name] = np.zeros_like(z[name])
    else:
        z[name] = z[name].astype(np.float32)
        z[name].flat[0] = value
    np.savez(tmp_path / "in.npz", **z)
    err = _one_line_error(capsys, ["parity", "dit", "--checkpoint", str(dit_ckpt), "--inputs", str(tmp_path / "in.npz"),
                                   "--output", str(tmp_path / "out.npz")])
    assert re.search(match, err), err
    assert not (tmp_path / "out.npz").exists()


def test_parity_refuses_nan_outputs_and_other_components(ckpt, tmp_path, capsys):
    """Inputs of the other components are checked too (clip: an all-zero attention mask; vae: NaN video);
    a checkpoint that makes NaNs writes nothing."""
    np.savez(tmp_path / "clip.npz", input_ids=np.ones((1, 4), np.int32), attention_mask=np.zeros((1, 4), np.int32))
    err = _one_line_error(capsys, ["parity", "clip", "--checkpoint", str(ckpt / "clip"), "--inputs",
                                   str(tmp_path / "clip.npz"), "--output", str(tmp_path / "o.npz")])
    assert "attention_mask row(s) [0] mask out every token" in err
    video = np.zeros((1, 3, 1, 16, 16), np.float32)
    video[0, 0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "vae.npz", video=video)
    err = _one_line_error(capsys, ["parity", "vae-encode", "--checkpoint", str(ckpt / "vae"), "--inputs",
                                   str(tmp_path / "vae.npz"), "--output", str(tmp_path / "o.npz")])
    assert "video holds 1 non-finite value(s)" in err
    root = _nan_dit(ckpt, tmp_path)
    z = _dit_inputs()
    z.update(text_states=np.zeros((1, 5, 64), np.float32), text_states_2=np.zeros((1, 32), np.float32))
    np.savez(tmp_path / "in.npz", **z)
    err = _one_line_error(capsys, ["parity", "dit", "--checkpoint", str(root / "dit"), "--inputs",
                                   str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz")])
    assert "parity dit produced non-finite values (NaN/Inf) in velocity" in err
    assert not (tmp_path / "o.npz").exists()


# ------------------------------------------------------------------------------- demo vocabulary

def test_demo_tokenizer_warns_on_unknown_words():
    enc = components.load_models(demo.CHECKPOINTS, with_t2i=False, dtype="fp32", max_length=16).encoders
    with pytest.warns(UserWarning, match=r"the demo models only know their caption vocabulary: a blue circle .*"
                                         r"read as unknown: 猫, zebra"):
        encoders.text_conditioning(enc, ["a blue 猫 circle zebra moving right"])
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        encoders.text_conditioning(enc, ["a green square moving up"])  # known words: no warning
        encoders.text_conditioning(enc, ["ein grüner Würfel"])  # warned once per Encoders
    assert encoders.warn_unknown_words(enc, ["a red triangle moving down"]) == []
