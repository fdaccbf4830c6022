"""DiT structure: presets, config loaders, scanned depth, input assembly, semantics of the text mask."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import TINY_I2V, TINY_T2V, tiny_dit_params

from m141jax.config import DIT_PRESETS, DiTConfig, preset
from m141jax.convert.dit import dit_config_from_dict
from m141jax.models import dit
from m141jax.models.conditioning import Conditioning


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def test_13b_presets_build_abstractly_with_exact_counts():
    assert _count(dit.abstract_params(preset("magic141-i2v-13b"))) == 12_810_991_680  # release.md B.0
    t2v = preset("hunyuan-t2v-13b")
    # 16 input channels (-17·4·3072 patch weights) plus the guidance embedder (256·3072 + 3072² + 2·3072)
    extra = -17 * 4 * 3072 + 256 * 3072 + 3072 * 3072 + 2 * 3072
    assert _count(dit.abstract_params(t2v)) == 12_810_991_680 + extra


def test_every_parameter_has_logical_names():
    specs = jax.tree_util.tree_leaves(dit.param_logical_axes(preset("tiny-i2v")),
                                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = jax.tree_util.tree_leaves(dit.abstract_params(preset("tiny-i2v")))
    assert len(specs) == len(shapes)
    for spec, shape in zip(specs, shapes):
        assert len(spec) == len(shape.shape)
    stacked = dit.param_logical_axes(preset("tiny-i2v"))["double_blocks"]["img_mlp"]["fc1"]["kernel"]
    assert tuple(stacked) == ("layers", "embed", "mlp")


def test_release_json_and_diffusers_config():
    release = {"in_channels": 33, "out_channels": 16, "hidden_size": 3072, "heads_num": 24, "mlp_width_ratio": 4,
               "mm_double_blocks_depth": 20, "mm_single_blocks_depth": 40, "rope_dim_list": [16, 56, 56],
               "rope_theta": 256, "qkv_bias": True, "qk_norm": True, "qk_norm_type": "rms", "guidance_embed": False,
               "text_states_dim": 4096, "text_states_dim_2": 768, "patch_size": [1, 2, 2], "mlp_act_type": "gelu_tanh",
               "text_projection": "single_refiner", "use_attention_mask": True}
    assert dit_config_from_dict(release) == DIT_PRESETS["magic141-i2v-13b"]
    diffusers = {"_class_name": "HunyuanVideoTransformer3DModel", "in_channels": 16, "out_channels": 16,
                 "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20, "num_single_layers": 40,
                 "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm",
                 "guidance_embeds": True, "text_embed_dim": 4096, "pooled_projection_dim": 768, "rope_theta": 256.0,
                 "rope_axes_dim": [16, 56, 56], "image_condition_type": None}
    assert dit_config_from_dict(diffusers) == DIT_PRESETS["hunyuan-t2v-13b"]
    with pytest.raises(ValueError, match="mlp_act_type='silu' is not supported"):
        dit_config_from_dict({**release, "mlp_act_type": "silu"})
    with pytest.raises(ValueError, match=r"unknown DiT config fields \['depth'\]"):
        dit_config_from_dict({**release, "depth": 3})
    with pytest.raises(ValueError, match="token_replace"):
        dit_config_from_dict({**diffusers, "image_condition_type": "token_replace"})
    with pytest.raises(ValueError, match="rope_axes"):
        DiTConfig(rope_axes=(16, 56, 48))


def _jaxpr_size(cfg):
    x = dit.dummy_inputs(cfg)
    params = dit.abstract_params(cfg)
    return str(jax.make_jaxpr(lambda p: dit.MMDiT(cfg).apply({"params": p}, *x))(params)).count("\n")


def test_program_size_does_not_grow_with_depth():
    small = preset("tiny-i2v")
    deep = dataclasses.replace(small, double_blocks=20, single_blocks=40)
    assert _jaxpr_size(deep) == _jaxpr_size(small)


forward = jax.jit(dit.dit_forward, static_argnums=1)


@pytest.fixture(scope="module")
def tiny():
    return TINY_I2V, tiny_dit_params()


def _inputs(b=2, f=2, h=4, w=6, l=5, seed=0):
    r = np.random.default_rng(seed)
    return dict(latents=jnp.asarray(r.normal(size=(b, f, h, w, 16)), jnp.float32),
                ref_latents=jnp.asarray(r.normal(size=(b, 1, h, w, 16)), jnp.float32),
                timestep=jnp.asarray([900.0, 300.0][:b]),
                cond=Conditioning(text_states=jnp.asarray(r.normal(size=(b, l, 32)), jnp.float32),
                                  text_mask=jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]][:b]),
                                  text_states_2=jnp.asarray(r.normal(size=(b, 16)), jnp.float32)))


def test_padding_text_tokens_have_no_effect(tiny):
    """Item 0 with 3 valid of 5 tokens equals the same item given only its 3 valid tokens."""
    cfg, params = tiny
    x = _inputs()
    full = forward(params, cfg, **x)
    c = x["cond"]
    trimmed = dict(x, cond=Conditioning(c.text_states[:1, :3], c.text_mask[:1, :3], c.text_states_2[:1]),
                   **{k: x[k][:1] for k in ("latents", "ref_latents", "timestep")})
    np.testing.assert_allclose(np.asarray(full[:1]), np.asarray(forward(params, cfg, **trimmed)),
                               rtol=1e-5, atol=1e-5)
    changed = dict(x, cond=c.replace(text_states=c.text_states.at[0, 3:].set(100.0)))
    np.testing.assert_allclose(np.asarray(forward(params, cfg, **changed)), np.asarray(full), atol=1e-6)


def test_attention_backends_give_the_same_velocity(tiny):
    cfg, params = tiny
    x = _inputs()
    outs = [forward(params, dataclasses.replace(cfg, attention=a, attention_block=16), **x)
            for a in ("xla", "blockwise")]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-5, atol=1e-5)


def test_reference_frame_assembly():
    cfg = preset("tiny-i2v")
    lat = jnp.ones((1, 3, 2, 2, 16))
    ref = 2 * jnp.ones((1, 1, 2, 2, 16))
    x = dit.assemble_input(cfg, lat, ref)
    assert x.shape == (1, 3, 2, 2, 33)
    np.testing.assert_array_equal(np.asarray(x[0, :, 0, 0, 16]), [2, 0, 0])  # reference zero-padded after frame 0
    np.testing.assert_array_equal(np.asarray(x[0, :, 0, 0, 32]), [1, 0, 0])  # frame-0 mask


def test_input_errors(tiny):
    cfg, params = tiny
    x = _inputs()
    with pytest.raises(ValueError, match="must be multiples of the patch size"):
        forward(params, cfg, **dict(x, latents=x["latents"][:, :, :3], ref_latents=x["ref_latents"][:, :, :3]))
    with pytest.raises(ValueError, match="needs reference latents"):
        forward(params, cfg, **dict(x, ref_latents=None))
    with pytest.raises(ValueError, match=r"latents must be \[B, F, H, W, 16\]"):
        forward(params, cfg, **dict(x, latents=x["latents"][..., :4]))
    with pytest.raises(ValueError, match="guidance embedding"):
        forward(dit.init_params(TINY_T2V, jax.random.PRNGKey(1)), TINY_T2V, **dict(x, ref_latents=None))


def test_13b_forward_lowers_at_544x960x81():
    """The released preset AOT-lowers for a 21×68×120 latent video with 402 text tokens (no weights)."""
    cfg = preset("magic141-i2v-13b")
    s = jax.ShapeDtypeStruct
    args = (s((1, 21, 68, 120, 16), jnp.float32), s((1,), jnp.float32),
            Conditioning(s((1, 402, 4096), jnp.float32), s((1, 402), jnp.int32), s((1, 768), jnp.float32)),
            s((1, 1, 68, 120, 16), jnp.float32))
    lowered = jax.jit(lambda p, *a: dit.dit_forward(p, cfg, *a)).lower(dit.abstract_params(cfg), *args)
    out = lowered.out_info
    assert out.shape == (1, 21, 68, 120, 16) and out.dtype == jnp.float32
