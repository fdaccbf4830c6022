import numpy as np
import pytest

from m141jax import cli
from m141jax.convert import main as convert_main


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
