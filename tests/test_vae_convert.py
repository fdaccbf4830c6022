"""`tools/convert_torch_weights.py vae` and `python -m m141jax parity vae-encode|vae-decode`:
release-style and diffusers-style sources, config resolution, checked keys and shapes, CLI round trip."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from numerics import assert_close  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from m141jax import checkpoint  # noqa: E402
from m141jax.cli import main as cli_main  # noqa: E402
from m141jax.cli.convert import main as convert_main  # noqa: E402
from m141jax.config import VAEConfig  # noqa: E402
from m141jax.convert import vae as convert_vae  # noqa: E402
from m141jax.convert.plan import PlanError  # noqa: E402
from m141jax.convert.vae import vae_config_from_dict  # noqa: E402
from m141jax.io import save_npz  # noqa: E402

TINY = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, latent_channels=16, layers_per_block=2)
RELEASE_CONFIG = {  # the release's vae/config.json, at tiny widths
    "_class_name": "AutoencoderKLCausal3D", "_diffusers_version": "0.4.2", "act_fn": "silu",
    "block_out_channels": [8, 16, 16, 16], "down_block_types": ["DownEncoderBlockCausal3D"] * 4,
    "in_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 4, "out_channels": 3,
    "sample_size": 64, "sample_tsize": 32, "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "scaling_factor": 0.476986, "time_compression_ratio": 4, "mid_block_add_attention": True,
}


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return diffusers.AutoencoderKLHunyuanVideo(**TINY).eval()


@pytest.fixture()
def state(ref):
    return {k: v.clone() for k, v in ref.state_dict().items()}


def test_release_checkpoint_with_vae_prefix_and_foreign_keys(ref, state, tmp_path):
    """The release's pytorch_model.pt: {'state_dict': {'vae.*': ..., other keys}}; only 'vae.*' is read."""
    src, cfg_file, dst = tmp_path / "pytorch_model.pt", tmp_path / "config.json", tmp_path / "ckpt"
    torch.save({"state_dict": {**{f"vae.{k}": v for k, v in state.items()}, "loss.logvar": torch.zeros(())}}, src)
    cfg_file.write_text(json.dumps(RELEASE_CONFIG))
    assert convert_main(["vae", "--src", str(src), "--dst", str(dst), "--config", str(cfg_file), "--dtype", "fp32",
                         "--quiet"]) == 0
    meta = checkpoint.read_meta(dst, "vae")
    assert meta["config"]["sample_size"] == 64 and meta["config"]["block_out_channels"] == [8, 16, 16, 16]
    params = checkpoint.load_params(dst)
    w = state["decoder.up_blocks.0.upsamplers.0.conv.conv.weight"].numpy()
    np.testing.assert_array_equal(params["decoder"]["up_blocks_0"]["upsamplers_0"]["conv"]["conv"]["kernel"],
                                  w.transpose(2, 3, 4, 1, 0))
    w = state["encoder.mid_block.attentions.0.to_out.0.weight"].numpy()
    np.testing.assert_array_equal(params["encoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"], w.T)
    np.testing.assert_array_equal(params["quant_conv"]["kernel"][0, 0, 0],
                                  state["quant_conv.weight"].numpy()[:, :, 0, 0, 0].T)
    np.testing.assert_array_equal(params["encoder"]["conv_norm_out"]["scale"], state["encoder.conv_norm_out.weight"].numpy())


def test_all_vae_prefixed_keys_are_stripped(state, tmp_path):
    src = tmp_path / "vae.safetensors"
    save_file({f"vae.{k}": v.contiguous() for k, v in state.items()}, src)
    cfg, params = convert_vae.convert(str(src), "tiny-vae", np.float32, progress=False)
    assert cfg == VAEConfig(**TINY, param_dtype="fp32")
    assert params["post_quant_conv"]["kernel"].shape == (1, 1, 1, 16, 16)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("decoder.conv_out.conv.bias"), "1 missing keys:\n  decoder.conv_out.conv.bias"),
    (lambda s: s.update({"decoder.extra.weight": torch.zeros(2)}), "1 unexpected keys:\n  decoder.extra.weight"),
    (lambda s: s.update({"encoder.conv_in.conv.weight": torch.zeros(8, 3, 3, 3, 1)}),
     "encoder.conv_in.conv.weight: expected \\[8, 3, 3, 3, 3\\], found \\[8, 3, 3, 3, 1\\]"),
])
def test_key_and_shape_errors_are_listed_and_nothing_is_written(state, tmp_path, capsys, edit, message):
    edit(state)
    src, dst = tmp_path / "vae.safetensors", tmp_path / "ckpt"
    save_file({k: v.contiguous() for k, v in state.items()}, src)
    with pytest.raises(PlanError, match=message):
        convert_vae.convert(str(src), "tiny-vae", np.float32, progress=False)
    assert convert_main(["vae", "--src", str(src), "--dst", str(dst), "--config", "tiny-vae", "--quiet"]) == 2
    assert "does not match the model configuration" in capsys.readouterr().err
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]


def test_wrong_config_for_the_weights_is_a_shape_error(state, tmp_path):
    src = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, src)
    with pytest.raises(PlanError, match="shape mismatches"):
        convert_vae.convert(str(src), "small-vae", np.float32, progress=False)
    with pytest.raises(ValueError, match="neither a JSON file nor a preset"):
        convert_vae.convert(str(src), "huge-vae", np.float32, progress=False)


def test_config_files_release_and_diffusers():
    assert vae_config_from_dict(RELEASE_CONFIG) == VAEConfig(**TINY, sample_size=64, sample_tsize=32)
    diffusers_cfg = dict(diffusers.AutoencoderKLHunyuanVideo(**TINY).config)
    assert vae_config_from_dict(diffusers_cfg) == VAEConfig(**TINY)  # the release's 256 px / 64-frame tiles
    assert vae_config_from_dict({}) == VAEConfig()
    with pytest.raises(ValueError, match="down_block_types"):
        vae_config_from_dict({**RELEASE_CONFIG, "down_block_types": ["DownEncoderBlockCausal3D"] * 3})
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        vae_config_from_dict({**RELEASE_CONFIG, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="unknown VAE config fields \\['shift_factor'\\]"):
        vae_config_from_dict({**RELEASE_CONFIG, "shift_factor": 0.1})


@pytest.mark.slow
@pytest.mark.parity
def test_parity_cli_round_trip(ref, tmp_path):
    """diffusers folder -> converter CLI -> `m141jax parity vae-encode|vae-decode` -> compare."""
    folder, dst = tmp_path / "diffusers", tmp_path / "ckpt"
    ref.save_pretrained(folder)
    assert convert_main(["vae", "--src", str(folder), "--dst", str(dst), "--dtype", "fp32", "--quiet"]) == 0
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (1, 3, 5, 16, 16)).astype(np.float32)  # PyTorch layout [B, C, F, H, W]
    latents = rng.standard_normal((1, 16, 2, 2, 2)).astype(np.float32)
    save_npz(tmp_path / "enc.npz", {"video": video})
    save_npz(tmp_path / "dec.npz", {"latents": latents})
    for component, name in (("vae-encode", "enc"), ("vae-decode", "dec")):
        assert cli_main(["parity", component, "--checkpoint", str(dst), "--inputs", str(tmp_path / f"{name}.npz"),
                         "--output", str(tmp_path / f"{name}-out.npz"), "--tiling", "off"]) == 0
    ref.use_framewise_encoding = ref.use_framewise_decoding = False
    with torch.no_grad():
        want_mean = ref.encode(torch.from_numpy(video)).latent_dist.mean.numpy()
        want_video = ref.decode(torch.from_numpy(latents)).sample.numpy()
    enc, dec = np.load(tmp_path / "enc-out.npz"), np.load(tmp_path / "dec-out.npz")
    assert enc["latent_mean"].shape == want_mean.shape == (1, 16, 2, 2, 2)
    assert_close(enc["latent_mean"], want_mean, 1e-5)
    assert dec["video"].shape == want_video.shape == (1, 3, 5, 16, 16)
    assert_close(dec["video"], want_video, 5e-5)
