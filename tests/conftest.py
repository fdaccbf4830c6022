"""Test set-up: eight simulated CPU devices (set before JAX starts, so the sharding tests can build
real meshes; every other test runs on the first of them), and in-process CLI runners.

XLA's CPU client gets 16 threads whatever the core count (PJRT_NPROC): with its default, one per core, the
sharded DMD2 step on 8 devices deadlocked on 2 busy cores (two collectives in flight, each joined by 4 of
the 8 devices; it passed with 16 under the same load), and collectives wait 10 minutes for late devices
rather than XLA's 40 s. Subprocesses inherit these settings."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
_PATIENT = "--xla_cpu_collective_timeout_seconds=600 --xla_cpu_collective_call_terminate_timeout_seconds=600"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
if "collective_timeout" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {_PATIENT}"
os.environ.setdefault("PJRT_NPROC", "16")
# commands run in-process leave the user's persistent compilation cache alone (tests that want one pass a folder)
os.environ.setdefault("M141JAX_COMPILATION_CACHE", "off")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from m141jax import cli  # noqa: E402
from m141jax.cli.convert import main as convert_main  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny random checkpoint folder (`fixtures.write_tiny_checkpoints`), one per test module."""
    from fixtures import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A gradient PNG first frame (`fixtures.write_gradient_image`), one per test module."""
    from fixtures import write_gradient_image

    return write_gradient_image(tmp_path_factory.mktemp("img") / "first.png")


@pytest.fixture(scope="module")
def release_sd():
    """The state dict of a tiny random release DiT (`dit_reference`), under the release's key names."""
    from dit_reference import make_model, to_release_names

    return to_release_names(make_model(seed=0).state_dict())


@pytest.fixture(scope="module")
def release_pt(release_sd, tmp_path_factory):
    """`release_sd` saved by torch.save, as the release ships its .pt checkpoints."""
    import torch

    path = tmp_path_factory.mktemp("src") / "model.pt"
    torch.save(release_sd, path)
    return path


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
