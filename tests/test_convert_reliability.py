"""The converter under hostile or unlucky input (issue 20): nothing the user owns is deleted, wrong
weights are refused instead of converted, every bad input ends in one `error:` line with status 2, DST
problems show before any weight is read, and partial folders of killed runs are cleaned up."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from m141jax import checkpoint, config
from m141jax.convert.configs import config_type_problems
from m141jax.convert.destination import clean_stale_partials, partial_pattern

ROOT = Path(__file__).resolve().parents[1]


def _convert(run_convert, src, dst, *extra, config="tiny-i2v"):
    return run_convert("dit", "--src", src, "--dst", dst, "--config", config, *extra)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _tree(path: Path) -> dict:
    """{relative path: bytes (files) or None (folders)} of everything under path."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def _fake_checkpoint(path: Path, component: str) -> Path:
    (path / "params").mkdir(parents=True)
    (path / checkpoint.META).write_text(json.dumps({"format": checkpoint.FORMAT, "component": component, "config": {}}))
    return path


# ------------------------------------------------------------------------- 1. --overwrite data loss

def test_overwrite_never_deletes_the_source_folder(release_sd, tmp_path):
    """The reported command, as a user runs it: DST is the folder holding SRC."""
    src_dir = tmp_path / "srcdir"
    src_dir.mkdir()
    save_file({k: v.contiguous() for k, v in release_sd.items()}, src_dir / "w.safetensors")
    before = _tree(src_dir)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_torch_weights.py"), "dit", "--src",
                        str(src_dir / "w.safetensors"), "--dst", str(src_dir), "--overwrite", "--config", "tiny-i2v"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error: --overwrite refuses to replace") and "\n" not in err
    assert "holds the source" in err
    assert _tree(src_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srcdir"]


@pytest.mark.parametrize("case", ["user_folder", "file", "other_component", "broken_meta", "extra_files", "src_inside",
                                  "symlink"])
def test_overwrite_replaces_nothing_but_a_same_component_checkpoint(case, release_pt, run_convert, tmp_path, capsys):
    dst = tmp_path / "dst"
    src = release_pt
    expect = {"user_folder": "not an m141jax checkpoint", "file": "is a file", "other_component": "'vae' checkpoint",
              "broken_meta": "unreadable", "extra_files": "other files besides the checkpoint: notes.txt",
              "src_inside": "holds the source", "symlink": "symbolic link"}[case]
    if case == "user_folder":
        dst.mkdir()
        (dst / "thesis.tex").write_text("years of work")
    elif case == "file":
        dst.write_text("a user's file")
    elif case == "other_component":
        _fake_checkpoint(dst, "vae")
    elif case == "broken_meta":
        _fake_checkpoint(dst, "dit")
        (dst / checkpoint.META).write_text("{not json")
    elif case == "extra_files":
        _fake_checkpoint(dst, "dit")
        (dst / "notes.txt").write_text("mine")
    elif case == "src_inside":
        _fake_checkpoint(dst, "dit")
        src = dst / "params" / "model.pt"
        src.write_bytes(release_pt.read_bytes())
    else:
        (tmp_path / "real").mkdir()
        _fake_checkpoint(tmp_path / "real", "dit")
        dst.symlink_to(tmp_path / "real")
    before = _tree(tmp_path)
    assert _convert(run_convert, src, dst, "--overwrite") == 2
    err = _one_error_line(capsys)
    assert "--overwrite refuses to replace" in err and expect in err, err
    assert _tree(tmp_path) == before


def test_overwrite_replaces_a_same_component_checkpoint(release_pt, run_convert, tmp_path, capsys):
    dst = _fake_checkpoint(tmp_path / "dst", "dit")
    assert _convert(run_convert, release_pt, dst, "--overwrite") == 0
    assert checkpoint.read_meta(dst, "dit")["config"]["hidden_size"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


# ------------------------------------------------------------------------------ 2. wrong results

def test_nonfinite_weights_are_refused_by_name(release_sd, run_convert, tmp_path, capsys):
    sd = dict(release_sd)
    bad = sorted(sd)[:7]
    for i, k in enumerate(bad):
        t = sd[k].clone()
        t.view(-1)[0] = float("nan") if i else float("inf")
        if i == 1:
            t.view(-1)[-1] = float("-inf")
        sd[k] = t
    torch.save(sd, tmp_path / "nan.pt")
    assert _convert(run_convert, tmp_path / "nan.pt", tmp_path / "dst") == 2
    err = _one_error_line(capsys)
    assert "7 tensors hold NaN or Inf values" in err and "--allow-nonfinite" in err
    assert f"{bad[0]} (1 Inf)" in err and f"{bad[1]} (1 NaN, 1 Inf)" in err and "... and 2 more" in err
    assert not (tmp_path / "dst").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]

    assert _convert(run_convert, tmp_path / "nan.pt", tmp_path / "dst", "--allow-nonfinite", "--dtype", "fp32") == 0
    leaves = [np.asarray(x) for x in __import__("jax").tree_util.tree_leaves(checkpoint.load_params(tmp_path / "dst"))]
    assert sum(int((~np.isfinite(x)).sum()) for x in leaves) == 8


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_non_float_weights_are_refused_not_cast(fmt, release_sd, run_convert, tmp_path, capsys):
    sd = dict(release_sd)
    keys = sorted(k for k in sd if k.endswith("weight"))[:3]
    sd[keys[0]] = torch.ones_like(sd[keys[0]], dtype=torch.int64)
    sd[keys[1]] = torch.ones_like(sd[keys[1]], dtype=torch.bool)
    sd[keys[2]] = torch.ones_like(sd[keys[2]], dtype=torch.int32 if fmt == "safetensors" else torch.complex64)
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    assert _convert(run_convert, path, tmp_path / "dst") == 2
    err = _one_error_line(capsys)
    third = "int32" if fmt == "safetensors" else "complex64"
    assert re.search("3 tensors of the .*checkpoint are not floating point", err) and "refusing to cast" in err
    assert f"{keys[0]} (int64)" in err and f"{keys[1]} (bool)" in err and f"{keys[2]} ({third})" in err
    assert not (tmp_path / "dst").exists()


# ------------------------------------------------------------------------ 3. one-line errors

def _plain_pickle_with_code(path):
    with open(path, "wb") as f:
        pickle.dump({"img_in.proj.weight": 1.0, "x": Path("/")}, f, protocol=4)


SOURCES = {
    "random.safetensors": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
                           "not a valid .safetensors file: its header length field says"),
    "empty.safetensors": (lambda p: p.write_bytes(b""), "not a valid .safetensors file: it is empty"),
    "short.safetensors": (lambda p: p.write_bytes(b"\x01\x02\x03"), "not a valid .safetensors file: 3 bytes"),
    "badjson.safetensors": (lambda p: p.write_bytes((12).to_bytes(8, "little") + b"{not json!!}"),
                            "its header is not JSON"),
    "badentry.safetensors": (lambda p: p.write_bytes((2).to_bytes(8, "little") + b"[]"), "header is a JSON list"),
    "cut.safetensors": (None, "truncated"),
    "empty.pt": (lambda p: p.write_bytes(b""), "cannot read {}: the file is empty"),
    "random.pt": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "cannot read {}: not a PyTorch checkpoint"),
    "random_zip_magic.pt": (lambda p: p.write_bytes(b"PK\x03\x04" + np.random.default_rng(1).bytes(4096)),
                            "cannot read {}: not a PyTorch checkpoint"),
    "cut.pt": (None, "cannot read {}:"),
    "code.pt": (_plain_pickle_with_code, "refusing to load {}: it is not a weights-only pickle"),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_unreadable_sources_give_one_line(name, release_sd, run_convert, tmp_path, capsys):
    path = tmp_path / name
    make, expect = SOURCES[name]
    if name == "cut.safetensors":
        save_file({k: v.contiguous() for k, v in release_sd.items()}, path)
        path.write_bytes(path.read_bytes()[:-100])
    elif name == "cut.pt":
        torch.save(release_sd, path)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        make(path)
    assert _convert(run_convert, path, tmp_path / "dst") == 2
    err = _one_error_line(capsys)
    assert expect.format(path) in err, err
    # torch's advice to retry with weights_only=False is only for real pickles that need code
    assert ("weights_only=False" in err) == (name == "code.pt"), err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("component,config,expect", [
    ("dit", {"heads_num": None}, "field 'heads_num' has a wrong type or value (null)"),
    ("dit", {"rope_dim_list": 5}, "field 'rope_dim_list' has a wrong type or value (5)"),
    ("dit", {"hidden_size": "64"}, "field 'hidden_size' has a wrong type or value (\"64\")"),
    ("dit", {"_class_name": "HunyuanVideoTransformer3DModel", "num_attention_heads": "4"},
     "field 'num_attention_heads' has a wrong type or value"),
    ("dit", {"qkv_bias": "yes"}, "field 'qkv_bias' must be true/false, found str \"yes\""),
    ("dit", {"mlp_width_ratio": "4"}, "field 'mlp_width_ratio' must be a number, found str"),
    ("dit", {"hidden_size": 64.0, "heads_num": 4, "rope_dim_list": [4, 6, 6]}, "field 'hidden_size' must be an integer"),
    ("vae", {"block_out_channels": 5}, "field 'block_out_channels' has a wrong type or value (5)"),
    ("vae", {"latent_channels": "16"}, "field 'latent_channels' must be an integer, found str"),
    ("llm", {"model_type": "llama", "hidden_size": "64"}, "hidden_size"),
    ("dit", ["not", "an", "object"], "holds a JSON list, expected an object of fields"),
    ("dit", "{broken", "is not valid JSON"),
])
def test_config_with_wrong_types_gives_one_line(component, config, expect, run_convert, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "config.json"
    cfg.write_text(config if isinstance(config, str) else json.dumps(config))
    # the config is checked before any weight is read: a source that cannot be opened is never reached
    monkeypatch.setattr("m141jax.convert.sources.TensorSource.__init__", _never)
    src = tmp_path / "w.safetensors"
    src.write_bytes(b"")
    assert run_convert(component, "--src", src, "--dst", tmp_path / "dst", "--config", cfg) == 2
    err = _one_error_line(capsys)
    assert f"--config {cfg}" in err and expect in err, err


def test_type_check_accepts_every_preset():
    for table in (config.DIT_PRESETS, config.VAE_PRESETS, config.LLAMA_PRESETS, config.CLIP_TEXT_PRESETS,
                  config.LLAVA_PRESETS):
        for name, cfg in table.items():
            assert config_type_problems(cfg) == [], name


def test_folder_config_is_checked_too(release_sd, run_convert, tmp_path, capsys):
    src = tmp_path / "model"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in release_sd.items()}, src / "w.safetensors")
    (src / "config.json").write_text(json.dumps({"heads_num": [4]}))
    assert run_convert("dit", "--src", src, "--dst", tmp_path / "dst") == 2
    err = _one_error_line(capsys)
    assert f"{src / 'config.json'}: field 'heads_num'" in err


# --------------------------------------------------------------- 4. DST checked before reading

def _never(*a, **k):
    raise AssertionError("weights were read before the destination / config was checked")


@pytest.mark.parametrize("case", ["exists", "parent_is_file", "ancestor_is_file", "unwritable"])
def test_destination_problems_come_before_reading_weights(case, release_pt, run_convert, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("m141jax.convert.sources.TensorSource.__init__", _never)
    if case == "exists":
        dst, expect = _fake_checkpoint(tmp_path / "dst", "dit"), "already exists; pass --overwrite"
    elif case == "parent_is_file":
        (tmp_path / "f").write_text("")
        dst, expect = tmp_path / "f" / "dst", f"cannot create {tmp_path / 'f' / 'dst'}: {tmp_path / 'f'} is not a directory"
    elif case == "ancestor_is_file":
        (tmp_path / "f").write_text("")
        dst, expect = tmp_path / "f" / "a" / "b" / "dst", f"{tmp_path / 'f'} is not a directory"
    else:
        if os.geteuid() == 0:  # root writes anywhere a permission allows nothing; /proc refuses everyone
            dst = Path("/proc/m141jax-no-such-dir/dst")
        else:
            (tmp_path / "ro").mkdir()
            os.chmod(tmp_path / "ro", 0o500)
            dst = tmp_path / "ro" / "dst"
        expect = "is not writable"
    assert _convert(run_convert, release_pt, dst) == 2
    err = _one_error_line(capsys)
    assert expect in err, err


# ------------------------------------------------------------------------- 5. stale partials

KILLED_WRITER = """
import sys, time
from pathlib import Path
from m141jax.checkpoint import atomic_dir
def write(tmp):
    (tmp / "params").mkdir()
    (tmp / "params" / "big").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(600)
atomic_dir(Path(sys.argv[1]), write)
"""


def _start_writer(dst: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(dst)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert p.stdout.readline().strip() == "writing"
    return p


def test_partials_of_a_killed_run_are_removed_by_the_next_run(release_pt, run_convert, tmp_path, capsys):
    dst = tmp_path / "dst"
    p = _start_writer(dst)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partials = [q for q in tmp_path.iterdir() if q.name.startswith(".dst.partial-")]
    assert len(partials) == 1 and (partials[0] / "params" / "big").is_file()
    time.sleep(0.05)  # the next run starts after the killed one wrote its partial
    assert _convert(run_convert, release_pt, dst) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "stale partial" in line]
    assert lines == [f"removed 1 stale partial folder(s) of {dst} left by interrupted runs: {partials[0].name}"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["dst"]


def test_a_running_writers_partial_is_kept(tmp_path):
    """A live writer's partial stays even when old: its process is alive and it holds the folder's lock;
    the lock alone protects partials of multi-process runs (named by a token, not a pid)."""
    dst = tmp_path / "dst"
    p = _start_writer(dst)
    try:
        (live,) = [q for q in tmp_path.iterdir() if q.name.startswith(".dst.partial-")]
        os.utime(live, (1, 1))
        token = checkpoint.partial_dir(dst, "0123456789abcdef")
        token.mkdir()
        os.utime(token, (1, 1))
        import fcntl

        fd = os.open(token, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            assert clean_stale_partials(dst, started=time.time()) == ([], [])
        finally:
            os.close(fd)
        assert live.is_dir() and token.is_dir()
        assert clean_stale_partials(dst, started=time.time()) == ([token], [])  # unlocked now
        assert live.is_dir()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert clean_stale_partials(dst, started=time.time()) == ([live], [])


def test_only_this_destinations_stale_partials_are_touched(tmp_path):
    dst = tmp_path / "dst"
    dead = 2 ** 22 + 12345  # above the default pid_max: never a running process
    stale = [tmp_path / f".dst.partial-{dead}-0badc0de", tmp_path / ".dst.partial-00112233deadbeef"]
    others = [tmp_path / f".dst2.partial-{dead}-0badc0de", tmp_path / f".ds.partial-{dead}-0badc0de",
              tmp_path / f"dst.partial-{dead}-0badc0de", tmp_path / ".dst.partial-mine", tmp_path / ".dst.partial-1-xyz",
              tmp_path / f".dst.partial-{dead}-0badc0de.bak", tmp_path / f".dst.partial-{dead}-1badc0de"]
    for q in stale + others:
        q.mkdir()
        (q / "f").write_text("x")
        os.utime(q, (1, 1))
    os.utime(others[-1], None)  # newer than the run: possibly a writer that has not taken its lock yet
    started = os.stat(others[-1]).st_mtime
    removed, notes = clean_stale_partials(dst, started=started)
    assert sorted(removed) == sorted(stale) and notes == []
    assert all(q.is_dir() for q in others)
    (tmp_path / "link").mkdir()
    (tmp_path / f".dst.partial-{dead}-0000aaaa").symlink_to(tmp_path / "link")
    assert clean_stale_partials(dst, started=started) == ([], [])
    assert (tmp_path / "link").is_dir()


def test_a_complete_checkpoint_left_by_an_interrupted_replace_is_kept(tmp_path):
    """Killed between atomic_dir's two renames, the old checkpoint sits in a partial and DST is missing."""
    dst = tmp_path / "dst"
    old = _fake_checkpoint(checkpoint.partial_dir(dst).with_name(f".dst.partial-{2 ** 22 + 1}-0badc0de"), "dit")
    os.utime(old, (1, 1))
    removed, notes = clean_stale_partials(dst, started=time.time())
    assert removed == [] and len(notes) == 1 and "complete checkpoint" in notes[0] and old.is_dir()
    dst.mkdir()
    assert clean_stale_partials(dst, started=time.time()) == ([old], [])


def test_partial_names_match_the_cleanup_pattern(tmp_path):
    dst = tmp_path / "my.ck"
    pattern = partial_pattern(dst)
    assert pattern.fullmatch(checkpoint.partial_dir(dst).name)
    assert pattern.fullmatch(checkpoint.partial_dir(dst, "00ff00ff00ff00ff").name)
    assert not pattern.fullmatch(checkpoint.partial_dir(tmp_path / "myxck").name)
