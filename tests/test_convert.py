"""The converter: sources, checks before writing, refused pickles, atomic writes, CLI entry points."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from m141jax import checkpoint  # noqa: E402
from m141jax.convert.sources import open_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _convert(run_convert, src, dst, *extra):
    return run_convert("dit", "--src", src, "--dst", dst, "--config", "tiny-i2v", *extra)


def _leaves(params):
    import jax
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_formats_give_identical_checkpoints(release_sd, release_pt, run_convert, tmp_path):
    """Plain .pt, legacy (non-zip) pickle, DeepSpeed folder, sharded safetensors with and without index."""
    ds = tmp_path / "deepspeed"
    ds.mkdir()
    torch.save({"module": release_sd, "iteration": 3}, ds / "mp_rank_00_model_states.pt")
    legacy = tmp_path / "legacy.bin"
    torch.save(release_sd, legacy, _use_new_zipfile_serialization=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = sorted(release_sd)
    half = len(keys) // 2
    parts = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in parts.items():
        save_file({k: release_sd[k].contiguous() for k in ks}, shards / name)
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    for name, ks in parts.items():
        save_file({k: release_sd[k].contiguous() for k in ks}, indexed / name.replace(".", "-00001."))
    (indexed / "x.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: n.replace(".", "-00001.") for n, ks in parts.items() for k in ks}}))
    (indexed / "stray.safetensors").write_bytes(b"not in the index, not read")

    results = []
    for i, src in enumerate([release_pt, legacy, ds, shards, indexed]):
        assert _convert(run_convert, src, tmp_path / f"ck{i}", "--dtype", "fp32") == 0
        results.append(_leaves(checkpoint.load_params(tmp_path / f"ck{i}")))
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for k in other:
            np.testing.assert_array_equal(other[k], results[0][k])


def test_bf16_storage(release_pt, run_convert, tmp_path):
    assert _convert(run_convert, release_pt, tmp_path / "ck") == 0
    leaves = checkpoint.load_params(tmp_path / "ck")
    assert {str(x.dtype) for x in _leaves(leaves).values()} == {"bfloat16"}
    assert checkpoint.read_meta(tmp_path / "ck", "dit")["config"]["param_dtype"] == "bf16"


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_mismatches_are_listed_and_nothing_is_written(case, release_sd, run_convert, tmp_path, capsys):
    sd = dict(release_sd)
    if case == "missing":
        del sd["double_blocks.1.txt_mlp.fc2.bias"], sd["final_layer.linear.weight"]
        expect = ["2 missing keys", "double_blocks.1.txt_mlp.fc2.bias", "final_layer.linear.weight"]
    elif case == "extra":
        sd["double_blocks.2.img_mod.linear.weight"] = torch.zeros(3)
        expect = ["1 unexpected keys", "double_blocks.2.img_mod.linear.weight"]
    else:
        sd["single_blocks.0.linear2.weight"] = torch.zeros(64, 100)
        expect = ["1 shape mismatches", "single_blocks.0.linear2.weight: expected [64, 320], found [64, 100]"]
    torch.save(sd, tmp_path / "bad.pt")
    assert _convert(run_convert, tmp_path / "bad.pt", tmp_path / "dst") == 2
    err = capsys.readouterr().err
    for e in expect:
        assert e in err
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pt"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_code_carrying_pickle_is_refused(run_convert, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"img_in.proj.weight": torch.zeros(1), "x": Exploit()}, tmp_path / "evil.pt")
    assert _convert(run_convert, tmp_path / "evil.pt", tmp_path / "dst") == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "dst").exists()


def test_interrupted_write_leaves_no_destination(release_pt, run_convert, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def boom(self, *a, **k):
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr(ocp.Checkpointer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _convert(run_convert, release_pt, tmp_path / "dst")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination(release_pt, run_convert, tmp_path, capsys):
    assert _convert(run_convert, release_pt, tmp_path / "dst") == 0
    before = (tmp_path / "dst" / checkpoint.META).stat().st_mtime_ns
    assert _convert(run_convert, release_pt, tmp_path / "dst") == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "dst" / checkpoint.META).stat().st_mtime_ns == before
    assert _convert(run_convert, release_pt, tmp_path / "dst", "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_source(tmp_path / "nope.pt")
    (tmp_path / "w.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type"):
        open_source(tmp_path / "w.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no weights found"):
        open_source(tmp_path / "empty")


def test_prefix_stripped_only_when_shared(tmp_path):
    torch.save({"model.a": torch.ones(2), "model.b": torch.ones(3)}, tmp_path / "p.pt")
    src, _ = open_source(tmp_path / "p.pt")
    assert src.keys() == {"a", "b"} and src.prefix == "model."
    torch.save({"model.a": torch.ones(2), "vae.b": torch.ones(3)}, tmp_path / "q.pt")
    src, _ = open_source(tmp_path / "q.pt")
    assert src.keys() == {"model.a", "vae.b"} and src.prefix == ""


@pytest.mark.slow
def test_command_line_entry_points(release_pt, tmp_path):
    """`python tools/convert_torch_weights.py` and `python -m m141jax parity dit` as a user runs them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ck = tmp_path / "ck"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_torch_weights.py"), "dit", "--src",
                        str(release_pt), "--dst", str(ck), "--config", "tiny-i2v", "--dtype", "fp32"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "release names" in r.stdout and "wrote" in r.stdout
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "in.npz", latents=rng.normal(size=(1, 16, 1, 4, 4)).astype(np.float32),
             ref_latents=rng.normal(size=(1, 16, 1, 4, 4)).astype(np.float32), timestep=np.array([500.0], np.float32),
             text_states=rng.normal(size=(1, 3, 32)).astype(np.float32), text_mask=np.array([[1, 1, 0]]),
             text_states_2=rng.normal(size=(1, 16)).astype(np.float32))
    r = subprocess.run([sys.executable, "-m", "m141jax", "parity", "dit", "--checkpoint", str(ck), "--inputs",
                        str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "out.npz")["velocity"].shape == (1, 16, 1, 4, 4)
    np.savez(tmp_path / "bad.npz", latents=np.zeros((1, 16, 1, 4, 4), np.float32))
    r = subprocess.run([sys.executable, "-m", "m141jax", "parity", "dit", "--checkpoint", str(ck), "--inputs",
                        str(tmp_path / "bad.npz"), "--output", str(tmp_path / "o2.npz")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "missing arrays ['timestep'" in r.stderr
