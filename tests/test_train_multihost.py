"""Multi-host training: `m141jax train` as 2 processes × 4 CPU devices (gloo) on data=2,fsdp=2,sequence=2
writes Orbax checkpoints from both processes (asynchronously, the default), is killed with SIGKILL once
the step-2 checkpoint is complete on disk, and resumes with the same command — on the same mesh, and on
fsdp=2,tensor=2,sequence=2 with the optimizer state moved to host memory — continuing like the
one-process 8-device run: the same losses, gradient norms and final DiT up to fp32 rounding (gloo reduces
across processes in its own order)."""

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from m141jax import checkpoint
from m141jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "train" / "tiny-i2v.yaml")
MESH, OTHER = "data=2,fsdp=2,sequence=2", "fsdp=2,tensor=2,sequence=2"
STEPS = 4  # checkpoints at 2 and 4; more steps let Adam amplify gloo's rounding in near-zero parameters past 1e-6
COMMON = ["--quiet", "run.log_every=1", "run.checkpoint_every=2", "run.count_flops=false", f"run.steps={STEPS}"]


def _metrics(run: Path) -> dict:
    with open(run / "metrics.csv") as f:
        return {(int(r["step"]), r["metric"]): float(r["value"]) for r in csv.DictReader(f)
                if r["metric"] in ("loss", "grad_norm")}


def _dit(run: Path):
    return jax.tree.leaves(checkpoint.load(run / "dit", ("dit",), "fp32")[2])


def _launch(out: Path, mesh: str, *overrides: str) -> list[subprocess.Popen]:
    """`m141jax train` on 2 local processes of 4 devices each, together in a new process group; their
    output goes to OUT.log0 / OUT.log1."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "M141JAX_COMPILATION_CACHE": "off"}
    procs = []
    for i in range(2):
        with open(f"{out}.log{i}", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "m141jax", "train", "--config", CONFIG, "--output", str(out), "--mesh", mesh,
                 "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i), *COMMON, *overrides],
                env=env, stdout=log, stderr=subprocess.STDOUT, process_group=procs[0].pid if procs else 0))
    return procs


def _log(out: Path, i: int = 0) -> str:
    return Path(f"{out}.log{i}").read_text()


def _two_processes(out: Path, mesh: str, *overrides: str) -> str:
    """Run `_launch` to the end; returns process 0's output."""
    procs = _launch(out, mesh, *overrides)
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, _log(out, i)[-3000:]
    return _log(out)


def _kill_after_checkpoint(out: Path, mesh: str, step: int) -> None:
    """`_launch`, then SIGKILL the process group as soon as the checkpoint of `step` is complete: Orbax
    writes it under a temporary name and renames it to checkpoints/STEP once every process has written."""
    procs = _launch(out, mesh)
    done = out / "checkpoints" / str(step)
    deadline = time.monotonic() + 600
    try:
        while not done.is_dir():
            assert all(p.poll() is None for p in procs), f"a process ended before step {step}: {_log(out)[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint of step {step} within 600 s"
            time.sleep(0.05)
        os.killpg(procs[0].pid, signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == -signal.SIGKILL for p in procs), "the run ended before the kill: raise STEPS"


@pytest.mark.slow
def test_two_process_training_killed_and_resumed(tmp_path):
    ref = tmp_path / "one-process"
    assert main(["train", "--config", CONFIG, "--output", str(ref), "--mesh", MESH, *COMMON]) == 0
    want = _metrics(ref)
    assert len(want) == 2 * STEPS  # loss and grad_norm of every step

    run = tmp_path / "two-processes"
    _kill_after_checkpoint(run, MESH, 2)
    assert not (run / "dit").exists()
    other = tmp_path / "other-mesh"
    shutil.copytree(run, other)
    # gloo sums across processes in another order than one process does: equal to fp32 rounding
    for out, mesh, tol, extra in ((run, MESH, 1e-6, ()), (other, OTHER, 1e-5, ("optimizer.state_memory=host",))):
        resumed = _two_processes(out, mesh, *extra)
        assert any(f"resuming from step {s} " in resumed for s in range(2, STEPS, 2)), resumed[-3000:]
        got = _metrics(out)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=tol, abs=tol), (mesh, k)
        for a, b in zip(_dit(ref), _dit(out)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=10 * tol, atol=tol, err_msg=mesh)
