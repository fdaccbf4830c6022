"""Test set-up: eight simulated CPU devices (set before JAX starts, so the sharding tests can build
real meshes; every other test runs on the first of them), and in-process CLI runners. Collectives between
simulated devices wait up to 10 minutes for each other (XLA's default, 40 s, aborts the process when a
loaded machine schedules some device threads late); subprocesses inherit these flags."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
_PATIENT = "--xla_cpu_collective_timeout_seconds=600 --xla_cpu_collective_call_terminate_timeout_seconds=600"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
if "collective_timeout" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {_PATIENT}"
# commands run in-process leave the user's persistent compilation cache alone (tests that want one pass a folder)
os.environ.setdefault("M141JAX_COMPILATION_CACHE", "off")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from m141jax import cli  # noqa: E402
from m141jax.cli.convert import main as convert_main  # noqa: E402


@pytest.fixture
def run_convert():
    """Run the converter in-process; returns its exit status."""
    return lambda *argv: convert_main([*map(str, argv), "--quiet"])


@pytest.fixture
def run_parity(tmp_path):
    """Run `m141jax parity COMPONENT` in-process on a dict of numpy inputs; returns the output arrays."""
    def run(component, checkpoint, inputs, *flags):
        inp, out = tmp_path / f"{component}_in.npz", tmp_path / f"{component}_out.npz"
        np.savez(inp, **{k: np.asarray(v) for k, v in inputs.items()})
        assert cli.main(["parity", component, "--checkpoint", str(checkpoint), "--inputs", str(inp),
                         "--output", str(out), *flags]) == 0
        with np.load(out) as z:
            return {k: z[k] for k in z.files}
    return run
