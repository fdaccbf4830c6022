"""`m141jax generate` as its users run it, on the tiny random checkpoint folder: warm starts from the
persistent compilation cache, the interactive loop, resumable JSON Lines batches, staged residency."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m141jax import compile_cache

pytestmark = pytest.mark.filterwarnings("ignore:os.fork")

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dtype", "fp32", "--size", "64x64", "--frames", "5", "--quiet"]


def _command(*argv, stdin=None):
    """`python -m m141jax` in a fresh process (a fresh JAX: nothing compiled in memory)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(compile_cache.ENV, None)
    return subprocess.run([sys.executable, "-m", "m141jax", *map(str, argv)], env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def _compiled(err: str) -> tuple[int, int]:
    m = re.search(r"compilation: (\d+) program\(s\) compiled, (\d+) read from the cache", err)
    assert m, err
    return int(m[1]), int(m[2])


def test_compilation_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.resolve(None) == tmp_path / "xdg" / "m141jax" / "jax"
    assert compile_cache.resolve("OFF") is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve(None) == tmp_path / "env"
    assert compile_cache.resolve(str(tmp_path / "flag")) == tmp_path / "flag"


@pytest.mark.slow
def test_warm_start_compiles_nothing(ckpt, image, tmp_path):
    """The second run with the same shapes reads every program from the cache; 'off' compiles them all again."""
    cache = tmp_path / "cache"
    run = lambda name, where: _command("generate", "--checkpoints", ckpt, *COMMON, "--prompt", "a cat", "--image",  # noqa: E731
                                       image, "--out", tmp_path / f"{name}.mp4", "--compilation-cache", where)
    cold = run("cold", cache)
    assert cold.returncode == 0, cold.stderr
    compiled, cached = _compiled(cold.stderr)
    assert compiled > 5 and cached == 0
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) >= compiled
    warm = run("warm", cache)
    assert warm.returncode == 0, warm.stderr
    assert _compiled(warm.stderr) == (0, compiled)
    off = run("off", "off")
    assert off.returncode == 0, off.stderr
    assert _compiled(off.stderr) == (compiled, 0) and "cache off" in off.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries


def _run_main(ckpt, *argv):
    from m141jax.cli import main
    return main(["generate", "--checkpoints", str(ckpt), *COMMON, *map(str, argv)])


def test_interactive_two_prompts_and_a_bad_line(ckpt, image, tmp_path, monkeypatch, capsys):
    """Two prompts (one with an image and a seed) -> two videos, each path printed with its seconds; a bad
    line -> one error line, and the loop goes on; end of input -> exit 0."""
    import io

    from m141jax import pipeline
    calls = []
    generate = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: calls.append(a[1]) or generate(*a, **k))
    lines = f"a cat walks on the grass | {image} | 7\n\na red car | {tmp_path / 'missing.png'}\na red car at night\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert _run_main(ckpt, "--interactive", "--t2i-steps", "2", "--out", tmp_path / "v.mp4") == 0
    out, err = capsys.readouterr()
    written = out.strip().splitlines()
    assert len(written) == 2 and calls == [["a cat walks on the grass"], ["a red car at night"]]
    for n, line in enumerate(written):
        path, seconds, unit = line.split()
        assert path == str(tmp_path / f"v_{n:03d}.mp4") and float(seconds) > 0 and unit == "s"
        assert Path(path).stat().st_size > 0
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "missing.png does not exist" in errors[0], err
    assert "2 video(s), 1 error(s)" in err


def test_parse_line():
    from m141jax import serve
    assert serve.parse_line("a cat") == ("a cat", None, None)
    assert serve.parse_line(" a cat | x.png | 3 ") == ("a cat", "x.png", 3)
    assert serve.parse_line("a cat || 3") == ("a cat", None, 3)
    assert serve.parse_line("   ") is None
    for bad, match in [("a | b | c | d", "4 fields"), (" | x.png", "prompt is empty"), ("a | | x", "seed 'x'")]:
        with pytest.raises(ValueError, match=match):
            serve.parse_line(bad)


def test_jsonl_batch_resumes_and_records_failures(ckpt, image, tmp_path, monkeypatch, capsys):
    """A batch killed part-way (one video finished and recorded, one written but not recorded) is rerun:
    only the missing videos are made, in one batch of equal shape; a bad entry and a line that is not JSON
    are recorded as errors and the others finish; a second rerun makes nothing."""
    import json

    from m141jax import pipeline, serve
    calls = []
    generate = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: calls.append(list(a[1])) or generate(*a, **k))
    out = tmp_path / "out"
    out.mkdir()
    entries = [dict(prompt="a cat", image=str(image)), dict(prompt="a dog", image=str(image), seed=3),
               dict(prompt="a red car", image=str(image), out="car.mp4"),
               dict(prompt="a bird", image=str(tmp_path / "missing.png"))]
    lines = [json.dumps(e) for e in entries[:2]] + ["{not json", json.dumps(entries[2]), "", json.dumps(entries[3])]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    # the killed run: video 0 finished and recorded; video 1 written, the process died before its manifest line
    (out / "v_000.mp4").write_bytes(b"finished earlier")
    (out / "v_001.mp4").write_bytes(b"not recorded")
    serve.append_line(out / "manifest.jsonl", dict(prompt="a cat", seed=0, index=0, file=str(out / "v_000.mp4"),
                                                   status="ok", seconds=1.0))
    argv = ["--prompts-file", tmp_path / "p.jsonl", "--out", out / "v.mp4"]
    assert _run_main(ckpt, *argv) == 1  # two failures
    assert calls == [["a dog", "a red car"]]
    assert (out / "v_000.mp4").read_bytes() == b"finished earlier"
    assert (out / "v_001.mp4").stat().st_size > 1000 and (out / "car.mp4").stat().st_size > 1000
    records = [json.loads(ln) for ln in (out / "manifest.jsonl").read_text().splitlines()]
    ok = {r["file"]: r for r in records if r["status"] == "ok"}
    assert set(ok) == {str(out / n) for n in ("v_000.mp4", "v_001.mp4", "car.mp4")}
    assert ok[str(out / "v_001.mp4")]["seed"] == 3 and ok[str(out / "car.mp4")]["prompt"] == "a red car"
    assert all(r["seconds"] > 0 for r in ok.values())
    errors = [r for r in records if r["status"] == "error"]
    assert len(errors) == 2 and "line 3: not JSON" in errors[0]["message"]
    assert errors[1]["prompt"] == "a bird" and "missing.png does not exist" in errors[1]["message"]
    assert "2 video(s) written, 1 already done, 2 failed" in capsys.readouterr().err
    calls.clear()
    assert _run_main(ckpt, *argv) == 1
    assert calls == [] and "0 video(s) written, 3 already done, 2 failed" in capsys.readouterr().err


def test_jsonl_entries_and_host_share(tmp_path):
    from m141jax import serve
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "frames": 9}\n{"prompt": "b", "seed": "x"}\n'
                                      '{"prompt": "c", "colour": 1}\n[1]\n{"prompt": "d", "out": "/abs/d.mp4"}\n')
    a, b, c, d, e = serve.read_jsonl(tmp_path / "p.jsonl", tmp_path / "o" / "v.mp4")
    assert a == serve.Request(prompt="a", out=tmp_path / "o" / "v_000.mp4", index=0, frames=9)
    assert b == "line 2: 'seed' must be an integer, got 'x'" and "unknown field(s) colour" in c
    assert "expected a JSON object" in d and e.out == Path("/abs/d.mp4")
    assert serve.host_share(list(range(7)), 1, 3) == [1, 4]
    assert serve.manifest_path(tmp_path, 2, 4).name == "manifest-002.jsonl"
    assert serve.is_jsonl(tmp_path / "p.jsonl")
    # a seeded request's key is that of `--prompt P --seed S`; the others' depend on their index alone
    import jax
    import numpy as np

    from m141jax import pipeline
    key = lambda r: np.asarray(jax.random.key_data(serve.request_key(r, 5)))  # noqa: E731
    np.testing.assert_array_equal(key(serve.Request("p", Path("x.mp4"), 4, seed=9)),
                                  np.asarray(jax.random.key_data(pipeline.prompt_keys(9, 1)[0])))
    np.testing.assert_array_equal(key(serve.Request("p", Path("x.mp4"), 4)),
                                  np.asarray(jax.random.key_data(pipeline.prompt_keys(5, 6)[4])))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_low_memory_equals_resident(ckpt, image, tmp_path, quantize):
    """--low-memory: each stage's weights go to the device for the stage and leave after it (one model at a
    time there), and the video equals the resident path's bit for bit (also quantized)."""
    from m141jax import components, pipeline
    from m141jax.compress import quant

    models = components.load_models(ckpt, with_t2i=True, dtype="fp32")
    if quantize:
        models = quant.quantize_models(models, quantize)
    # read one component at a time, each moved to host memory (and quantized) before the next is read
    staged = components.load_staged(ckpt, with_t2i=True, dtype="fp32", quantize=quantize)
    assert all(isinstance(a, np.ndarray) for a in __import__("jax").tree.leaves(staged.dit.params))
    order = []
    stage = staged.stage
    staged.stage = lambda name: (order.append(name) if staged.current != name else None) or stage(name)
    settings = pipeline.Settings(frames=9, clip_frames=5, size=(64, 64), t2i_steps=2)
    videos = {}
    for name, m in [("resident", models), ("staged", staged)]:
        out = tmp_path / f"{name}.mp4"
        clips = []
        image_to_video = pipeline.image_to_video
        try:
            pipeline.image_to_video = lambda *a: clips.append(image_to_video(*a)) or clips[-1]
            pipeline.generate(m, ["a cat walks on the grass"], [out], settings=settings, progress=False)
        finally:
            pipeline.image_to_video = image_to_video
        videos[name] = np.concatenate(clips, 1)
    np.testing.assert_array_equal(videos["staged"], videos["resident"])
    # text -> image, then two clips: encoders, T2I DiT, VAE (decode); per clip encoders, VAE, I2V DiT, VAE
    assert order == ["encoders", "t2i", "vae"] + ["encoders", "vae", "dit", "vae"] * 2
    assert staged.swaps == len(order) and staged.swap_seconds > 0


def test_device_batches():
    from m141jax.serve import device_batches
    assert device_batches(5, None, 2) == [4, 1] and device_batches(9, None, 4) == [8, 1]
    assert device_batches(10, 4, 2) == [4, 4, 2] and device_batches(5, 3, 2) == [2, 2, 1]
    assert device_batches(3, None, 1) == [3] and device_batches(1, None, 8) == [1]


@pytest.mark.slow
def test_jsonl_batch_split_over_the_data_axis(ckpt, image, tmp_path, monkeypatch):
    """A JSON Lines batch on a data=2 mesh (8 simulated devices): three requests of one shape run as a
    device batch of two, its rows split over the data axis, and one of one; the videos equal the
    one-device run's (one batch of three) up to uint8 truncation of float rounding."""
    from m141jax import components, parallel, pipeline, sampling, serve

    seen, clips = [], []
    denoise, image_to_video = sampling.denoise, pipeline.image_to_video
    monkeypatch.setattr(sampling, "denoise", lambda p, cfg, noise, *a: seen.append(
        (noise.shape[0], getattr(noise.sharding, "spec", (None,))[0])) or denoise(p, cfg, noise, *a))
    monkeypatch.setattr(pipeline, "image_to_video", lambda *a: clips.append(image_to_video(*a)) or clips[-1])
    settings = pipeline.Settings(frames=5, clip_frames=5, size=(64, 64))
    requests = [serve.Request(p, tmp_path / f"{i}.mp4", i, image=str(image))
                for i, p in enumerate(["a cat", "a dog on a hill", "a red car"])]
    videos = {}
    for name, mesh in [("one", None), ("mesh", parallel.make_mesh("data=2,fsdp=4"))]:
        models = components.load_models(ckpt, with_t2i=False, dtype="fp32", mesh=mesh)
        seen.clear(), clips.clear()
        counts = serve.run_batch(models, requests, settings, tmp_path / f"manifest-{name}.jsonl", log=lambda s: None)
        assert counts == dict(done=3, skipped=0, failed=0)
        videos[name] = (np.concatenate(clips).astype(np.int16), list(seen))
        for r in requests:
            r.out.unlink()
    assert videos["one"][1] == [(3, None)]
    assert videos["mesh"][1] == [(2, "data"), (1, None)]
    one, mesh = videos["one"][0], videos["mesh"][0]
    assert np.abs(one - mesh).max() <= 1 and (one != mesh).mean() < 0.01
