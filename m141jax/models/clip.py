"""CLIP transformers (release.md E.2, E.3): the CLIP-L text model and the CLIP ViT-L/14-336 vision tower.

Both are pre-LayerNorm transformers built from the same encoder layer (separate q/k/v/out projections
with biases, quick-GELU MLP), stacked on a 'layers' axis and scanned (`models/stack.py`).

- Text (`text_forward`): token + position embeddings, causal + padding mask, final LayerNorm; the pooled
  output is the state at the EOS position (argmax of the ids with the legacy eos id 2, as transformers).
  Tree: {"embeddings": {"token_embedding", "position_embedding"}, "layers", "final_layer_norm"}.
- Vision (`vision_hidden`): 14×14 patches (a linear map of channels-last pixels, the convolution's
  weights permuted by the converter), a CLS token, position embeddings, pre-LayerNorm, then any
  number of layers: LLaVA reads transformers' `hidden_states[-2]`, the output of layer 23 of 24.
  Tree: {"embeddings": {"patch_embedding", "class_embedding", "position_embedding"}, "pre_layrnorm", "layers"}.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from m141jax import axes
from m141jax.config import CLIPTextConfig, CLIPVisionConfig, dtype_of
from m141jax.models import params as P
from m141jax.models.attention import attention, causal_padding_mask
from m141jax.models.layers import MLP, LayerNorm, dense
from m141jax.models.stack import init_stack, run_stack

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def _kw(cfg):
    return dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


def _layer_norm(cfg, name: str | None = None) -> LayerNorm:
    return LayerNorm(affine=True, eps=cfg.layer_norm_eps, param_dtype=dtype_of(cfg.param_dtype), name=name)


def _embed(n: int, d: int, names, cfg, name: str) -> nn.Embed:
    return nn.Embed(n, d, param_dtype=dtype_of(cfg.param_dtype), name=name,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names))


class CLIPLayer(nn.Module):
    """x + attn(LN1(x)), then x + MLP(LN2(x)). mask [B, 1, L, L] or None (full attention with `impl`)."""

    cfg: CLIPTextConfig | CLIPVisionConfig
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask):
        c, kw = self.cfg, _kw(self.cfg)
        head_dim = c.hidden_size // c.num_heads
        h = _layer_norm(c, "layer_norm1")(x).astype(kw["dtype"])
        q, k, v = (dense((c.num_heads, head_dim), ("embed", "heads", "kv"), name=f"{n}_proj", **kw)(h) for n in "qkv")
        o = attention(q, k, v, mask=mask) if mask is not None else attention(q, k, v, impl=self.impl)
        x = x + dense(c.hidden_size, ("heads", "kv", "embed"), axis=(-2, -1), name="out_proj", **kw)(o).astype(x.dtype)
        h = _layer_norm(c, "layer_norm2")(x).astype(kw["dtype"])
        x = x + MLP(c.mlp_hidden, c.hidden_size, act=ACTIVATIONS[c.act], name="mlp", **kw)(h).astype(x.dtype)
        return nn.with_logical_constraint(x, axes.ACTIVATIONS), None


# ----------------------------------------------------------------------------------------- text

class TextEmbeddings(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        c = self.cfg
        tok = _embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), c, "token_embedding")(input_ids)
        pos = _embed(c.max_positions, c.hidden_size, (None, "embed"), c, "position_embedding")(
            jnp.arange(input_ids.shape[1]))
        return (tok + pos[None]).astype(dtype_of(c.dtype))


def eos_positions(cfg: CLIPTextConfig, input_ids):
    """[B] index of the pooled token: argmax of the ids for the legacy eos id 2, else the first eos."""
    if cfg.eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)


def text_forward(params, cfg: CLIPTextConfig, input_ids, attention_mask=None):
    """(last_hidden_state [B, L, D], pooled [B, D]) in fp32, as transformers' CLIPTextModel returns them."""
    b, n = input_ids.shape
    if n > cfg.max_positions:
        raise ValueError(f"CLIP text input of {n} tokens is longer than its {cfg.max_positions} positions")
    if attention_mask is None:
        attention_mask = jnp.ones((b, n), jnp.int32)
    x = TextEmbeddings(cfg).apply({"params": params["embeddings"]}, input_ids)
    x = run_stack(CLIPLayer(cfg), params["layers"], x, causal_padding_mask(attention_mask))
    x = _layer_norm(cfg).apply({"params": params["final_layer_norm"]}, x)
    return x, x[jnp.arange(b), eos_positions(cfg, input_ids)]


def boxed_text_params(cfg: CLIPTextConfig, rng):
    r_emb, r_layers, r_norm = jax.random.split(rng, 3)
    x = jnp.zeros((1, 1, cfg.hidden_size), dtype_of(cfg.dtype))
    return {"embeddings": TextEmbeddings(cfg).init(r_emb, jnp.zeros((1, 1), jnp.int32))["params"],
            "layers": init_stack(CLIPLayer(cfg), cfg.num_layers, r_layers, x, jnp.ones((1, 1, 1, 1), bool)),
            "final_layer_norm": _layer_norm(cfg).init(r_norm, x)["params"]}


# --------------------------------------------------------------------------------------- vision

class VisionEmbeddings(nn.Module):
    """Patch embedding (no bias) of channels-last pixels, CLS token first, learned positions."""

    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels):
        c, kw = self.cfg, _kw(self.cfg)
        b, h, w, ch = pixels.shape
        if (h, w, ch) != (c.image_size, c.image_size, c.channels):
            raise ValueError(f"pixel values of size {h}x{w}x{ch} do not match the vision tower's "
                             f"{c.image_size}x{c.image_size}x{c.channels}")
        p, g = c.patch_size, c.image_size // c.patch_size
        patches = pixels.reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * ch)
        x = dense(c.hidden_size, (None, "embed"), use_bias=False, name="patch_embedding", **kw)(patches.astype(kw["dtype"]))
        cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                         (c.hidden_size,), kw["param_dtype"])
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.hidden_size)), x], axis=1)
        pos = _embed(g * g + 1, c.hidden_size, (None, "embed"), c, "position_embedding")(jnp.arange(g * g + 1))
        return (x + pos[None]).astype(kw["dtype"])


def vision_hidden(params, cfg: CLIPVisionConfig, pixels, n_layers: int | None = None):
    """transformers' CLIPVisionModel `hidden_states[n_layers]` [B, 1 + patches, D] in the activation dtype:
    the output of the first `n_layers` layers (all when None). pixels: [B, H, W, C] channels-last, normalised."""
    x = VisionEmbeddings(cfg).apply({"params": params["embeddings"]}, pixels)
    x = _layer_norm(cfg).apply({"params": params["pre_layrnorm"]}, x).astype(dtype_of(cfg.dtype))
    return run_stack(CLIPLayer(cfg, impl=cfg.attention), params["layers"], x, None, n=n_layers)


def boxed_vision_params(cfg: CLIPVisionConfig, rng):
    r_emb, r_layers, r_norm = jax.random.split(rng, 3)
    x = jnp.zeros((1, 1, cfg.hidden_size), dtype_of(cfg.dtype))
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), dtype_of(cfg.dtype))
    return {"embeddings": VisionEmbeddings(cfg).init(r_emb, pixels)["params"],
            "pre_layrnorm": _layer_norm(cfg).init(r_norm, x)["params"],
            "layers": init_stack(CLIPLayer(cfg, impl=cfg.attention), cfg.num_layers, r_layers, x, None)}


# ---------------------------------------------------------------------------------- parameters

def _boxed(cfg, rng):
    return (boxed_text_params if isinstance(cfg, CLIPTextConfig) else boxed_vision_params)(cfg, rng)


init_params, abstract_params, param_logical_axes, kernel_layouts = P.views(_boxed)
