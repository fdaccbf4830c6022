"""`m141jax generate` as its users run it, on the tiny random checkpoint folder: warm starts from the
persistent compilation cache, the interactive loop, resumable JSON Lines batches, staged residency."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures import write_tiny_checkpoints
from PIL import Image

from m141jax import compile_cache

pytestmark = pytest.mark.filterwarnings("ignore:os.fork")

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dtype", "fp32", "--size", "64x64", "--frames", "5", "--quiet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "first.png"
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 3, y * 3, (x + y)], -1).astype(np.uint8)).save(path)
    return path


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
