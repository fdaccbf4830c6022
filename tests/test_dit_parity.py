"""DiT parity against diffusers' HunyuanVideoTransformer3DModel (random weights), converted by our
converter from diffusers names and from the release's names, run through `m141jax parity dit`.

diffusers differs from the release in two places that matter here, and the release wins:
- the final layer's modulation is stored (scale, shift) in diffusers, (shift, scale) in the release;
  the converter swaps it back, and the release-named checkpoint carries the release order;
- diffusers' I2V pipeline repeats the reference latent over all frames; the release zero-pads it after
  frame 0 with a frame-0 mask. The reference here is fed the release's 33-channel assembly.
Padding text tokens attend among themselves in the release and to the valid tokens in diffusers; the
image-token outputs (the velocity) are identical either way.
The reference's timestep sinusoid uses the correctly rounded frequency table (see
`correctly_rounded_timestep_embedding`); `test_timestep_embedding_vs_torch` bounds the difference to
torch's own table.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
embeddings = pytest.importorskip("diffusers.models.embeddings")
from dit_reference import correctly_rounded_timestep_embedding, make_inputs, make_model, reference_velocity, to_release_names  # noqa: E402
from numerics import rel_err  # noqa: E402

from m141jax.models.layers import timestep_sinusoid  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _rounded_sinusoid(monkeypatch):
    monkeypatch.setattr(embeddings, "get_timestep_embedding", correctly_rounded_timestep_embedding)


@pytest.mark.parity
@pytest.mark.parametrize("t", [0.0, 1.0, 250.0, 1000.0, 6000.0])
def test_timestep_embedding_vs_torch(t, monkeypatch):
    """Against torch's own float32 table (un-patched): equal up to a few ulps of t·frequency."""
    monkeypatch.undo()
    want = embeddings.get_timestep_embedding(torch.tensor([t]), 256, True, 0).numpy()
    got = np.asarray(timestep_sinusoid(jnp.asarray([t])))
    assert np.abs(got - want).max() <= 1e-6 + t * 2.0 ** -22
    assert np.abs(got - correctly_rounded_timestep_embedding(torch.tensor([t]), 256, True, 0).numpy()).max() <= 1e-6


def _np(x):
    return {k: v.numpy() for k, v in x.items()}


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    model = make_model(seed=0, i2v=True)
    d = tmp_path_factory.mktemp("i2v")
    model.save_pretrained(d / "hf")
    return model, d


@pytest.fixture(scope="module")
def i2v_ckpt(i2v):
    from m141jax.cli.convert import main
    model, d = i2v
    assert main(["dit", "--src", str(d / "hf"), "--dst", str(d / "ck"), "--dtype", "fp32", "--quiet"]) == 0
    return d / "ck"


@pytest.mark.parity
def test_i2v_batch_with_different_text_lengths(i2v, i2v_ckpt, run_parity):
    model, _ = i2v
    x = make_inputs(b=2, f=3, valid=(7, 4))
    want = reference_velocity(model, x)
    got = run_parity("dit", i2v_ckpt, _np(x))["velocity"]
    assert got.shape == want.shape == (2, 16, 3, 8, 8)
    assert rel_err(got, want) <= TOL


@pytest.mark.parity
def test_image_single_frame(i2v, i2v_ckpt, run_parity):
    model, _ = i2v
    x = make_inputs(b=2, f=1, h=6, w=10, valid=(5, 7), seed=3)
    assert rel_err(run_parity("dit", i2v_ckpt, _np(x))["velocity"], reference_velocity(model, x)) <= TOL


@pytest.mark.parity
def test_release_names_wrapped_and_prefixed(i2v, run_convert, run_parity, tmp_path):
    """A release-named .pt ({'state_dict': {'module.' + key: ...}}) converts to the same model."""
    model, _ = i2v
    sd = {f"module.{k}": v for k, v in to_release_names(model.state_dict()).items()}
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "dmd_4_step_i2v.pth")
    cfg = tmp_path / "video_dit_config.json"
    cfg.write_text('{"in_channels": 33, "out_channels": 16, "hidden_size": 64, "heads_num": 4, '
                   '"mlp_width_ratio": 4, "mm_double_blocks_depth": 2, "mm_single_blocks_depth": 2, '
                   '"rope_dim_list": [4, 6, 6], "rope_theta": 256, "qkv_bias": true, "qk_norm": true, '
                   '"qk_norm_type": "rms", "guidance_embed": false, "text_states_dim": 32, "text_states_dim_2": 16, '
                   '"patch_size": [1, 2, 2], "mlp_act_type": "gelu_tanh"}')
    assert run_convert("dit", "--src", tmp_path / "dmd_4_step_i2v.pth", "--dst", tmp_path / "ck",
                       "--config", cfg, "--dtype", "fp32") == 0
    x = make_inputs(b=2, f=2, valid=(6, 3), seed=5)
    assert rel_err(run_parity("dit", tmp_path / "ck", _np(x))["velocity"], reference_velocity(model, x)) <= TOL


@pytest.mark.parity
def test_t2v_guidance_embedding(run_convert, run_parity, tmp_path):
    """The T2V architecture (16 channels, no reference, guidance embedding) from a single safetensors file."""
    model = make_model(seed=2, i2v=False)
    model.save_pretrained(tmp_path / "hf")
    assert run_convert("dit", "--src", tmp_path / "hf" / "diffusion_pytorch_model.safetensors",
                       "--dst", tmp_path / "ck", "--config", tmp_path / "hf" / "config.json", "--dtype", "fp32") == 0
    x = make_inputs(b=2, f=1, valid=(7, 2), i2v=False, seed=4)
    assert rel_err(run_parity("dit", tmp_path / "ck", _np(x))["velocity"], reference_velocity(model, x)) <= TOL


def test_bf16_within_bf16_tolerance(i2v_ckpt, run_parity):
    x = _np(make_inputs(b=2, f=2, valid=(7, 4), seed=6))
    fp32 = run_parity("dit", i2v_ckpt, x)["velocity"]
    bf16 = run_parity("dit", i2v_ckpt, x, "--dtype", "bf16")["velocity"]
    assert np.isfinite(bf16).all()
    err = np.abs(bf16 - fp32)
    # bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); a few layers compound it
    assert err.mean() / np.abs(fp32).mean() < 0.02
    assert 0 < rel_err(bf16, fp32) < 0.05  # > 0: really ran in bf16
