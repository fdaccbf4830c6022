"""Weight-only quantization: format error bounds, layouts, quantized forwards, checkpoints, the 13B sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import TINY_I2V, dit_inputs, tiny_dit_params, tiny_sample
from numerics import rel_err
from PIL import Image

from m141jax import checkpoint, cli, parallel, sampling
from m141jax.compress import bits as bitpack
from m141jax.compress import layout, quant
from m141jax.compress.box import densify, is_box, nbytes
from m141jax.config import CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, preset, to_json_dict
from m141jax.models import clip, dit, llama, llava


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_round_trip(bits):
    codes = jax.random.randint(jax.random.PRNGKey(bits), (3, 16, 5), 0, 2 ** bits).astype(jnp.uint8)
    packed = bitpack.pack_bits(codes, bits)
    assert packed.shape == (3, 16 * bits // 8, 5) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(bitpack.unpack_bits(packed, bits), codes)


def _weights(shape, seed=0):
    """Gaussian weights with one outlier channel, one all-zero output channel and a zero input row."""
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape), np.float32) * 0.02
    w[..., 0, 1] = 3.0  # an outlier in output channel 1
    w[..., :, 2] = 0.0  # a dead output channel
    w[..., 5, :] = 0.0
    return jnp.asarray(w)


def test_int8_error_within_half_a_step():
    w = _weights((2, 96, 7))
    lay = layout.Layout(lead=1, n_in=1, shape=(96, 7))
    q = quant.quantize_kernel(w, lay, "int8")
    assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape and int(jnp.abs(q.codes).max()) == 127
    s = np.abs(np.asarray(w)).max(axis=1, keepdims=True) / 127
    np.testing.assert_allclose(q.scales, s, rtol=1e-6)
    err = np.abs(np.asarray(q.unbox()) - np.asarray(w))
    assert (err <= s / 2 * (1 + 1e-6) + 1e-12).all()
    assert err.max() > s.max() / 8  # the codes are really 8-bit (not exact)
    assert (np.asarray(q.unbox())[..., 2] == 0).all()


def test_int4_error_within_half_a_group_step():
    w = _weights((2, 96, 7))
    lay = layout.Layout(lead=1, n_in=1, shape=(96, 7))
    q = quant.quantize_kernel(w, lay, "int4", group=32)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (2, 48, 7)
    assert q.scales.dtype == jnp.uint8 and q.scales.shape == (2, 3, 7) and q.channel_unit.shape == (2, 1, 7)
    nibbles = np.asarray(bitpack.unpack_bits(q.codes, 4))
    assert nibbles.min() >= 1 and nibbles.max() <= 15  # codes −7..7
    groups = np.abs(np.asarray(w)).reshape(2, 3, 32, 7).max(axis=2) / 7  # s_g
    unit = groups.max(axis=1, keepdims=True) / 255
    s_hat = np.asarray(q.effective_scales())
    assert (s_hat >= groups * (1 - 1e-6)).all() and (s_hat <= (groups + unit) * (1 + 1e-6)).all()
    err = np.abs(np.asarray(q.unbox()) - np.asarray(w)).reshape(2, 3, 32, 7)
    assert (err <= s_hat[:, :, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert (np.asarray(q.unbox())[..., 2] == 0).all()
    # 4 bits per weight + 8 bits per group of 32 + one float32 per channel
    assert nbytes(q) == 2 * 96 * 7 // 2 + 2 * 3 * 7 + 2 * 7 * 4


def test_multi_axis_kernels_scale_per_output_channel():
    """An attention output projection [layers, heads, head_dim, out] contracts heads and head_dim."""
    axes = quant.dit_layouts(TINY_I2V)
    chosen = layout.select(tiny_dit_params(), axes)
    assert chosen["double_blocks/img_attn_proj/kernel"] == layout.Layout(1, 2, (4, 16, 64))
    assert chosen["double_blocks/img_attn/qkv/kernel"] == layout.Layout(1, 1, (64, 3, 4, 16))
    w = tiny_dit_params()["double_blocks"]["img_attn_proj"]["kernel"]
    q = quant.quantize_kernel(w, chosen["double_blocks/img_attn_proj/kernel"], "int8")
    np.testing.assert_allclose(q.scales[:, 0], np.abs(np.asarray(w)).max(axis=(1, 2)) / 127, rtol=1e-6)
    assert axes["double_blocks/img_attn_proj/kernel"] == (1, 2)  # stored by the layer, not read from names


def test_dit_quantized_as_the_release():
    """int4 in the transformer blocks (modulation included), int8 on the other kernels, nothing else."""
    q = quant.quantize_dit(tiny_dit_params(), TINY_I2V, "int4")
    boxes = {parallel.path_str(p): b.bits for p, b in
             jax.tree_util.tree_flatten_with_path(q, is_leaf=is_box)[0] if is_box(b)}
    assert set(boxes) == set(layout.select(tiny_dit_params(), quant.dit_layouts(TINY_I2V)))  # every kernel
    for path, bits in boxes.items():
        assert bits == (4 if path.startswith(("double_blocks/", "single_blocks/", "txt_in/blocks/")) else 8), path
    assert boxes["double_blocks/img_mod/linear/kernel"] == 4 and boxes["final_layer/linear/kernel"] == 8
    assert not is_box(q["double_blocks"]["img_attn"]["q_norm"]["scale"])
    assert not is_box(q["final_layer"]["linear"]["bias"])


def test_int4_refuses_inputs_not_divisible_by_the_group():
    axes = quant.dit_layouts(TINY_I2V)
    chosen = layout.select(tiny_dit_params(), axes, include=(r"^img_in/kernel$",))  # 4·33 = 132 inputs
    with pytest.raises(ValueError, match="img_in/kernel has 132 inputs"):
        quant.quantize(tiny_dit_params(), chosen, "int4")
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        quant.quantize(tiny_dit_params(), chosen, "int3")


def test_sampler_with_quantized_dit_stays_close():
    dense = tiny_sample(tiny_dit_params())
    q8 = quant.quantize_dit(tiny_dit_params(), TINY_I2V, "int8")
    out = tiny_sample(q8)
    assert 0 < rel_err(out, dense, ord=2) < 0.02
    # the layers dequantise the boxes they read: dequantising the whole tree first gives the same result
    np.testing.assert_allclose(tiny_sample(densify(q8)), out, atol=1e-5)
    assert 0 < rel_err(tiny_sample(quant.quantize_dit(tiny_dit_params(), TINY_I2V, "int4")), dense, ord=2) < 0.25


def test_generate_quantize_flag(monkeypatch, tmp_path):
    """`generate --quantize int4`: the loaded DiTs' blocks int4 (other kernels int8), encoders int8, VAE as loaded."""
    from m141jax import components, pipeline
    from m141jax.encoders import Encoders

    lcfg = _llama_cfg()
    enc = Encoders(llm=lcfg, clip=None, vlm=None, params={"language_model": llama.init_params(lcfg, jax.random.PRNGKey(0))},
                   tokenizer=None, clip_tokenizer=None, crop=0)
    monkeypatch.setattr(quant, "encoder_layouts",
                        lambda e: {f"language_model/{k}": v for k, v in llama.kernel_layouts(lcfg).items()})
    vae = components.Component(cfg="vae-config", params={"kernel": jnp.ones((4, 4))})
    own = jax.tree_util.tree_map(jnp.copy, tiny_dit_params())  # quantize_models frees the dense weights it loaded
    loaded = components.Models(dit=components.Component(TINY_I2V, own), vae=vae, encoders=enc)
    monkeypatch.setattr(components, "load_models", lambda *a, **k: loaded)
    seen = {}
    monkeypatch.setattr(pipeline, "generate", lambda models, *a, **k: seen.setdefault("models", models) and [])
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "first.png")
    assert cli.main(["generate", "--prompt", "a cat", "--image", str(tmp_path / "first.png"), "--size", "64x64",
                     "--frames", "9", "--quantize", "int4", "--quiet"]) == 0
    models = seen["models"]
    assert models.dit.params["double_blocks"]["img_mlp"]["fc1"]["kernel"].bits == 4
    assert models.dit.params["img_in"]["kernel"].bits == 8
    assert models.encoders.params["language_model"]["layers"]["q_proj"]["kernel"].bits == 8
    assert models.vae is vae and models.t2i is None
    assert own["double_blocks"]["img_mlp"]["fc1"]["kernel"].is_deleted()


def test_quantized_checkpoint_round_trip(tmp_path):
    q = quant.quantize_dit(tiny_dit_params(), TINY_I2V, "int4")
    checkpoint.save(tmp_path / "q", "dit", to_json_dict(TINY_I2V), q)
    info, back = checkpoint.read_meta(tmp_path / "q"), checkpoint.load(tmp_path / "q", dtype=None)[2]
    kernels = layout.select(tiny_dit_params(), quant.dit_layouts(TINY_I2V))
    assert info["component"] == "dit" and len(info["compressed"]) == len(kernels)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(q)
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(tiny_sample(back), tiny_sample(q))
    half = checkpoint.load(tmp_path / "q", dtype="bf16")[2]
    box = half["double_blocks"]["img_mlp"]["fc1"]["kernel"]
    assert box.dtype == "bfloat16" and box.unbox().dtype == jnp.bfloat16 and box.channel_unit.dtype == jnp.float32
    assert half["img_in"]["bias"].dtype == jnp.bfloat16 and half["img_in"]["kernel"].dtype == "bfloat16"
    with pytest.raises(checkpoint.CheckpointError, match="holds a 'dit' checkpoint; accepted: vae"):
        checkpoint.load(tmp_path / "q", ("vae",))


def test_quantize_command(tmp_path):
    checkpoint.save(tmp_path / "dense", "dit", to_json_dict(TINY_I2V), tiny_dit_params())
    assert cli.main(["quantize", "--src", str(tmp_path / "dense"), "--dst", str(tmp_path / "q8"),
                     "--mode", "int8"]) == 0
    q = checkpoint.load(tmp_path / "q8", dtype=None)[2]
    assert isinstance(q["single_blocks"]["linear1_mlp"]["kernel"], quant.QArray)
    assert rel_err(tiny_sample(q), tiny_sample(tiny_dit_params()), ord=2) < 0.02
    assert cli.main(["quantize", "--src", str(tmp_path / "dense"), "--dst", str(tmp_path / "q8"),
                     "--mode", "int8"]) == 2  # exists


@pytest.mark.slow
def test_checkpoint_folder_with_a_quantized_dit(tmp_path):
    """A dit/ written by `m141jax quantize` loads compressed into generation (no dense copy), also split
    over a mesh, where sampling gives the one-device result."""
    from m141jax import components

    checkpoint.save(tmp_path / "dense", "dit", to_json_dict(TINY_I2V), tiny_dit_params())
    assert cli.main(["quantize", "--src", str(tmp_path / "dense"), "--dst", str(tmp_path / "root" / "dit"),
                     "--mode", "int4"]) == 0
    c = components.load_component(tmp_path / "root", "dit", dtype="fp32")
    assert c.cfg == TINY_I2V and c.params["double_blocks"]["img_mlp"]["fc1"]["kernel"].bits == 4
    stored = checkpoint.load(tmp_path / "root" / "dit", dtype=None)[2]
    np.testing.assert_array_equal(tiny_sample(c.params), tiny_sample(stored))

    mesh = parallel.make_mesh("fsdp=2,tensor=4")
    m = components.load_component(tmp_path / "root", "dit", dtype="fp32", mesh=mesh)
    box = m.params["double_blocks"]["img_mlp"]["fc1"]["kernel"]
    assert box.codes.sharding.spec[-1] == ("fsdp", "tensor") and len(box.codes.sharding.device_set) == 8
    assert m.params["img_in"]["bias"].sharding.device_set == set(mesh.devices.flat)
    latents, _, cond, ref = dit_inputs(batch=2)
    on_mesh = sampling.sample(m.params, m.cfg, latents, cond, sigmas=sampling.schedule(4),
                              ref_latents=ref, mesh=mesh)
    np.testing.assert_allclose(on_mesh, tiny_sample(c.params), rtol=1e-5, atol=1e-5)

    # `generate --quantize` on a mesh: the DiT quantized after loading keeps its codes split
    checkpoint.save(tmp_path / "dense_root" / "dit", "dit", to_json_dict(TINY_I2V), tiny_dit_params())
    dense = components.load_component(tmp_path / "dense_root", "dit", dtype="fp32", mesh=mesh)
    box = quant.quantize_component(dense, "int4").params["single_blocks"]["linear1_mlp"]["kernel"]
    assert box.bits == 4 and box.codes.sharding.spec[-1] == ("fsdp", "tensor")


def _llama_cfg():
    return LlamaConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_hidden=96, param_dtype="fp32", dtype="fp32")


@pytest.mark.slow
def test_quantized_text_encoders_stay_close():
    from m141jax.encoders import Encoders

    lcfg = _llama_cfg()
    ccfg = CLIPTextConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, mlp_hidden=128,
                          max_positions=16, param_dtype="fp32", dtype="fp32")
    params = {"language_model": llama.init_params(lcfg, jax.random.PRNGKey(0)),
              "clip": clip.init_params(ccfg, jax.random.PRNGKey(1))}
    enc = Encoders(llm=lcfg, clip=ccfg, vlm=None, params=params, tokenizer=None, clip_tokenizer=None, crop=0)
    q = quant.quantize_encoders(enc, "int8").params
    assert isinstance(q["language_model"]["layers"]["down_proj"]["kernel"], quant.QArray)
    assert isinstance(q["clip"]["layers"]["mlp"]["fc1"]["kernel"], quant.QArray)
    assert not isinstance(q["language_model"]["embed_tokens"]["embedding"], quant.QArray)
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 96)
    mask = jnp.ones((2, 12), jnp.int32).at[1, 9:].set(0)
    run_llm = jax.jit(lambda p: llama.hidden_states(p, lcfg, ids, mask, skip_layer=0))
    assert 0 < rel_err(run_llm(q["language_model"]), run_llm(params["language_model"]), ord=2) < 0.02
    run_clip = jax.jit(lambda p: clip.text_forward(p, ccfg, ids, mask)[1])
    assert 0 < rel_err(run_clip(q["clip"]), run_clip(params["clip"]), ord=2) < 0.02
    # int4 (15 levels per group of 32) on random weights of a 2-layer model: ~0.1-0.3
    q4 = quant.quantize_encoders(enc, "int4").params
    assert 0 < rel_err(run_clip(q4["clip"]), run_clip(params["clip"]), ord=2) < 0.4


@pytest.mark.slow
def test_quantized_vlm_stays_close():
    vcfg = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=64, num_layers=2, num_heads=4, mlp_hidden=128,
                            param_dtype="fp32", dtype="fp32")
    cfg = LlavaConfig(text=_llama_cfg(), vision=vcfg, image_token_id=95)
    params = llava.init_params(cfg, jax.random.PRNGKey(0))
    chosen = layout.select(params, llava.kernel_layouts(cfg), exclude=quant.QUANT_EXCLUDE)
    assert "projector/linear_1/kernel" in chosen and "vision_tower/layers/q_proj/kernel" in chosen
    assert "vision_tower/embeddings/patch_embedding/kernel" not in chosen
    q = quant.quantize(params, chosen, "int8")
    ids = jnp.concatenate([jnp.full((1, cfg.image_seq_length), 95), jnp.arange(1, 6)[None]], axis=1)
    pixels = jax.random.normal(jax.random.PRNGKey(3), (1, 28, 28, 3))
    run = jax.jit(lambda p: llava.llava_forward(p, cfg, ids, jnp.ones_like(ids), pixels))
    assert 0 < rel_err(run(q), run(params), ord=2) < 0.02


def test_13b_dit_quantized_sizes():
    """The release's 13B DiT by shapes only: bf16 25.6 GB -> int8 half of it, int4 under 7 GB."""
    cfg = preset("magic141-i2v-13b")
    abstract = dit.abstract_params(cfg)
    dense = nbytes(abstract)
    int8 = nbytes(jax.eval_shape(lambda p: quant.quantize_dit(p, cfg, "int8"), abstract))
    int4 = nbytes(jax.eval_shape(lambda p: quant.quantize_dit(p, cfg, "int4"), abstract))
    assert 25.6e9 < dense < 25.7e9
    assert int8 < 0.505 * dense and int4 < 7e9
