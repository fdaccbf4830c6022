"""`m141jax init-i2v`: a converted T2V DiT (diffusers HunyuanVideoTransformer3DModel, random weights, guidance
embedding) becomes the 33-channel I2V DiT whose velocity at initialisation is the T2V model's at the folded
guidance scale, whatever the reference latent; `m141jax train init=` starts from it.

The reference is diffusers' T2V forward with the correctly rounded timestep table (see tests/test_dit_parity.py:
at t, g·1000 up to 6000 torch's float32 table is a few ulps off, which no fp32 implementation matches)."""

import diffusers.models.embeddings
import jax
import numpy as np
import pytest
import torch
from dit_reference import correctly_rounded_timestep_embedding, make_inputs, make_model, reference_velocity
from numerics import rel_err

from m141jax import checkpoint
from m141jax.cli import main
from m141jax.config import preset
from m141jax.train.init_i2v import guidance_vector

TOL = 1e-5


@pytest.fixture(autouse=True)
def _rounded_sinusoid(monkeypatch):
    monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", correctly_rounded_timestep_embedding)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    """(diffusers T2V model, its converted fp32 checkpoint)."""
    from m141jax.cli.convert import main as convert_main
    model = make_model(seed=7, i2v=False)
    d = tmp_path_factory.mktemp("t2v")
    model.save_pretrained(d / "hf")
    assert convert_main(["dit", "--src", str(d / "hf"), "--dst", str(d / "t2v"), "--dtype", "fp32", "--quiet"]) == 0
    return model, d / "t2v"


def _i2v_inputs(x, seed):
    g = torch.Generator().manual_seed(seed)
    b, _, _, h, w = x["latents"].shape
    out = {k: v.numpy() for k, v in x.items() if k != "guidance"}
    out["ref_latents"] = torch.randn(b, 16, 1, h, w, generator=g).numpy() * 3.0
    return out


@pytest.mark.parametrize("guidance", [6.0, 3.5])
def test_i2v_velocity_equals_t2v_at_guidance(t2v, tmp_path, run_parity, guidance):
    model, src = t2v
    dst = tmp_path / "i2v"
    assert main(["init-i2v", "--src", str(src), "--dst", str(dst), "--guidance", str(guidance)]) == 0

    _, cfg, params = checkpoint.load(dst, ("dit",), "fp32")
    assert cfg.architecture() == preset("tiny-i2v").architecture()  # 33 channels, no guidance input
    assert "guidance_in" not in params
    kernel = np.asarray(params["img_in"]["kernel"]).reshape(1, 2, 2, 33, -1)
    _, _, t2v_params = checkpoint.load(src, ("dit",), "fp32")
    assert np.array_equal(kernel[..., :16, :], np.asarray(t2v_params["img_in"]["kernel"]).reshape(1, 2, 2, 16, -1))
    assert not kernel[..., 16:, :].any()  # reference and mask rows start at zero
    folded = np.asarray(params["time_in"]["mlp_2"]["bias"]) - np.asarray(t2v_params["time_in"]["mlp_2"]["bias"])
    assert np.abs(folded).max() > 0.1 and np.allclose(folded, guidance_vector(t2v_params, cfg, guidance), atol=1e-6)

    x = make_inputs(b=2, f=2, valid=(7, 3), i2v=False, seed=11)
    x["guidance"] = torch.full((2,), guidance * 1000.0)
    want = reference_velocity(model, x)  # diffusers' T2V forward at the embedded guidance
    other = dict(x, guidance=torch.full((2,), 1000.0))
    assert rel_err(reference_velocity(model, other), want) > 1e-2  # the guidance really matters
    for seed in (1, 2):  # any reference latent
        got = run_parity("dit", dst, _i2v_inputs(x, seed))["velocity"]
        assert got.shape == want.shape == (2, 16, 2, 8, 8)
        assert rel_err(got, want) <= TOL


def test_refusals_and_train_from_result(t2v, tmp_path, capsys):
    _, src = t2v
    dst = tmp_path / "i2v"
    assert main(["init-i2v", "--src", str(src), "--dst", str(dst)]) == 0
    capsys.readouterr()
    assert main(["init-i2v", "--src", str(src), "--dst", str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["init-i2v", "--src", str(src), "--dst", str(dst), "--overwrite", "--guidance", "5"]) == 0
    assert main(["init-i2v", "--src", str(dst), "--dst", str(tmp_path / "x")]) == 2
    assert "in_channels=33" in capsys.readouterr().err
    assert main(["init-i2v", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "y")]) == 2
    assert "not an m141jax checkpoint" in capsys.readouterr().err

    # `train init=` accepts the result: with a zero learning rate the exported DiT is the initialisation
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), "--quiet", "--mesh", "fsdp=-1", "preset=tiny-i2v", f"init={dst}",
                 "data.batch_size=8", "run.steps=1", "run.log_every=1", "optimizer.learning_rate=0",
                 "optimizer.warmup_steps=0"]) == 0
    trained, init = checkpoint.load_params(run / "dit"), checkpoint.load_params(dst)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), trained, init))
