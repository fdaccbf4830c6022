"""LLaVA (release.md E.3): CLIP vision features -> 2-layer GELU projector -> merged into the Llama input.

The merge is explicit: every image-token position of `input_ids` (the expanded form, one token per
image-feature position, as current transformers processors produce) receives the next projected
feature vector, in reading order over the batch, exactly like transformers' `masked_scatter`. The
release relied on transformers 4.47's internal expansion of a single `<image>` token, which gives
the same sequence: [text before, 576 features, text after], positions 0..L−1.

The language model is `m141jax.models.llama` on `params["language_model"]`: the prompt encoder uses
the same arrays, so one copy of the 8B weights serves both.

Parameter tree: {"language_model": llama tree, "vision_tower": CLIP vision tree, "projector": {"linear_1", "linear_2"}}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m141jax.config import LlavaConfig, dtype_of
from m141jax.models import clip, llama
from m141jax.models import params as P
from m141jax.models.layers import dense


class Projector(nn.Module):
    """linear_1 (vision width -> text width) -> GELU -> linear_2."""

    cfg: LlavaConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg.text
        kw = dict(dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype), use_bias=self.cfg.projector_bias)
        h = dense(c.hidden_size, ("vision_embed", "mlp"), name="linear_1", **kw)(x.astype(kw["dtype"]))
        return dense(c.hidden_size, ("mlp", "embed"), name="linear_2", **kw)(clip.ACTIVATIONS[self.cfg.projector_act](h))


def image_features(params, cfg: LlavaConfig, pixels):
    """Projected image features [N, image_seq_length, text width] for pixels [N, H, W, C] (channels-last)."""
    h = clip.vision_hidden(params["vision_tower"], cfg.vision, pixels, n_layers=cfg.vision_layers_run)
    if cfg.feature_select == "default":
        h = h[:, 1:]  # drop CLS
    return Projector(cfg).apply({"params": params["projector"]}, h)


def merge_image_features(embeds, input_ids, features, image_token_id: int):
    """embeds [B, L, D] with the k-th image-token position (row-major over the batch) replaced by row k
    of features [N, S, D] flattened to [N·S, D]. Token and feature counts must agree (`check_image_tokens`)."""
    is_image = input_ids == image_token_id
    index = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    return jnp.where(is_image[..., None], flat[jnp.clip(index, 0, flat.shape[0] - 1)], embeds)


def check_image_tokens(cfg: LlavaConfig, input_ids, n_images: int) -> None:
    """One-line error unless input_ids hold exactly image_seq_length image tokens per image."""
    found = int((np.asarray(input_ids) == cfg.image_token_id).sum())
    want = n_images * cfg.image_seq_length
    if found != want:
        raise ValueError(f"input_ids hold {found} image tokens (id {cfg.image_token_id}) but {n_images} image(s) "
                         f"give {want} features: pass one image token per feature position "
                         f"({cfg.image_seq_length} per image, the expanded form)")


def llava_forward(params, cfg: LlavaConfig, input_ids, attention_mask, pixels):
    """The language model's last layer after the final norm [B, L, D] in fp32 (transformers'
    `LlavaForConditionalGeneration(...).hidden_states[-1]`). pixels: [N, H, W, C] channels-last."""
    lm = params["language_model"]
    embeds = llama.embed_tokens(lm, cfg.text, input_ids)
    embeds = merge_image_features(embeds, input_ids, image_features(params, cfg, pixels), cfg.image_token_id)
    return llama.llama_forward(lm, cfg.text, embeds, attention_mask, final_norm=True)


def boxed_params(cfg: LlavaConfig, rng):
    r_lm, r_vision, r_proj = jax.random.split(rng, 3)
    x = jnp.zeros((1, 1, cfg.vision.hidden_size), dtype_of(cfg.vision.dtype))
    return {"language_model": llama.boxed_params(cfg.text, r_lm),
            "vision_tower": clip.boxed_vision_params(cfg.vision, r_vision),
            "projector": Projector(cfg).init(r_proj, x)["params"]}


init_params, abstract_params, param_logical_axes, kernel_layouts = P.views(boxed_params)
