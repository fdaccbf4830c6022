"""The Magic141 / HunyuanVideo MMDiT (release.md B): token refiner, 20 double- and 40 single-stream blocks.

Layout: latents are channels-last [B, F, H, W, C] inside JAX. Patch vectors and output vectors are
laid out (pt, ph, pw, c); the converter permutes the PyTorch weights once so no transpose runs here.
The double and single blocks are stacked on a leading `layers` axis and run by `nn.scan`, so compile
time does not grow with depth. Entry points:

- `dit_forward(params, cfg, latents, timestep, cond, ref_latents=None, guidance=None)`: the pure velocity
  prediction (ε − x₀) for a `Conditioning` (models/conditioning.py), with the 33-channel I2V input assembly.
- `init_params(cfg, rng)` / `abstract_params(cfg)`: real or shape-only parameters.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from m141jax.axes import ACTIVATIONS
from m141jax.config import DiTConfig, dtype_of
from m141jax.models.attention import attention
from m141jax.models.conditioning import Conditioning
from m141jax.models.layers import (
    MLP,
    LayerNorm,
    Modulation,
    RMSNorm,
    TextProjection,
    TimestepEmbedder,
    dense,
    gelu_tanh,
    modulate,
)
from m141jax.models.params import views
from m141jax.models.rope import apply_rope, rope_tables
from m141jax.models.sequence_parallel import attend

ATTENTION_OUT = "attention_out"  # the name (jax.ad_checkpoint.checkpoint_name) of each block's attention output
# remat policies by name (model.remat; 'none' saves every activation): full/nothing recompute each block in
# the backward pass, dots saves matmul outputs, attention saves the attention outputs (the costliest part
# to recompute at long sequence), offload saves them in pinned host memory (backends with host memory kinds)
_REMAT = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          "nothing": jax.checkpoint_policies.nothing_saveable,
          "attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
          "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
              names_which_can_be_saved=(), names_which_can_be_offloaded=(ATTENTION_OUT,),
              offload_src="device", offload_dst="pinned_host")}


def _kw(cfg: DiTConfig):
    return dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


class _Attention(nn.Module):
    """The qkv projection ([in, 3, H, D], K outermost as in the release) with optional QK RMSNorm."""

    cfg: DiTConfig
    qk_norm: bool

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        qkv = dense((3, c.num_heads, c.head_dim), ("embed", None, "heads", "kv"), use_bias=c.qkv_bias,
                    name="qkv", **_kw(c))(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            q = RMSNorm(param_dtype=dtype_of(c.param_dtype), name="q_norm")(q)
            k = RMSNorm(param_dtype=dtype_of(c.param_dtype), name="k_norm")(k)
        return q, k, v


def _attend(cfg: DiTConfig, q, k, v, valid_len):
    """The image+text self-attention: over the mesh's `sequence` axis by the configured method."""
    return checkpoint_name(attend(q, k, v, valid_len=valid_len, method=cfg.sequence_parallel, impl=cfg.attention,
                                  block=cfg.attention_block), ATTENTION_OUT)


def _out_proj(cfg: DiTConfig, name: str, use_bias: bool = True):
    return dense(cfg.hidden_size, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=use_bias, name=name, **_kw(cfg))


class DoubleStreamBlock(nn.Module):
    """MMDoubleStreamBlock (B.2.1): separate image/text weights, joint attention over [img, txt]."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, carry, vec, cos, sin, valid_len):
        c, kw = self.cfg, _kw(self.cfg)
        img, txt = carry
        mods, qkvs = {}, {}
        for s, x in (("img", img), ("txt", txt)):
            mods[s] = Modulation(6, c.hidden_size, name=f"{s}_mod", **kw)(vec)
            shift, scale = mods[s][0], mods[s][1]
            h = modulate(LayerNorm()(x), shift, scale).astype(kw["dtype"])
            qkvs[s] = _Attention(c, c.qk_norm, name=f"{s}_attn")(h)
        qi, ki, vi = qkvs["img"]
        qi, ki = apply_rope(qi, cos, sin), apply_rope(ki, cos, sin)
        qt, kt, vt = qkvs["txt"]
        n_img = img.shape[1]
        o = _attend(c, jnp.concatenate([qi, qt], 1), jnp.concatenate([ki, kt], 1), jnp.concatenate([vi, vt], 1),
                    valid_len=valid_len)
        out = []
        for s, x, o_s in (("img", img, o[:, :n_img]), ("txt", txt, o[:, n_img:])):
            _, _, g1, s2, c2, g2 = mods[s]
            x = x + (g1[:, None] * _out_proj(c, f"{s}_attn_proj")(o_s)).astype(x.dtype)
            h = modulate(LayerNorm()(x), s2, c2).astype(kw["dtype"])
            x = x + (g2[:, None] * MLP(c.mlp_hidden, c.hidden_size, name=f"{s}_mlp", **kw)(h)).astype(x.dtype)
            out.append(nn.with_logical_constraint(x, ACTIVATIONS))
        return tuple(out), None


class SingleStreamBlock(nn.Module):
    """MMSingleStreamBlock (B.2.2) on x = [img, txt]: parallel attention and MLP from one modulated input.

    The release's fused linear1 is held as `linear1_qkv` + `linear1_mlp` and its linear2 as
    `linear2_attn` + `linear2_mlp` (which carries the bias); the sum is the same matmul, split so
    heads and MLP channels shard independently.
    """

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, vec, cos, sin, valid_len):
        c, kw = self.cfg, _kw(self.cfg)
        shift, scale, gate = Modulation(3, c.hidden_size, name="modulation", **kw)(vec)
        h = modulate(LayerNorm()(x), shift, scale).astype(kw["dtype"])
        q, k, v = _Attention(c, c.qk_norm, name="linear1")(h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mlp = gelu_tanh(dense(c.mlp_hidden, ("embed", "mlp"), name="linear1_mlp", **kw)(h))
        o = _attend(c, q, k, v, valid_len=valid_len)
        y = _out_proj(c, "linear2_attn", use_bias=False)(o) + dense(c.hidden_size, ("mlp", "embed"),
                                                                     name="linear2_mlp", **kw)(mlp)
        x = x + (gate[:, None] * y).astype(x.dtype)
        return nn.with_logical_constraint(x, ACTIVATIONS), None


class RefinerBlock(nn.Module):
    """IndividualTokenRefinerBlock (B.4): affine LNs, gates only, SiLU MLP, no QK norm, no RoPE."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, c_vec, mask):
        c, kw = self.cfg, _kw(self.cfg)
        g_msa, g_mlp = Modulation(2, c.hidden_size, name="adaLN_modulation", **kw)(c_vec)
        pd = dict(param_dtype=kw["param_dtype"])
        h = LayerNorm(affine=True, name="norm1", **pd)(x).astype(kw["dtype"])
        q, k, v = _Attention(c, False, name="self_attn")(h)
        o = attention(q, k, v, mask=mask, impl="xla")
        x = x + (g_msa[:, None] * _out_proj(c, "self_attn_proj")(o)).astype(x.dtype)
        h = LayerNorm(affine=True, name="norm2", **pd)(x).astype(kw["dtype"])
        x = x + (g_mlp[:, None] * MLP(c.mlp_hidden, c.hidden_size, act=nn.silu, name="mlp", **kw)(h)).astype(x.dtype)
        return x, None


def _stack(block, cfg: DiTConfig, depth: int, n_broadcast: int, name: str):
    """`depth` copies of `block` on a leading 'layers' axis, run by nn.scan (rematerialised per config)."""
    if cfg.remat != "none":
        if cfg.remat not in _REMAT:
            raise ValueError(f"unknown remat policy {cfg.remat!r}; accepted: none, {', '.join(_REMAT)}")
        block = nn.remat(block, policy=_REMAT[cfg.remat], prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * n_broadcast, length=depth,
                   metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name=name)


class TokenRefiner(nn.Module):
    """`txt_in` (SingleTokenRefiner, B.4): masked-mean context + timestep conditioning, 2 refiner blocks."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, t, mask):
        c, kw = self.cfg, _kw(self.cfg)
        m = mask.astype(jnp.float32)[..., None]
        ctx = (x.astype(jnp.float32) * m).sum(1) / m.sum(1)
        c_vec = (TimestepEmbedder(c.hidden_size, name="t_embedder", **kw)(t)
                 + TextProjection(c.hidden_size, ("linear_1", "linear_2"), name="c_embedder", **kw)(ctx))
        x = dense(c.hidden_size, ("text_embed", "embed"), name="input_embedder", **kw)(x.astype(kw["dtype"]))
        valid = mask.astype(bool)
        attn_mask = (valid[:, None, :, None] & valid[:, None, None, :]).at[:, :, :, 0].set(True)
        x, _ = _stack(RefinerBlock, c, c.refiner_blocks, 2, "blocks")(x, c_vec, attn_mask)
        return x


class FinalLayer(nn.Module):
    """LN (no affine) -> modulate with (shift, scale) in that order -> Linear to a patch of outputs."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, img, vec):
        c, kw = self.cfg, _kw(self.cfg)
        shift, scale = Modulation(2, c.hidden_size, name="adaLN_modulation", **kw)(vec)
        h = modulate(LayerNorm()(img), shift, scale).astype(kw["dtype"])
        return dense(c.out_channels * math.prod(c.patch_size), ("embed", None), name="linear", **kw)(h)


class MMDiT(nn.Module):
    """The DiT on an assembled input x [B, F, H, W, in_channels]; returns [B, F, H, W, out_channels]."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, t, text_states, text_mask, text_states_2, guidance=None, return_features=False):
        c, kw = self.cfg, _kw(self.cfg)
        b, f, hh, ww, _ = x.shape
        pt, ph, pw = c.patch_size
        grid = (f // pt, hh // ph, ww // pw)
        patches = x.reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, -1).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        patches = patches.reshape(b, grid[0] * grid[1] * grid[2], -1).astype(kw["dtype"])
        img = nn.with_logical_constraint(dense(c.hidden_size, (None, "embed"), name="img_in", **kw)(patches), ACTIVATIONS)

        vec = (TimestepEmbedder(c.hidden_size, name="time_in", **kw)(t)
               + TextProjection(c.hidden_size, name="vector_in", **kw)(text_states_2.astype(kw["dtype"])))
        if c.guidance_embed:
            if guidance is None:
                raise ValueError("this DiT has a guidance embedding: pass guidance (embedded CFG scale × 1000)")
            vec = vec + TimestepEmbedder(c.hidden_size, name="guidance_in", **kw)(guidance)
        txt = TokenRefiner(c, name="txt_in")(text_states, t, text_mask)

        n_img = img.shape[1]
        valid_len = n_img + text_mask.astype(jnp.int32).sum(1)
        cos, sin = rope_tables(grid, c.rope_axes, c.rope_theta)
        (img, txt), _ = _stack(DoubleStreamBlock, c, c.double_blocks, 4, "double_blocks")(
            (img, txt), vec, cos, sin, valid_len)
        features = img

        # text tokens carry no position: identity rotation (cos 1, sin 0) is exact
        n_txt = txt.shape[1]
        cos = jnp.concatenate([cos, jnp.ones((n_txt, cos.shape[1]), cos.dtype)])
        sin = jnp.concatenate([sin, jnp.zeros((n_txt, sin.shape[1]), sin.dtype)])
        xs, _ = _stack(SingleStreamBlock, c, c.single_blocks, 4, "single_blocks")(
            jnp.concatenate([img, txt], 1), vec, cos, sin, valid_len)

        out = FinalLayer(c, name="final_layer")(xs[:, :n_img], vec)
        out = out.reshape(b, *grid, pt, ph, pw, c.out_channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        out = out.reshape(b, f, hh, ww, c.out_channels)
        return (out, features) if return_features else out


def assemble_input(cfg: DiTConfig, latents, ref_latents):
    """The DiT input (B.1 step 1): I2V is noise ‖ reference zero-padded in time ‖ frame mask; T2V is noise."""
    if not cfg.image_conditioned:
        if ref_latents is not None:
            raise ValueError(f"this DiT (in_channels={cfg.in_channels}) takes no reference latents")
        return latents
    if ref_latents is None:
        raise ValueError(f"this DiT (in_channels={cfg.in_channels}) needs reference latents")
    b, f, h, w, _ = latents.shape
    fr = ref_latents.shape[1]
    if ref_latents.shape != (b, fr, h, w, latents.shape[-1]) or fr > f:
        raise ValueError(f"reference latents {ref_latents.shape} do not match latents {latents.shape}")
    ref = jnp.pad(ref_latents.astype(latents.dtype), [(0, 0), (0, f - fr), (0, 0), (0, 0), (0, 0)])
    mask = jnp.broadcast_to((jnp.arange(f) < fr).astype(latents.dtype)[None, :, None, None, None], (b, f, h, w, 1))
    return jnp.concatenate([latents, ref, mask], axis=-1)


def check_shapes(cfg: DiTConfig, latents, cond: Conditioning):
    """One-line errors for inputs the DiT cannot take."""
    if not isinstance(cond, Conditioning):
        raise TypeError(f"cond must be a Conditioning(text_states, text_mask, text_states_2), got "
                        f"{type(cond).__name__}")
    text_states, text_mask, text_states_2 = cond.text_states, cond.text_mask, cond.text_states_2
    if latents.ndim != 5 or latents.shape[-1] != cfg.out_channels:
        raise ValueError(f"latents must be [B, F, H, W, {cfg.out_channels}], got {tuple(latents.shape)}")
    _, f, h, w, _ = latents.shape
    pt, ph, pw = cfg.patch_size
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent frames/height/width {(f, h, w)} must be multiples of the patch size "
                         f"{cfg.patch_size}")
    if text_states.shape[-1] != cfg.text_dim or text_states_2.shape[-1] != cfg.pooled_dim:
        raise ValueError(f"text states must end in {cfg.text_dim} and pooled states in {cfg.pooled_dim}, got "
                         f"{tuple(text_states.shape)} and {tuple(text_states_2.shape)}")
    if text_mask.shape != text_states.shape[:2]:
        raise ValueError(f"text mask {tuple(text_mask.shape)} does not match text states {tuple(text_states.shape)}")


def dit_forward(params, cfg: DiTConfig, latents, timestep, cond: Conditioning, ref_latents=None, guidance=None,
                return_features=False):
    """Velocity v ≈ ε − x₀ [B, F, H, W, C] in fp32 for latents [B, F, H, W, C] (channels-last).

    timestep: [B] raw values (0..1000). cond: the text conditioning, text_states [B, L, text_dim],
    text_mask [B, L] (valid tokens a prefix), text_states_2 [B, pooled_dim]. ref_latents: [B, 1, H, W, C]
    for the I2V model, None for the plain form. guidance: [B] (embedded CFG scale × 1000) for models with a
    guidance embedding.
    return_features: also return the image tokens after the double-stream blocks [B, N_img, hidden] in
    fp32 (the features a discriminator head reads; unused layers are pruned by XLA when only these are used).
    """
    check_shapes(cfg, latents, cond)
    x = assemble_input(cfg, latents, ref_latents)
    out = MMDiT(cfg).apply({"params": params}, x, timestep, cond.text_states, cond.text_mask, cond.text_states_2,
                           guidance, return_features)
    if return_features:
        return out[0].astype(jnp.float32), out[1].astype(jnp.float32)
    return out.astype(jnp.float32)


def dummy_inputs(cfg: DiTConfig):
    """The smallest inputs that trace the DiT (initialisation, compile checks)."""
    pt, ph, pw = cfg.patch_size
    return (jnp.zeros((1, pt, ph, pw, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 2, cfg.text_dim)),
            jnp.ones((1, 2), jnp.int32), jnp.zeros((1, cfg.pooled_dim)),
            jnp.zeros((1,)) if cfg.guidance_embed else None)


def boxed_params(cfg: DiTConfig, rng):
    """Initialised parameters wrapped in their logical axis names."""
    return MMDiT(cfg).init(rng, *dummy_inputs(cfg))["params"]


init_params, abstract_params, param_logical_axes, kernel_layouts = views(boxed_params)
