"""The causal 3D VAE "884-16c-hy" (release.md D): 4× temporal and 8× spatial compression to 16 channels.

Layout: videos and latents are channels-last [B, F, H, W, C] inside JAX. Module names mirror the
PyTorch state dict (`down_blocks_0/resnets_1/conv1/conv` is `down_blocks.0.resnets.1.conv1.conv`), so
the converter maps keys mechanically. The blocks are not scanned: each of the 4+4 blocks has its own
channel widths and resampler, and within a block the first resnet may change the width, so there is
no stack of identical layers to scan.

Entry points (pure functions of params and inputs; tiles run under one cached `jax.jit` per shape):
- `encode(params, cfg, video, tiling=True) -> (mean, logvar)`: video [B, F, H, W, 3] in [-1, 1],
  F = 1 or 4k+1, H and W multiples of 8; latents unscaled [B, (F-1)/4+1, H/8, W/8, C], fp32.
- `sample_posterior(mean, logvar, rng)`: mean + exp(logvar/2)·N(0, I).
- `decode(params, cfg, latents, tiling=True) -> video` [B, 4(f-1)+1, 8h, 8w, 3], fp32, not clamped.
- `init_params(cfg, rng)` / `abstract_params(cfg)`.
`tiling=True` follows the release's rules exactly (release.md D.5b, `m141jax/models/vae_tiling.py`).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m141jax.config import VAEConfig, dtype_of
from m141jax.models import vae_tiling
from m141jax.models.layers import dense
from m141jax.models.params import views

GN_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
DENSE_ATTENTION_MAX = 1 << 24  # score entries per batch item above which attention runs frame by frame


def _kw(cfg: VAEConfig):
    dtype = dtype_of(cfg.dtype)
    # fp32 means reference quality: no TF32 / bf16 passes on accelerators
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return dict(dtype=dtype, param_dtype=dtype_of(cfg.param_dtype), precision=precision)


def _conv_init(names):
    return (nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
            nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]))


def replicate_pad(x, front: int, side: int):
    """x [B, F, H, W, C] padded by `front` frames in front and `side` pixels on each side of H and W,
    repeating the edge values. Written as reads at clamped indices, which XLA fuses into one pass
    with the producer; `jnp.pad(mode="edge")` builds per-axis concatenations that XLA materialises
    one by one (XLA's estimate for the bf16 544×960 decode tile drops from 12.2 to 11.1 GB)."""
    _, f, h, w, _ = x.shape
    clamp = lambda n, lo, hi: np.clip(np.arange(-lo, n + hi), 0, n - 1)  # noqa: E731
    return x[:, clamp(f, front, 0)][:, :, clamp(h, side, side)][:, :, :, clamp(w, side, side)]


def _conv3d_xla(x, kernel, stride, precision):
    return jax.lax.conv_general_dilated(x, kernel, stride, "VALID", precision=precision,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _conv3d_by_frames(x, kernel, stride, precision):
    """The valid 3D conv as a sum over the kernel's k time taps of 2D convs on the (strided) frames each
    tap reads, frames folded into the batch: the same sums in another order. On the demo VAE's narrow convs
    XLA's CPU 3D conv is 3.5× (stride 1) to 36× (stride 2) slower than this (`benchmarks/vae.py`,
    `vae_conv3d_cpu`); on wide convs over large frames (`small-vae`) it is the faster one, forward."""
    st, sh, sw = stride
    b, f, h, w, c = x.shape
    k = kernel.shape[0]
    frames = (f - k) // st + 1
    out = 0
    for t in range(k):
        xt = x[:, t:t + st * (frames - 1) + 1:st].reshape(b * frames, h, w, c)
        out = out + jax.lax.conv_general_dilated(xt, kernel[t], (sh, sw), "VALID", precision=precision,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out.reshape(b, frames, *out.shape[1:])


def conv3d(x, kernel, stride=(1, 1, 1), precision=None):
    """Valid 3D conv, channels last (kernel [kt, kh, kw, Cin, Cout]); on CPU computed frame by frame
    (`_conv3d_by_frames`), elsewhere by XLA's native conv, chosen when lowering for the platform."""
    stride = tuple(stride)
    return jax.lax.platform_dependent(
        x, kernel, cpu=lambda x, k: _conv3d_by_frames(x, k, stride, precision),
        default=lambda x, k: _conv3d_xla(x, k, stride, precision))


class Conv3d(nn.Module):
    """`nn.Conv` (valid padding; same parameters `kernel`, `bias`) by `conv3d`."""

    features: int
    kernel: int
    stride: tuple[int, int, int] = (1, 1, 1)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x, frames_repeated: bool = False):
        """`frames_repeated`: x is one frame standing for k equal ones (a causal pad of a single frame), so
        every time tap reads it: one 2D conv by the taps' kernels summed, a k-th of the work."""
        kernel_init, bias_init = _conv_init((None, None, None, "conv_in", "conv_out"))
        k = self.kernel
        kernel = self.param("kernel", kernel_init, (k, k, k, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
        if frames_repeated:
            summed = kernel.astype(jnp.float32).sum(0).astype(self.dtype)  # one rounding to a bf16 runtime
            y = jax.lax.conv_general_dilated(x[:, 0].astype(self.dtype), summed,
                                             self.stride[1:], "VALID", precision=self.precision,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))[:, None]
        else:
            y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.precision)
        return y + bias.astype(self.dtype)


class CausalConv3d(nn.Module):
    """Replicate-pad W and H by k//2 each side and T by k-1 in front only, then a valid conv (release.md D.2)."""

    cfg: VAEConfig
    features: int
    kernel: int = 3
    stride: tuple[int, int, int] = (1, 1, 1)

    @nn.compact
    def __call__(self, x):
        k = self.kernel
        conv = Conv3d(self.features, k, self.stride, name="conv", **_kw(self.cfg))
        if k > 1 and x.shape[1] == 1:  # a single frame: its k − 1 padding frames are copies of it
            return conv(replicate_pad(x, 0, k // 2), frames_repeated=True)
        return conv(replicate_pad(x, k - 1, k // 2) if k > 1 else x)


class GroupNorm(nn.Module):
    """GroupNorm over all positions of the whole input (tile) and C/G channels, in fp32; returns fp32."""

    groups: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        init = lambda fn: nn.with_logical_partitioning(fn, ("norm",))  # noqa: E731
        scale = self.param("scale", init(nn.initializers.ones_init()), (c,), self.param_dtype)
        bias = self.param("bias", init(nn.initializers.zeros_init()), (c,), self.param_dtype)
        xg = x.astype(jnp.float32).reshape(x.shape[0], -1, self.groups, c // self.groups)
        mean = xg.mean((1, 3), keepdims=True)
        var = jnp.square(xg - mean).mean((1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(x.shape)
        return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def _norm_act(cfg: VAEConfig, name: str, x):
    """GroupNorm -> SiLU in fp32, cast to the activation dtype for the next conv."""
    y = GroupNorm(cfg.norm_num_groups, dtype_of(cfg.param_dtype), name=name)(x)
    return nn.silu(y).astype(dtype_of(cfg.dtype))


class ResnetBlock(nn.Module):
    """ResnetBlockCausal3D: pre-norm, conv1 -> conv2, 1×1×1 shortcut when the width changes (release.md D.2)."""

    cfg: VAEConfig
    features: int

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = CausalConv3d(c, self.features, name="conv1")(_norm_act(c, "norm1", x))
        h = CausalConv3d(c, self.features, name="conv2")(_norm_act(c, "norm2", h))
        if x.shape[-1] != self.features:
            x = CausalConv3d(c, self.features, kernel=1, name="conv_shortcut")(x)
        return x + h


def frame_causal_attention(q, k, v, frames: int, precision=None, max_dense: int = DENSE_ATTENTION_MAX):
    """Single-head attention over frame-major tokens [B, F·HW, C]: a token of frame f attends to every
    token of frames ≤ f (the release's causal mask). Short sequences use one masked score matrix;
    longer ones loop over query frames with an online softmax over key frames 0..f, so memory is
    O(HW²) instead of O((F·HW)²)."""
    b, n, c = q.shape
    hw = n // frames
    scale = 1.0 / math.sqrt(c)
    mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32, precision=precision)
    if n * n <= max_dense:
        fr = jnp.arange(n) // hw
        s = jnp.where(fr[:, None] >= fr[None, :], mm("bqc,bkc->bqk", q, k) * scale, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        return mm("bqk,bkc->bqc", p.astype(v.dtype), v).astype(q.dtype)
    qf, kf, vf = (t.reshape(b, frames, hw, c) for t in (q, k, v))

    def query_frame(f):
        qb = qf[:, f]

        def key_frame(j, carry):
            m, l, acc = carry
            s = mm("bqc,bkc->bqk", qb, kf[:, j]) * scale
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            return m_new, l * corr + p.sum(-1), acc * corr[..., None] + mm("bqk,bkc->bqc", p.astype(v.dtype), vf[:, j])

        init = (jnp.full((b, hw), -jnp.inf, jnp.float32), jnp.zeros((b, hw), jnp.float32),
                jnp.zeros((b, hw, c), jnp.float32))
        _, l, acc = jax.lax.fori_loop(0, f + 1, key_frame, init)
        return acc / l[..., None]

    out = jax.lax.map(query_frame, jnp.arange(frames))  # [F, B, HW, C]
    return jnp.moveaxis(out, 0, 1).reshape(b, n, c).astype(q.dtype)


class Attention(nn.Module):
    """The mid-block attention: GroupNorm, single-head q/k/v/out with bias, frame-causal mask, residual."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        c, kw = self.cfg, _kw(self.cfg)
        b, f, hh, ww, ch = x.shape
        h = GroupNorm(c.norm_num_groups, kw["param_dtype"], name="group_norm")(x).astype(kw["dtype"])
        h = h.reshape(b, f * hh * ww, ch)
        q, k, v = (dense(ch, ("conv_in", "conv_out"), name=n, **kw)(h) for n in ("to_q", "to_k", "to_v"))
        o = frame_causal_attention(q, k, v, f, kw["precision"])
        o = dense(ch, ("conv_in", "conv_out"), name="to_out_0", **kw)(o)
        return x + o.reshape(x.shape).astype(x.dtype)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the narrowest width (release.md D.2)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        width = c.block_out_channels[-1]
        x = ResnetBlock(c, width, name="resnets_0")(x)
        if c.mid_block_add_attention:
            x = Attention(c, name="attentions_0")(x)
        return ResnetBlock(c, width, name="resnets_1")(x)


def upsample_nearest(x, factor: tuple[int, int, int]):
    """Nearest-neighbour upsampling where frame 0 is upsampled in space only: T -> 1 + ft·(T-1).
    (The release round-trips bf16 through fp32 here; copying values is exact, so that is omitted.)"""
    ft, fh, fw = factor
    x = jnp.repeat(jnp.repeat(x, fh, axis=2), fw, axis=3)
    return jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], ft, axis=1)], axis=1) if ft > 1 else x


class Resample(nn.Module):
    """DownsampleCausal3D (strided causal conv) or UpsampleCausal3D (nearest upsample, causal conv)."""

    cfg: VAEConfig
    factor: tuple[int, int, int]
    up: bool

    @nn.compact
    def __call__(self, x):
        if self.up:
            return CausalConv3d(self.cfg, x.shape[-1], name="conv")(upsample_nearest(x, self.factor))
        return CausalConv3d(self.cfg, x.shape[-1], stride=self.factor, name="conv")(x)


def resample_factors(cfg: VAEConfig) -> list[tuple[int, int, int] | None]:
    """(t, h, w) factor of each down block's downsampler (and of the up block with the same index):
    space is resampled in the first log2(spatial) blocks, time in the log2(time) blocks before the last."""
    n = len(cfg.block_out_channels)
    n_space, n_time = int(math.log2(cfg.spatial_compression_ratio)), int(math.log2(cfg.time_compression_ratio))
    out = []
    for i in range(n):
        s, t = i < n_space, n - 1 - n_time <= i < n - 1
        out.append((2 if t else 1, 2 if s else 1, 2 if s else 1) if s or t else None)
    return out


class Block(nn.Module):
    """DownEncoderBlockCausal3D / UpDecoderBlockCausal3D: resnets, then the optional resampler."""

    cfg: VAEConfig
    features: int
    layers: int
    factor: tuple[int, int, int] | None
    up: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.layers):
            x = ResnetBlock(self.cfg, self.features, name=f"resnets_{j}")(x)
        if self.factor is not None:
            x = Resample(self.cfg, self.factor, self.up, name=f"{'up' if self.up else 'down'}samplers_0")(x)
        return x


class Encoder(nn.Module):
    """conv_in -> down blocks -> mid block -> GN/SiLU -> conv_out to 2·latent channels (release.md D.3)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        x = CausalConv3d(c, c.block_out_channels[0], name="conv_in")(x)
        for i, (width, factor) in enumerate(zip(c.block_out_channels, resample_factors(c))):
            x = Block(c, width, c.layers_per_block, factor, up=False, name=f"down_blocks_{i}")(x)
        x = MidBlock(c, name="mid_block")(x)
        return CausalConv3d(c, 2 * c.latent_channels, name="conv_out")(_norm_act(c, "conv_norm_out", x))


class Decoder(nn.Module):
    """conv_in -> mid block -> up blocks (layers+1 resnets each) -> GN/SiLU -> conv_out (release.md D.4)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, z):
        c = self.cfg
        x = CausalConv3d(c, c.block_out_channels[-1], name="conv_in")(z)
        x = MidBlock(c, name="mid_block")(x)
        for i, (width, factor) in enumerate(zip(reversed(c.block_out_channels), resample_factors(c))):
            x = Block(c, width, c.layers_per_block + 1, factor, up=True, name=f"up_blocks_{i}")(x)
        return CausalConv3d(c, c.out_channels, name="conv_out")(_norm_act(c, "conv_norm_out", x))


class CausalVAE(nn.Module):
    """AutoencoderKLCausal3D: encoder + quant_conv, post_quant_conv + decoder (1×1×1 convs)."""

    cfg: VAEConfig

    def setup(self):
        c = self.cfg
        conv1 = functools.partial(Conv3d, kernel=1, **_kw(c))
        self.encoder = Encoder(c)
        self.quant_conv = conv1(2 * c.latent_channels)
        self.post_quant_conv = conv1(c.latent_channels)
        self.decoder = Decoder(c)

    def moments(self, x):
        """[B, F, H, W, 3] -> posterior moments [B, f, h, w, 2C] (mean ‖ logvar, not clamped)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x, z):
        return self.moments(x), self.decode(z)


# --------------------------------------------------------------------------- public entry points

@functools.partial(jax.jit, static_argnums=1)
def encode_tile(params, cfg: VAEConfig, x):
    """Moments of one tile (or of the whole input when untiled); one compilation per (cfg, shape)."""
    return CausalVAE(cfg).apply({"params": params}, x.astype(dtype_of(cfg.dtype)), method=CausalVAE.moments)


@functools.partial(jax.jit, static_argnums=1)
def decode_tile(params, cfg: VAEConfig, z):
    """Decoded frames of one latent tile (or of all latents when untiled); one compilation per shape."""
    return CausalVAE(cfg).apply({"params": params}, z.astype(dtype_of(cfg.dtype)), method=CausalVAE.decode)


def check_video(cfg: VAEConfig, video) -> None:
    """One-line errors for videos the VAE cannot encode."""
    if video.ndim != 5 or video.shape[-1] != cfg.in_channels:
        raise ValueError(f"video must be [B, F, H, W, {cfg.in_channels}] (channels-last), got {tuple(video.shape)}")
    _, f, h, w, _ = video.shape
    tc, sc = cfg.time_compression_ratio, cfg.spatial_compression_ratio
    if (f - 1) % tc:
        raise ValueError(f"video has {f} frames; accepted: 1 or {tc}k+1 (1, {tc + 1}, {2 * tc + 1}, ..., 81, ...)")
    if h % sc or w % sc:
        raise ValueError(f"video size {h}x{w} (HxW) is not a multiple of {sc} in both dimensions")


def check_latents(cfg: VAEConfig, latents) -> None:
    if latents.ndim != 5 or latents.shape[-1] != cfg.latent_channels or min(latents.shape[1:4]) < 1:
        raise ValueError(f"latents must be [B, f, h, w, {cfg.latent_channels}] (channels-last, f, h, w >= 1), "
                         f"got {tuple(latents.shape)}")


def encode(params, cfg: VAEConfig, video, tiling: bool = True):
    """(mean, logvar) of the posterior, unscaled latents [B, f, h, w, C] in fp32 (logvar clamped to
    [-30, 20]). video: [B, F, H, W, 3] in [-1, 1]. tiling: the release's spatial/temporal tiling."""
    check_video(cfg, video)
    x = jnp.asarray(video).astype(dtype_of(cfg.dtype))
    tile = functools.partial(encode_tile, params, cfg)
    moments = vae_tiling.encode(cfg, tile, x) if tiling else tile(x)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def sample_posterior(mean, logvar, rng):
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar/2)·ε, ε ~ N(0, I) from `rng`."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def scale_latents(cfg: VAEConfig, z):
    """The DiT's latents from unscaled VAE latents [..., C]: z · scaling_factor, or per channel
    (z − latents_mean) / latents_std when the config holds those statistics."""
    if cfg.latents_mean:
        return (z - jnp.asarray(cfg.latents_mean, jnp.float32)) / jnp.asarray(cfg.latents_std, jnp.float32)
    return z * cfg.scaling_factor


def unscale_latents(cfg: VAEConfig, z):
    """The inverse of `scale_latents`: unscaled VAE latents from the DiT's."""
    if cfg.latents_mean:
        return z * jnp.asarray(cfg.latents_std, jnp.float32) + jnp.asarray(cfg.latents_mean, jnp.float32)
    return z / cfg.scaling_factor


def decode(params, cfg: VAEConfig, latents, tiling: bool = True):
    """Video [B, 4(f-1)+1, 8h, 8w, 3] in fp32 (about [-1, 1], not clamped) from unscaled latents
    [B, f, h, w, C]. tiling: the release's spatial/temporal tiling."""
    check_latents(cfg, latents)
    z = jnp.asarray(latents).astype(dtype_of(cfg.dtype))
    tile = functools.partial(decode_tile, params, cfg)
    video = vae_tiling.decode(cfg, tile, z) if tiling else tile(z)
    return video.astype(jnp.float32)


def dummy_inputs(cfg: VAEConfig):
    """The smallest inputs that trace the VAE (initialisation)."""
    s = cfg.spatial_compression_ratio
    return jnp.zeros((1, 1, s, s, cfg.in_channels)), jnp.zeros((1, 1, 1, 1, cfg.latent_channels))


def boxed_params(cfg: VAEConfig, rng):
    """Initialised parameters wrapped in their logical axis names."""
    return CausalVAE(cfg).init(rng, *dummy_inputs(cfg))["params"]


init_params, abstract_params, param_logical_axes, kernel_layouts = views(boxed_params)
