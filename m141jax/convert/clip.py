"""`clip` key map: a Hugging Face CLIP text model (CLIPTextModel, or the text half of a full CLIPModel
folder such as openai/clip-vit-large-patch14) onto `m141jax.models.clip`; also the vision-tower map
that the `vlm` converter uses. Projections and logit scale are not part of the encoders."""

from __future__ import annotations

from m141jax.config import CLIP_TEXT_PRESETS, CLIPTextConfig, CLIPVisionConfig
from m141jax.convert.hf import (
    clip_text_config_from_hf,
    convert_with,
    find_prefix,
    heads_bias,
    heads_in,
    heads_out,
    ident,
    linear,
    unused,
)
from m141jax.convert.plan import Recipe, recipe
from m141jax.models.clip import abstract_params

TEXT_ANCHOR = "embeddings.token_embedding.weight"
VISION_ANCHOR = "embeddings.patch_embedding.weight"


def _layers(c: CLIPTextConfig | CLIPVisionConfig, prefix: str, root: tuple[str, ...]) -> list[Recipe]:
    """The encoder layers `{prefix}encoder.layers.N.*`."""
    D, H, M = c.hidden_size, c.num_heads, c.mlp_hidden
    hd = D // H
    t, out = (*root, "layers"), []
    for i in range(c.num_layers):
        k = f"{prefix}encoder.layers.{i}"
        for n in "qkv":
            out += [recipe((*t, f"{n}_proj", "kernel"), i, heads_in(H, hd), (f"{k}.self_attn.{n}_proj.weight", (D, D))),
                    recipe((*t, f"{n}_proj", "bias"), i, heads_bias(H, hd), (f"{k}.self_attn.{n}_proj.bias", (D,)))]
        out += [recipe((*t, "out_proj", "kernel"), i, heads_out(H, hd), (f"{k}.self_attn.out_proj.weight", (D, D))),
                recipe((*t, "out_proj", "bias"), i, ident, (f"{k}.self_attn.out_proj.bias", (D,))),
                recipe((*t, "mlp", "fc1", "kernel"), i, linear, (f"{k}.mlp.fc1.weight", (M, D))),
                recipe((*t, "mlp", "fc1", "bias"), i, ident, (f"{k}.mlp.fc1.bias", (M,))),
                recipe((*t, "mlp", "fc2", "kernel"), i, linear, (f"{k}.mlp.fc2.weight", (D, M))),
                recipe((*t, "mlp", "fc2", "bias"), i, ident, (f"{k}.mlp.fc2.bias", (D,)))]
        out += _layer_norm((*t, "layer_norm1"), i, f"{k}.layer_norm1", D) + _layer_norm((*t, "layer_norm2"), i,
                                                                                         f"{k}.layer_norm2", D)
    return out


def _layer_norm(target, layer, key, d) -> list[Recipe]:
    return [recipe((*target, "scale"), layer, ident, (f"{key}.weight", (d,))),
            recipe((*target, "bias"), layer, ident, (f"{key}.bias", (d,)))]


def text_plan(c: CLIPTextConfig, prefix: str, root: tuple[str, ...] = ()) -> list[Recipe]:
    D, e = c.hidden_size, (*root, "embeddings")
    return ([recipe((*e, "token_embedding", "embedding"), None, ident,
                    (f"{prefix}embeddings.token_embedding.weight", (c.vocab_size, D))),
             recipe((*e, "position_embedding", "embedding"), None, ident,
                    (f"{prefix}embeddings.position_embedding.weight", (c.max_positions, D)))]
            + _layers(c, prefix, root) + _layer_norm((*root, "final_layer_norm"), None, f"{prefix}final_layer_norm", D))


def _patch(w):  # conv [D, C, p, p] -> kernel [(p, p, C), D] for channels-last patches
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def vision_plan(c: CLIPVisionConfig, prefix: str, root: tuple[str, ...] = ()) -> list[Recipe]:
    """The vision tower up to its last layer (`post_layernorm`, which only pools CLS, is not read)."""
    D, p, e = c.hidden_size, c.patch_size, (*root, "embeddings")
    return ([recipe((*e, "patch_embedding", "kernel"), None, _patch,
                    (f"{prefix}embeddings.patch_embedding.weight", (D, c.channels, p, p))),
             recipe((*e, "class_embedding"), None, ident, (f"{prefix}embeddings.class_embedding", (D,))),
             recipe((*e, "position_embedding", "embedding"), None, ident,
                    (f"{prefix}embeddings.position_embedding.weight", (c.num_patches + 1, D)))]
            + _layer_norm((*root, "pre_layrnorm"), None, f"{prefix}pre_layrnorm", D) + _layers(c, prefix, root))


def plan_for(cfg: CLIPTextConfig, keys):
    """(conversion plan, predicate of the source keys the plan leaves unused) for a state dict's keys."""
    prefix = find_prefix(keys, TEXT_ANCHOR, "CLIP text model")
    return text_plan(cfg, prefix), lambda k: unused(k) or not k.startswith(prefix)


def convert(src: str, config: str | None, dtype, progress: bool = True):
    """(CLIPTextConfig, numpy parameter tree) from a Hugging Face CLIP folder / weights file."""
    return convert_with(src, config, dtype, progress, what="clip", presets=CLIP_TEXT_PRESETS,
                        from_hf=clip_text_config_from_hf, default="clip-l", plan_for=plan_for,
                        abstract=abstract_params)
