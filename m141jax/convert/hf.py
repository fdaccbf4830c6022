"""What the Hugging Face converters (`llm`, `clip`, `vlm`) share: locating a sub-model's key prefix,
resolving the config, and the common weight transforms.

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

from m141jax.convert.plan import check, execute
from m141jax.convert.sources import open_source


def find_prefix(keys, anchor: str, what: str) -> str:
    """The unique prefix p with p + anchor in keys."""
    found = sorted(k[: -len(anchor)] for k in keys if k.endswith(anchor))
    if len(found) != 1:
        raise ValueError(f"cannot locate the {what}: expected one key ending in {anchor!r}, found "
                         f"{found if found else 'none'}")
    return found[0]


def resolve_config(config: str | None, folder_config: dict | None, presets: dict[str, Any],
                   from_hf: Callable[[dict], Any], default: str):
    """--config as a Hugging Face config.json or a preset name; else the folder's config.json; else `default`."""
    from m141jax.config import load_json

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
