"""Multi-host training: `m141jax train` as 2 processes × 4 CPU devices (gloo) on data=2,fsdp=2,sequence=2
writes an Orbax checkpoint from both processes, stops, and resumes — on the same mesh and on
fsdp=2,tensor=2,sequence=2 — continuing like the one-process 8-device run: the same losses, gradient
norms and final DiT up to fp32 rounding (gloo reduces across processes in its own order)."""

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from m141jax import checkpoint
from m141jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "train" / "tiny-i2v.yaml")
MESH, OTHER = "data=2,fsdp=2,sequence=2", "fsdp=2,tensor=2,sequence=2"
COMMON = ["--quiet", "run.log_every=1", "run.checkpoint_every=2", "run.count_flops=false",
          "run.async_checkpoints=false"]


def _metrics(run: Path) -> dict:
    with open(run / "metrics.csv") as f:
        return {(int(r["step"]), r["metric"]): float(r["value"]) for r in csv.DictReader(f)
                if r["metric"] in ("loss", "grad_norm")}


def _dit(run: Path):
    return jax.tree.leaves(checkpoint.load(run / "dit", ("dit",), "fp32")[2])


def _two_processes(out: Path, mesh: str, steps: int) -> str:
    """`m141jax train` on 2 local processes of 4 devices each; returns process 0's output."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "M141JAX_COMPILATION_CACHE": "off"}
    procs = [subprocess.Popen([sys.executable, "-m", "m141jax", "train", "--config", CONFIG, "--output", str(out),
                               "--mesh", mesh, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i), *COMMON, f"run.steps={steps}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-3000:]
    return outs[0]


@pytest.mark.slow
def test_two_process_training_checkpoints_and_resumes(tmp_path):
    ref = tmp_path / "one-process"
    assert main(["train", "--config", CONFIG, "--output", str(ref), "--mesh", MESH, *COMMON, "run.steps=4"]) == 0
    want = _metrics(ref)
    assert len(want) == 8  # loss and grad_norm of steps 1..4

    run = tmp_path / "two-processes"
    _two_processes(run, MESH, 2)  # both processes write the step-2 checkpoint together, then stop
    assert (run / "checkpoints" / "2").is_dir()
    other = tmp_path / "other-mesh"
    shutil.copytree(run, other)
    # gloo sums across processes in another order than one process does: equal to fp32 rounding
    for out, mesh, tol in ((run, MESH, 1e-6), (other, OTHER, 1e-5)):
        assert "resuming from step 2" in _two_processes(out, mesh, 4)
        got = _metrics(out)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=tol, abs=tol), (mesh, k)
        for a, b in zip(_dit(ref), _dit(out)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=10 * tol, atol=tol, err_msg=mesh)
