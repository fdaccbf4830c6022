"""The causal 3D VAE against diffusers' AutoencoderKLHunyuanVideo (random weights, converted by our
converter, fp32), untiled and with the release's tiling on tiles that really overlap.

Where diffusers differs from the release (release.md D.5b), the release wins:
- diffusers always tiles in time ("framewise" encoding/decoding, on even with tiling off) with its own
  16-frame tiles at a 12-frame stride; the release tiles in time only when tiling is on, with
  `sample_tsize` (64) frames at 3/4 of that stride. The untiled references below switch framewise
  off; the tiled references pass the release's tile sizes and strides to `enable_tiling`, under
  which diffusers' rules coincide with the release's (tile + 1 inputs, first output dropped, blend
  extents, kept lengths, raster-order blending with already blended neighbours).
- diffusers crops the joined result to the untiled size; the release does not, which never matters
  because the kept lengths always add up to it (checked by the geometry tests).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from numerics import rel_err  # noqa: E402

from m141jax.config import VAE_PRESETS, VAEConfig, from_json_dict, preset, to_json_dict  # noqa: E402
from m141jax.convert import vae as convert_vae  # noqa: E402
from m141jax.models import vae, vae_tiling  # noqa: E402
from m141jax.train import vae as vae_train  # noqa: E402

TINY = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, latent_channels=16, layers_per_block=2)
# small release-style tiles so that tiles overlap on small inputs: 64 px (8 latents) at a 48 px
# stride, blend 2 latents / 16 px; 32 frames (8 latents) at a 24-frame stride, blend 2 latents / 8 frames
TILES = dict(sample_size=64, sample_tsize=32)


def to_torch(x):
    return torch.from_numpy(np.moveaxis(np.asarray(x, np.float32), -1, 1).copy())


def from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers model, our config with small tiles, converted params) from one random tiny VAE."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLHunyuanVideo(**TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random norms and biases too, so that no parameter is an identity
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.copy_((0.0 if name.endswith("bias") else 1.0) + 0.2 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("vae") / "diffusers"
    ref.save_pretrained(folder)
    cfg, params = convert_vae.convert(str(folder), None, np.float32, progress=False)
    assert cfg.block_out_channels == TINY["block_out_channels"] and cfg.param_dtype == "fp32"
    cfg = dataclasses.replace(cfg, dtype="fp32", **TILES)
    return ref, cfg, jax.tree_util.tree_map(jnp.asarray, params)


def untiled(ref):
    ref.use_tiling = False
    ref.use_framewise_encoding = ref.use_framewise_decoding = False  # diffusers' default differs (see top)
    return ref


def release_tiled(ref, cfg):
    stride, tstride = int(cfg.sample_size * 0.75), int(cfg.sample_tsize * 0.75)
    ref.use_framewise_encoding = ref.use_framewise_decoding = True
    ref.enable_tiling(cfg.sample_size, cfg.sample_size, cfg.sample_tsize, stride, stride, tstride)
    return ref


def encode_both(models, video, tiling):
    ref, cfg, params = models
    ref = release_tiled(ref, cfg) if tiling else untiled(ref)
    with torch.no_grad():
        dist = ref.encode(to_torch(video)).latent_dist
    mean, logvar = vae.encode(params, cfg, jnp.asarray(video), tiling=tiling)
    return (mean, logvar), (from_torch(dist.mean), from_torch(dist.logvar))


def decode_both(models, latents, tiling):
    ref, cfg, params = models
    ref = release_tiled(ref, cfg) if tiling else untiled(ref)
    with torch.no_grad():
        want = from_torch(ref.decode(to_torch(latents)).sample)
    return vae.decode(params, cfg, jnp.asarray(latents), tiling=tiling), want


def video(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def latents(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------ untiled parity

@pytest.mark.parity
@pytest.mark.parametrize("shape", [(2, 1, 32, 24, 3), (1, 9, 32, 32, 3)], ids=["image-batch2", "video-9f"])
def test_encode_matches_diffusers(models, shape):
    (mean, logvar), (want_mean, want_logvar) = encode_both(models, video(shape), tiling=False)
    f = (shape[1] - 1) // 4 + 1
    assert mean.shape == (shape[0], f, shape[2] // 8, shape[3] // 8, 16) and mean.dtype == jnp.float32
    assert rel_err(mean, want_mean) < 1e-5
    assert rel_err(logvar, want_logvar) < 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("shape", [(1, 1, 4, 3, 16), (1, 3, 4, 4, 16)], ids=["image", "video-3lat"])
def test_decode_matches_diffusers(models, shape):
    got, want = decode_both(models, latents(shape), tiling=False)
    assert got.shape == (shape[0], 4 * (shape[1] - 1) + 1, 8 * shape[2], 8 * shape[3], 3)
    assert rel_err(got, want) < 5e-5


@pytest.mark.parity
def test_fewer_spatial_downsamples_than_blocks_match_diffusers(tmp_path):
    """spatial_compression_ratio 4 on 4 blocks (space downsampled in the first 2, as diffusers' and the
    demo VAE's configs allow): untiled and tiled (latent tiles of sample_size / 4) against diffusers."""
    torch.manual_seed(2)
    ref = diffusers.AutoencoderKLHunyuanVideo(**TINY, spatial_compression_ratio=4).eval()
    ref.save_pretrained(tmp_path)
    cfg, params = convert_vae.convert(str(tmp_path), None, np.float32, progress=False)
    assert cfg.spatial_compression_ratio == 4
    models = ref, dataclasses.replace(cfg, dtype="fp32", **TILES), jax.tree_util.tree_map(jnp.asarray, params)
    (mean, _), (want, _) = encode_both(models, video((1, 5, 16, 24, 3), seed=4), tiling=False)
    assert mean.shape == (1, 2, 4, 6, 16) and rel_err(mean, want) < 1e-5
    got, want = decode_both(models, latents((1, 2, 20, 4, 16), seed=5), tiling=True)  # 16-latent tiles at 12
    assert got.shape == (1, 5, 80, 16, 3) and rel_err(got, want) < 5e-5
    assert vae_tiling.decode_rules(models[1]).threshold_space == 16


@pytest.mark.slow
def test_bf16_runtime_stays_close_to_fp32(models):
    """The release runs the VAE in bf16: same weights cast to bf16, output within bf16 rounding
    (on this random model diffusers in bf16 is 7% off its fp32 output; this port is ~7% off too)."""
    _, cfg, params = models
    z = latents((1, 1, 4, 3, 16), seed=4)
    want = vae.decode(params, cfg, jnp.asarray(z), tiling=False)
    cfg16 = dataclasses.replace(cfg, dtype="bf16", param_dtype="bf16")
    got = vae.decode(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), cfg16, jnp.asarray(z), tiling=False)
    assert got.dtype == jnp.float32 and 1e-3 < rel_err(got, want) < 0.15


def test_frame_by_frame_attention_equals_dense():
    """Full-size tiles use the frame-by-frame online softmax; it must equal the masked dense form."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 3 * 6, 8)) for i in range(3))
    dense = vae.frame_causal_attention(q, k, v, frames=3)
    looped = vae.frame_causal_attention(q, k, v, frames=3, max_dense=0)
    np.testing.assert_allclose(looped, dense, rtol=1e-5, atol=1e-6)
    # frame 0 sees only itself: its output does not move when later frames change
    moved = vae.frame_causal_attention(q, k.at[:, 6:].mul(-2.0), v.at[:, 6:].add(1.0), frames=3, max_dense=0)
    np.testing.assert_allclose(moved[:, :6], dense[:, :6], rtol=1e-5, atol=1e-6)
    assert not np.allclose(moved[:, 6:], dense[:, 6:])


@pytest.mark.parametrize("shape,stride", [((2, 7, 10, 10, 3), (1, 1, 1)), ((1, 9, 11, 11, 3), (2, 2, 2)),
                                          ((2, 8, 10, 12, 3), (1, 2, 2)), ((3, 1, 6, 6, 3), (1, 1, 1))])
def test_conv3d_by_frames_equals_xla_conv_and_is_chosen_on_cpu(shape, stride):
    """The CPU path (2D convs over the time taps) gives XLA's 3D conv and its gradients, for every stride
    the VAE uses and a 1-frame input with a 1-tap kernel; lowering for CPU keeps only that path."""
    k = 1 if shape[1] == 1 else 3
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (k, 3, 3, 3, 5))

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, stride, None)))

    assert rel_err(vae._conv3d_by_frames(x, w, stride, None), vae._conv3d_xla(x, w, stride, None)) < 1e-6
    for got, want in zip(jax.grad(loss(vae._conv3d_by_frames), (0, 1))(x, w),
                         jax.grad(loss(vae._conv3d_xla), (0, 1))(x, w)):
        assert rel_err(got, want) < 1e-5
    hlo = jax.jit(lambda x, w: vae.conv3d(x, w, stride)).lower(x, w).as_text()
    convs = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
    assert len(convs) == k and all("[b, 0, 1, f]" in line for line in convs)


@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 2, 2)])
def test_causal_conv_of_one_frame_is_one_2d_conv(stride):
    """A single frame's causal pad repeats it k − 1 times, so `CausalConv3d` runs one 2D conv by the time taps'
    kernels summed: the padded 3D conv's output and gradients, with one convolution instead of k."""
    cfg = dataclasses.replace(VAE_PRESETS["tiny-vae"], param_dtype="fp32", dtype="fp32")
    module = vae.CausalConv3d(cfg, 5, stride=stride)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 10, 10, 3))
    params = nn.unbox(module.init(jax.random.PRNGKey(1), x))

    def padded(p, x):  # the release's rule written out: pad T by k − 1 in front, H and W by 1, valid 3D conv
        conv = p["params"]["conv"]
        return vae.conv3d(vae.replicate_pad(x, 2, 1), conv["kernel"], stride) + conv["bias"]

    assert rel_err(module.apply(params, x), padded(params, x)) < 1e-6
    loss = lambda fn: lambda p, x: jnp.sum(jnp.sin(fn(p, x)))  # noqa: E731
    for got, want in zip(jax.tree.leaves(jax.grad(loss(module.apply), (0, 1))(params, x)),
                         jax.tree.leaves(jax.grad(loss(padded), (0, 1))(params, x))):
        assert rel_err(got, want) < 1e-5
    hlo = jax.jit(module.apply).lower(params, x).as_text()
    assert sum("stablehlo.convolution" in line for line in hlo.splitlines()) == 1


# ------------------------------------------------------------------------------ release tiling parity

@pytest.mark.slow
@pytest.mark.parity
def test_tiled_encode_image_matches_release_rules(models):
    """96×96 px with 64 px tiles at 48: a 2×2 grid whose tiles overlap by 16 px, blended at the corner."""
    x = video((1, 1, 96, 96, 3), seed=1)
    (mean, logvar), (want_mean, want_logvar) = encode_both(models, x, tiling=True)
    assert rel_err(mean, want_mean) < 1e-5 and rel_err(logvar, want_logvar) < 1e-5
    with torch.no_grad():
        plain = from_torch(untiled(models[0]).encode(to_torch(x)).latent_dist.mean)
    assert rel_err(mean, plain) > 1e-3  # tiling really happened: GroupNorm sees each tile alone


@pytest.mark.slow
@pytest.mark.parity
def test_tiled_encode_video_matches_release_rules(models):
    """41 frames with 33-frame tiles at 24: the second tile drops its first latent and blends 2 latents."""
    x = video((1, 41, 16, 16, 3), seed=2)
    (mean, logvar), (want_mean, want_logvar) = encode_both(models, x, tiling=True)
    assert mean.shape[1] == 11
    assert rel_err(mean, want_mean) < 1e-5 and rel_err(logvar, want_logvar) < 1e-5


@pytest.mark.slow
@pytest.mark.parity
def test_tiled_decode_matches_release_rules_and_reuses_compilations(models):
    """11 latent frames (tiles z[0:9], z[6:11]) × 12 latent rows (tiles 0:8, 6:12): temporal tiles
    nest spatial ones; the 4 tiles of 4 shapes compile 4 times, and decoding again compiles nothing."""
    z = latents((1, 11, 12, 4, 16), seed=3)
    before = vae.decode_tile._cache_size()
    got, want = decode_both(models, z, tiling=True)
    assert got.shape == (1, 41, 96, 32, 3)
    assert rel_err(got, want) < 5e-5
    assert vae.decode_tile._cache_size() - before == 4
    vae.decode(models[2], models[1], jnp.asarray(z))
    assert vae.decode_tile._cache_size() - before == 4


# --------------------------------------------------------------- tiling rules on the real configuration

def _zeros(shape):
    return np.broadcast_to(np.zeros((), np.float32), shape)  # no memory: the fakes read shapes only


def _fake_encoder(calls):
    """Stands in for the encoder: latent shape of a tile, filled with the tile's call number."""
    def fn(x):
        calls.append(x.shape[1:4])
        b, f, h, w, _ = x.shape
        return jnp.full((b, (f - 1) // 4 + 1, h // 8, w // 8, 2), float(len(calls) - 1))
    return fn


@pytest.mark.slow
def test_release_tile_geometry_544x960x81():
    """Spec D.5: 3 rows × 5 columns of 256 px tiles at 192 px (the last row 160 px, the last column
    192 px), kept 24+24+20 rows and 5×24 columns; in time 65-frame tiles at 48, giving 21 latents."""
    cfg = preset("hunyuan-vae", VAE_PRESETS)
    calls = []
    out = vae_tiling.encode(cfg, _fake_encoder(calls), _zeros((1, 81, 544, 960, 3)))
    assert out.shape == (1, 21, 68, 120, 2)
    assert calls[:15] == [(65, h, w) for h in (256, 256, 160) for w in (256, 256, 256, 256, 192)]
    assert calls[15:] == [(33, h, w) for h in (256, 256, 160) for w in (256, 256, 256, 256, 192)]
    calls = []
    assert vae_tiling.encode(cfg, _fake_encoder(calls), _zeros((1, 1, 256, 264, 3))).shape == (1, 1, 32, 33, 2)
    # 264 > 256 tiles both axes: tiles start at 0 and 192 in each, the second row 64 px, column 72 px
    assert calls == [(1, 256, 256), (1, 256, 72), (1, 64, 256), (1, 64, 72)]


def test_release_temporal_decode_blend_and_kept_frames():
    """T_lat = 21: tile 0 decodes z[0:17] -> 65 frames and keeps 49; tile 1 decodes z[12:21] -> 33
    frames, drops its first, blends its first 16 with tile 0's last 16 by weight k/16, keeps 32."""
    cfg = preset("hunyuan-vae", VAE_PRESETS)
    calls = []

    def fake_decoder(z):  # frame k of a tile starting at latent i is global frame 4i + k; + 1000 per tile
        calls.append(z.shape[1])
        i, n = int(z[0, 0, 0, 0, 0]), z.shape[1]
        frames = 4 * i + jnp.arange(4 * (n - 1) + 1, dtype=jnp.float32) + 1000.0 * (len(calls) - 1)
        return jnp.broadcast_to(frames[None, :, None, None, None], (1, len(frames), 8, 8, 1))

    z = jnp.broadcast_to(jnp.arange(21.0)[None, :, None, None, None], (1, 21, 1, 1, 16))
    out = np.asarray(vae_tiling.decode(cfg, fake_decoder, z))[0, :, 0, 0, 0]
    assert calls == [17, 9] and out.shape == (81,)
    k = np.arange(16)
    np.testing.assert_allclose(out[:49], np.arange(49))
    np.testing.assert_allclose(out[49:65], 49 + k + 1000 * k / 16, rtol=1e-6)
    np.testing.assert_allclose(out[65:], np.arange(65, 81) + 1000)


def test_blend_follows_release_formula():
    a = jnp.arange(10.0).reshape(1, 10, 1, 1, 1)
    b = jnp.full((1, 3, 1, 1, 1), 100.0)  # shorter than the extent: e = min(10, 3, 4) = 3
    got = np.asarray(vae_tiling.blend(a, b, 1, 4))[0, :, 0, 0, 0]
    np.testing.assert_allclose(got, [7 * 1 + 100 * 0, 8 * (2 / 3) + 100 / 3, 9 * (1 / 3) + 200 / 3], rtol=1e-6)


# ------------------------------------------------------------------------------------- posterior, errors

def test_sample_posterior_uses_the_key():
    mean, logvar = jnp.zeros((1, 1, 64, 64, 16)), jnp.full((1, 1, 64, 64, 16), np.log(4.0))
    a = vae.sample_posterior(mean, logvar, jax.random.PRNGKey(0))
    b = vae.sample_posterior(mean, logvar, jax.random.PRNGKey(0))
    c = vae.sample_posterior(mean, logvar, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and abs(float(a.std()) - 2.0) < 0.1


def test_logvar_is_clamped(models):
    _, cfg, params = models
    big = jax.tree_util.tree_map(lambda x: x, params)
    big["quant_conv"] = dict(big["quant_conv"], bias=params["quant_conv"]["bias"].at[16:].set(1e3))
    _, logvar = vae.encode(big, cfg, jnp.asarray(video((2, 1, 32, 24, 3))), tiling=False)
    assert float(logvar.max()) == 20.0


@pytest.mark.parametrize("shape, match", [
    ((1, 8, 32, 32, 3), "8 frames; accepted: 1 or 4k\\+1"),
    ((1, 5, 36, 32, 3), "36x32 .* not a multiple of 8"),
    ((1, 5, 32, 32, 4), "must be \\[B, F, H, W, 3\\]"),
])
def test_bad_videos_get_clear_errors(shape, match):
    cfg = preset("tiny-vae", VAE_PRESETS)
    with pytest.raises(ValueError, match=match):
        vae.encode({}, cfg, jnp.zeros(shape))


def test_bad_latents_and_configs_get_clear_errors():
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode({}, preset("tiny-vae", VAE_PRESETS), jnp.zeros((1, 2, 4, 4, 4)))
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        preset("tiny-vae", VAE_PRESETS, norm_num_groups=32)
    with pytest.raises(ValueError, match="time_compression_ratio 8"):
        preset("tiny-vae", VAE_PRESETS, time_compression_ratio=8)
    with pytest.raises(ValueError, match="spatial_compression_ratio 16 must be 2"):
        preset("tiny-vae", VAE_PRESETS, spatial_compression_ratio=16)
    with pytest.raises(ValueError, match="sample_size 48"):
        preset("tiny-vae", VAE_PRESETS, sample_size=48)


def test_latent_scaling_single_factor_or_per_channel(models):
    _, cfg, params = models
    mean, _ = vae.encode(params, cfg, jnp.asarray(video((3, 5, 32, 32, 3))), tiling=False)
    np.testing.assert_allclose(vae.scale_latents(cfg, mean), mean * cfg.scaling_factor, rtol=1e-6)  # the release
    stats = vae_train.latent_statistics(params, cfg, [video((3, 5, 32, 32, 3))])
    per_channel = dataclasses.replace(cfg, latents_mean=stats[0], latents_std=stats[1])
    z = np.asarray(vae.scale_latents(per_channel, mean)).reshape(-1, cfg.latent_channels)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-4)
    for c in (cfg, per_channel):
        np.testing.assert_allclose(vae.unscale_latents(c, vae.scale_latents(c, mean)), mean, rtol=1e-5, atol=1e-5)
    assert from_json_dict(VAEConfig, json.loads(json.dumps(to_json_dict(per_channel)))) == per_channel
    with pytest.raises(ValueError, match="one per latent channel"):
        dataclasses.replace(cfg, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 15)
    with pytest.raises(ValueError, match="every std > 0"):
        dataclasses.replace(cfg, latents_mean=(0.0,) * 16, latents_std=(0.0,) * 16)


def test_real_config_shapes_without_running():
    """The released VAE: 246M parameters; a 544×960 decode tile traced with abstract values only."""
    cfg = preset("hunyuan-vae", VAE_PRESETS)
    params = vae.abstract_params(cfg)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 246_478_803
    assert params["encoder"]["conv_in"]["conv"]["kernel"].shape == (3, 3, 3, 3, 128)
    assert params["decoder"]["up_blocks_3"]["resnets_0"]["conv_shortcut"]["conv"]["kernel"].shape == (1, 1, 1, 256, 128)
    out = jax.eval_shape(lambda p, z: vae.decode_tile(p, cfg, z), params,
                         jax.ShapeDtypeStruct((1, 17, 32, 32, 16), jnp.bfloat16))
    assert out.shape == (1, 65, 256, 256, 3)


# ------------------------------------------------------------------------------------- training loss

def _edge_video(offset: float = 0.0, blur: bool = False):
    """[1, 1, 8, 8, 3]: −1 left of column 4, +1 from it on (+ offset); `blur` spreads the step over 3 columns."""
    x = np.where(np.arange(8) >= 4, 1.0, -1.0)
    if blur:
        x = np.convolve(np.pad(x, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    return jnp.asarray(np.broadcast_to((x + offset)[None, None, None, :, None], (1, 1, 8, 8, 3)), jnp.float32)


def test_gradient_error_sees_a_blur_and_not_a_shift_of_colour():
    sharp = _edge_video()
    assert float(vae_train.gradient_error(sharp, sharp, 1.0)) == 0.0
    assert float(vae_train.gradient_error(_edge_video(offset=0.3), sharp, 1.0)) == 0.0  # same edges, other colour
    # the blur's step of 2 as two steps of 2/3: |2/3 − 0| + |2/3 − 0| + |2/3 − 2| = 8/3 per row, over the 7 × 8
    # width differences and (nothing) over the height ones, mean of the two axes
    np.testing.assert_allclose(float(vae_train.gradient_error(_edge_video(blur=True), sharp, 1.0)),
                               (8 / 3 * 8 * 3 / (8 * 7 * 3)) / 2, rtol=1e-6)
    # a difference weighs the larger weight of its two pixels
    w = jnp.ones((1, 1, 8, 8, 1)).at[:, :, :, 4].set(5.0)
    np.testing.assert_allclose(float(vae_train.gradient_error(_edge_video(blur=True), sharp, w)),
                               ((2 / 3 * 5 + 4 / 3 * 5 + 2 / 3) * 8 * 3 / (8 * 7 * 3)) / 2, rtol=1e-6)


def test_foreground_weights_cover_a_margin_around_the_object():
    x = np.full((2, 3, 12, 12, 3), -0.6, np.float32)
    x[0, :, 5:7, 4:6] = 0.8  # a 2×2 object in every frame of clip 0; clip 1 is plain
    x[0, 1] = -0.6  # frame 1 of clip 0 without it
    plain = np.asarray(vae_train.foreground_weights(jnp.asarray(x), 10.0))[..., 0]
    wide = np.asarray(vae_train.foreground_weights(jnp.asarray(x), 10.0, margin=2))[..., 0]
    np.testing.assert_array_equal(plain[0, 0] == 11.0, x[0, 0, :, :, 0] > 0)
    box = np.zeros((12, 12), bool)
    box[3:9, 2:8] = True  # the object's rows 5–6 and columns 4–5, 2 px on each side
    for f in (0, 2):
        np.testing.assert_array_equal(wide[0, f], np.where(box, 11.0, 1.0))
    assert np.all(wide[0, 1] == 1.0) and np.all(wide[1] == 1.0)  # per frame, per clip
    key = jax.random.PRNGKey(1)
    cfg = preset("tiny-vae", VAE_PRESETS, sample_size=32, sample_tsize=32)
    params = vae.init_params(cfg, jax.random.PRNGKey(0))
    clip = jnp.asarray(x[:1, :1, :8, :8])
    (near, _), (far, _) = (vae_train.vae_loss(params, cfg, clip, key, 1e-4, 10.0, foreground_margin=m) for m in (1, 0))
    assert float(near) > float(far)  # the margin's pixels weigh more


def test_vae_loss_adds_the_weighted_gradient_term_and_noises_the_decoders_latents():
    cfg = preset("tiny-vae", VAE_PRESETS, sample_size=32, sample_tsize=32)
    params = vae.init_params(cfg, jax.random.PRNGKey(0))
    x, key = jnp.asarray(video((1, 5, 16, 16, 3))), jax.random.PRNGKey(1)
    plain, m0 = vae_train.vae_loss(params, cfg, x, key, 1e-4, 10.0)
    with_edges, m1 = vae_train.vae_loss(params, cfg, x, key, 1e-4, 10.0, edge_weight=0.5)
    assert "gradient" not in m0 and float(m1["gradient"]) > 0
    np.testing.assert_allclose(float(with_edges), float(plain) + 0.5 * float(m1["gradient"]), rtol=1e-5)
    noised, m2 = vae_train.vae_loss(params, cfg, x, key, 1e-4, 10.0, latent_noise=0.5)
    assert float(m2["kl"]) == float(m0["kl"]) and float(m2["l1"]) != float(m0["l1"])  # same posterior, other decode


def test_noised_latents_scale_with_the_batch_spread_and_pass_the_gradient():
    z = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2, 4, 4, 2)) * np.asarray([0.5, 3.0]), jnp.float32)
    key = jax.random.PRNGKey(2)
    np.testing.assert_array_equal(np.asarray(vae_train.noised_latents(z, key, 0.0)), np.asarray(z))
    noise = np.asarray(vae_train.noised_latents(z, key, 0.6) - z).reshape(-1, 2)
    # ε·u·α·s with u ~ U(0, 1) per video: std α·s·√E[u²] = α·s/√3 per channel
    np.testing.assert_allclose(noise.std(0), 0.6 * np.asarray(z).reshape(-1, 2).std(0) / np.sqrt(3), rtol=0.1)
    # the levels differ between videos, including some near 0
    per_video = np.abs(noise.reshape(64, -1)).mean(1)
    assert per_video.min() < 0.2 * per_video.max()
    # latents scaled up meet noise scaled up as much: no escape by scale
    np.testing.assert_allclose(np.asarray(vae_train.noised_latents(10 * z, key, 0.6) - 10 * z), 10 * noise.reshape(z.shape),
                               rtol=1e-4, atol=1e-4)
    # the spread carries no gradient: d(noised)/dz is the identity
    grad = jax.grad(lambda v: vae_train.noised_latents(v, key, 0.6).sum())(z)
    np.testing.assert_allclose(np.asarray(grad), 1.0, rtol=1e-6)
