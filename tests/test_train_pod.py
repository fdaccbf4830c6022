"""Four-axis training: `m141jax train` / `distill` on data×fsdp×tensor×sequence meshes (Ulysses or ring
attention over `sequence` in every forward and backward pass) log the same losses and gradient norms as
on fsdp=8 (≤1e-4), and export DiTs that answer `m141jax parity dit` alike (≤1e-4)."""

import csv
from pathlib import Path

import jax
import numpy as np
import pytest
from fixtures import dit_inputs
from numerics import assert_close

from m141jax import checkpoint
from m141jax.cli import main
from m141jax.config import preset
from m141jax.parallel import make_mesh
from m141jax.train.mesh import dit_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MESHES = ("fsdp=8", "data=2,fsdp=2,sequence=2", "fsdp=2,tensor=2,sequence=2")
COMMON = ["run.steps=2", "run.log_every=1", "run.checkpoint_every=100", "run.count_flops=false",
          "run.async_checkpoints=false"]


def _metrics(path):
    with open(path) as f:
        return {(int(r["step"]), r["metric"]): float(r["value"]) for r in csv.DictReader(f)}


def _run(tmp_path, command, mesh, *extra):
    out = tmp_path / f"{command}-{mesh.replace(',', '-').replace('=', '')}"
    config = str(CONFIGS / command / "tiny-i2v.yaml")
    assert main([command, "--config", config, "--output", str(out), "--mesh", mesh, "--quiet", *COMMON, *extra]) == 0
    return out


def _parity_inputs():
    """`parity dit` inputs for the tiny I2V DiT (channels-first, as the parity contract has them)."""
    latents, t, cond, ref = dit_inputs(2)
    return {"latents": np.moveaxis(np.asarray(latents), -1, 1), "ref_latents": np.moveaxis(np.asarray(ref), -1, 1),
            "timestep": np.asarray(t), **{k: np.asarray(v) for k, v in cond.to_dict().items()}}


def _compare(runs, keys, export, run_parity):
    base = _metrics(runs[0] / "metrics.csv")
    dit = checkpoint.load(runs[0] / export, ("dit",), "fp32")[2]
    want = run_parity("dit", runs[0] / export, _parity_inputs())["velocity"]
    assert np.abs(want).max() > 0.1
    for run in runs[1:]:
        got = _metrics(run / "metrics.csv")
        checked = [k for k in base if k[1] in keys]
        assert len(checked) >= 2 and set(checked) <= set(got)
        for k in checked:
            assert got[k] == pytest.approx(base[k], rel=1e-4, abs=1e-4), (run.name, k)
        other = checkpoint.load(run / export, ("dit",), "fp32")[2]
        for a, b in zip(jax.tree.leaves(dit), jax.tree.leaves(other)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        # the final DiTs answer `m141jax parity dit` alike
        assert_close(run_parity("dit", run / export, _parity_inputs())["velocity"], want, 1e-4, what=run.name)


def test_sequence_parallel_method_from_the_mesh():
    cfg = preset("tiny-i2v")  # 4 heads
    assert dit_config(cfg, make_mesh("fsdp=8")).sequence_parallel == "none"
    assert dit_config(cfg, make_mesh("data=2,fsdp=2,sequence=2")).sequence_parallel == "ulysses"
    assert dit_config(cfg, make_mesh("fsdp=2,tensor=2,sequence=2")).sequence_parallel == "ulysses"
    assert dit_config(cfg, make_mesh("fsdp=1,sequence=8")).sequence_parallel == "ring"  # 4 heads, 8 shards


@pytest.mark.slow
def test_train_on_four_axes(tmp_path, run_parity):
    runs = [_run(tmp_path, "train", m) for m in MESHES]
    runs.append(_run(tmp_path, "train", MESHES[1], "model.sequence_parallel=ring", "run.shard_min_size=4096"))
    _compare(runs, ("loss", "grad_norm"), "dit", run_parity)


@pytest.mark.slow
def test_distill_on_four_axes(tmp_path, run_parity):
    runs = [_run(tmp_path, "distill", m) for m in MESHES]
    _compare(runs, ("gen_loss_dm", "gen_loss_gan", "gen_grad_norm", "critic_loss_fake", "critic_loss_disc",
                    "critic_grad_norm"), "generator", run_parity)
