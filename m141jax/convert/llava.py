"""`vlm` key map: a Hugging Face LLaVA folder (xtuner/llava-llama-3-8b-v1_1-transformers's 4.40-era names
`language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`, or current ones
under `model.`) onto `m141jax.models.llava`. The LM head and the vision tower's post_layernorm are
not read by the encoder and are skipped."""

from __future__ import annotations

from m141jax.config import LLAVA_PRESETS, LlavaConfig
from m141jax.convert.clip import VISION_ANCHOR, vision_plan
from m141jax.convert.hf import convert_with, find_prefix, ident, linear, llava_config_from_hf, unused
from m141jax.convert.llama import ANCHOR as LLAMA_ANCHOR
from m141jax.convert.llama import llama_plan
from m141jax.convert.plan import recipe
from m141jax.models.llava import abstract_params


def projector_plan(c: LlavaConfig, prefix: str):
    V, D = c.vision.hidden_size, c.text.hidden_size
    out = []
    for name, n_in in (("linear_1", V), ("linear_2", D)):
        out.append(recipe(("projector", name, "kernel"), None, linear, (f"{prefix}{name}.weight", (D, n_in))))
        if c.projector_bias:
            out.append(recipe(("projector", name, "bias"), None, ident, (f"{prefix}{name}.bias", (D,))))
    return out


def plan_for(cfg: LlavaConfig, keys):
    """(conversion plan, predicate of the source keys the plan leaves unused) for a state dict's keys."""
    lm = find_prefix(keys, LLAMA_ANCHOR, "LLaVA language model")
    vt = find_prefix(keys, VISION_ANCHOR, "LLaVA vision tower")
    proj = find_prefix(keys, "multi_modal_projector.linear_1.weight", "LLaVA projector") + "multi_modal_projector."
    plan = llama_plan(cfg.text, lm, ("language_model",)) + vision_plan(cfg.vision, vt, ("vision_tower",)) \
        + projector_plan(cfg, proj)
    return plan, lambda k: unused(k) or k.startswith(f"{vt}post_layernorm.")


def convert(src: str, config: str | None, dtype, progress: bool = True):
    """(LlavaConfig, numpy parameter tree) from a Hugging Face LLaVA folder / weights file."""
    return convert_with(src, config, dtype, progress, what="vlm", presets=LLAVA_PRESETS, from_hf=llava_config_from_hf,
                        default="llava-llama-3-8b", plan_for=plan_for, abstract=abstract_params)
