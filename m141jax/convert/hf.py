"""What the Hugging Face converters (`llm`, `clip`, `vlm`) share: their config.json -> config dataclass
translators, locating a sub-model's key prefix, resolving the config, and the common weight transforms.

Hugging Face folders nest the same model under different prefixes: `model.layers.N` (LlamaForCausalLM),
`layers.N` (LlamaModel), `language_model.model.layers.N` (LLaVA saved by transformers 4.40, e.g.
xtuner/llava-llama-3-8b-v1_1-transformers), `model.language_model.layers.N` (current transformers).
Each converter finds its prefix from one anchor key, then checks every key under it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from m141jax.config import CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, load_json
from m141jax.convert.plan import check, execute
from m141jax.convert.sources import open_source


def find_prefix(keys, anchor: str, what: str) -> str:
    """The unique prefix p with p + anchor in keys."""
    found = sorted(k[: -len(anchor)] for k in keys if k.endswith(anchor))
    if len(found) != 1:
        raise ValueError(f"cannot locate the {what}: expected one key ending in {anchor!r}, found "
                         f"{found if found else 'none'}")
    return found[0]


# ---- Hugging Face config.json -> LlamaConfig / CLIPTextConfig / LlavaConfig

def _hf_config(d: dict[str, Any], accepted: tuple[str, ...]):
    """A transformers config object for a config.json dict (missing fields take transformers' defaults,
    as `from_pretrained` would), checked to be one of the `accepted` model types."""
    from transformers import CONFIG_MAPPING

    kind = d.get("model_type")
    if kind not in accepted:
        raise ValueError(f"config model_type {kind!r} is not supported here; accepted: {accepted}")
    return CONFIG_MAPPING[kind].from_dict(d)


def _llama_from_hf(hf, **runtime) -> LlamaConfig:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {rope['rope_type']!r} is not supported; accepted: 'default' (Llama-3.0)")
    for field, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if getattr(hf, field, want) != want:
            raise ValueError(f"Llama {field}={getattr(hf, field)!r} is not supported; accepted: {want!r}")
    return LlamaConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
                       num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                       head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                       mlp_hidden=hf.intermediate_size, rms_eps=hf.rms_norm_eps,
                       rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))), **runtime)


def _clip_fields(hf) -> dict[str, Any]:
    return dict(hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                mlp_hidden=hf.intermediate_size, layer_norm_eps=hf.layer_norm_eps, act=hf.hidden_act)


def llama_config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face config.json: a Llama model, or a LLaVA model (its text_config)."""
    hf = _hf_config(d, ("llama", "llava"))
    return _llama_from_hf(hf.text_config if d["model_type"] == "llava" else hf)


def clip_text_config_from_hf(d: dict[str, Any]) -> CLIPTextConfig:
    """A CLIPTextConfig from a CLIP text-model config.json or a full CLIP config.json (its text_config)."""
    hf = _hf_config(d, ("clip_text_model", "clip"))
    hf = hf.text_config if d["model_type"] == "clip" else hf
    return CLIPTextConfig(vocab_size=hf.vocab_size, max_positions=hf.max_position_embeddings,
                          eos_token_id=hf.eos_token_id, **_clip_fields(hf))


def llava_config_from_hf(d: dict[str, Any]) -> LlavaConfig:
    """A LlavaConfig from a LLaVA config.json (xtuner's 4.40-era layout or a current one)."""
    hf = _hf_config(d, ("llava",))
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r} is not supported; accepted: one int")
    v = hf.vision_config
    if v.model_type != "clip_vision_model":
        raise ValueError(f"vision tower {v.model_type!r} is not supported; accepted: 'clip_vision_model'")
    vision = CLIPVisionConfig(image_size=v.image_size, patch_size=v.patch_size, channels=v.num_channels,
                              **_clip_fields(v))
    return LlavaConfig(text=_llama_from_hf(hf.text_config), vision=vision, image_token_id=hf.image_token_id,
                       feature_layer=layer, feature_select=hf.vision_feature_select_strategy,
                       projector_act=hf.projector_hidden_act, projector_bias=hf.multimodal_projector_bias)


def resolve_config(config: str | None, folder_config: dict | None, presets: dict[str, Any],
                   from_hf: Callable[[dict], Any], default: str):
    """--config as a Hugging Face config.json or a preset name; else the folder's config.json; else `default`."""
    if config is not None:
        if Path(config).is_file():
            return from_hf(load_json(config))
        if config in presets:
            return presets[config]
        raise ValueError(f"--config {config!r} is neither a JSON file nor a preset; presets: {sorted(presets)}")
    if folder_config is not None:
        return from_hf(folder_config)
    return presets[default]


def with_param_dtype(cfg, dtype):
    """The config with param_dtype set to the stored dtype, nested configs included."""
    name = "fp32" if dtype == np.float32 else "bf16"
    kw = {f.name: with_param_dtype(getattr(cfg, f.name), dtype) for f in dataclasses.fields(cfg)
          if dataclasses.is_dataclass(getattr(cfg, f.name))}
    if any(f.name == "param_dtype" for f in dataclasses.fields(cfg)):
        kw["param_dtype"] = name
    return dataclasses.replace(cfg, **kw)


def convert_with(src: str, config: str | None, dtype, progress: bool, *, what: str, presets, from_hf, default,
                 plan_for: Callable, abstract: Callable):
    """Open src, resolve the config, build the plan (`plan_for(cfg, keys) -> (plan, ignore)`), check it
    completely, then convert one tensor at a time. Returns (config with the stored dtype, numpy tree)."""
    source, folder_config = open_source(src, strip=())
    cfg = resolve_config(config, folder_config, presets, from_hf, default)
    plan, ignore = plan_for(cfg, source.keys())
    print(f"{what}: {len(source.keys())} tensors", flush=True)
    check(plan, source, ignore=ignore, what=f"{what} checkpoint")
    return with_param_dtype(cfg, dtype), execute(plan, source, abstract(cfg), dtype, progress)


def unused(key: str) -> bool:
    """Buffers and heads no encoder reads: position-id buffers, RoPE caches, the LM head."""
    return key.endswith(("position_ids", "rotary_emb.inv_freq")) or key.split(".")[-2:-1] == ["lm_head"]


# ---- transforms from PyTorch tensors (Linear weights [out, in]) to JAX leaves
def ident(x):
    return x


def linear(w):
    """[out, in] -> kernel [in, out]."""
    return w.T


def heads_in(heads: int, head_dim: int):
    """[heads·head_dim, in] -> kernel [in, heads, head_dim]."""
    return lambda w: w.T.reshape(-1, heads, head_dim)


def heads_out(heads: int, head_dim: int):
    """[out, heads·head_dim] -> kernel [heads, head_dim, out]."""
    return lambda w: w.T.reshape(heads, head_dim, -1)


def heads_bias(heads: int, head_dim: int):
    return lambda b: b.reshape(heads, head_dim)
