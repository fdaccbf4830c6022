"""Frozen configuration dataclasses and named presets.

Every component has one frozen dataclass. Presets are plain instances; files under `configs/` and
command-line overrides only select a preset and replace fields (`dataclasses.replace`). The PyTorch
release's constructor-argument names and diffusers' `config.json` names are mapped here, once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
          "fp16": jnp.float16, "float16": jnp.float16}


def dtype_of(name: str):
    """The jnp dtype for a name such as 'bf16' or 'float32'."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; accepted: {sorted(DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The HunyuanVideo-style MMDiT (spec B.0). Defaults are the released 13B image-to-video model."""

    in_channels: int = 33  # 16 noisy + 16 reference + 1 frame-0 mask (I2V); 16 for the plain T2V form
    out_channels: int = 16
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    double_blocks: int = 20
    single_blocks: int = 40
    refiner_blocks: int = 2
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w)
    rope_axes: tuple[int, int, int] = (16, 56, 56)  # head-dim channels for (t, h, w); sums to head_dim
    rope_theta: float = 256.0
    qkv_bias: bool = True
    qk_norm: bool = True
    guidance_embed: bool = False
    text_dim: int = 4096
    pooled_dim: int = 768
    # runtime choices (not architecture)
    param_dtype: str = "bf16"
    dtype: str = "bf16"  # activation / matmul dtype; norms, softmax, RoPE always run in fp32
    attention: str = "auto"  # auto | xla | blockwise | cudnn (see models/attention.py)
    attention_block: int = 512  # query/key block length of the blockwise backend
    remat: str = "none"  # none | full | dots (see models/dit.py)
    sequence_parallel: str = "none"  # none | ulysses | ring over a mesh's `sequence` axis (models/sequence_parallel.py)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"rope_axes {self.rope_axes} sum to {sum(self.rope_axes)}, "
                             f"but head_dim is {self.head_dim}")
        if any(d % 2 for d in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must all be even")
        dtype_of(self.param_dtype), dtype_of(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latent the sampler integrates (the I2V input adds ref + mask)."""
        return self.out_channels

    @property
    def image_conditioned(self) -> bool:
        """True for the 33-channel I2V input (noise ‖ reference ‖ mask), False for the plain T2V form."""
        return self.in_channels == 2 * self.out_channels + 1

    def architecture(self) -> dict[str, Any]:
        """Architecture fields only (what a checkpoint must match)."""
        skip = {"param_dtype", "dtype", "attention", "attention_block", "remat", "sequence_parallel"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


DIT_PRESETS: dict[str, DiTConfig] = {
    "magic141-i2v-13b": DiTConfig(),
    "hunyuan-t2v-13b": DiTConfig(in_channels=16, guidance_embed=True),
    "small-i2v": DiTConfig(hidden_size=512, num_heads=8, double_blocks=4, single_blocks=8,
                           rope_axes=(16, 24, 24), text_dim=256, pooled_dim=128),
    "tiny-i2v": DiTConfig(hidden_size=64, num_heads=4, double_blocks=2, single_blocks=2,
                          rope_axes=(4, 6, 6), text_dim=32, pooled_dim=16),
    "tiny-t2v": DiTConfig(in_channels=16, guidance_embed=True, hidden_size=64, num_heads=4, double_blocks=2,
                          single_blocks=2, rope_axes=(4, 6, 6), text_dim=32, pooled_dim=16),
}


def preset(name: str, table: dict[str, Any] | None = None, **overrides):
    """A named preset with fields replaced; the table defaults to the DiT presets."""
    table = DIT_PRESETS if table is None else table
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; accepted: {sorted(table)}")
    return dataclasses.replace(table[name], **overrides)


# ------------------------------------------------------------------ loaders from PyTorch-side configs

# release constructor argument -> DiTConfig field
_RELEASE_DIT_FIELDS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "hidden_size": "hidden_size",
    "heads_num": "num_heads", "mlp_width_ratio": "mlp_ratio", "mm_double_blocks_depth": "double_blocks",
    "mm_single_blocks_depth": "single_blocks", "patch_size": "patch_size", "rope_dim_list": "rope_axes",
    "rope_theta": "rope_theta", "qkv_bias": "qkv_bias", "qk_norm": "qk_norm", "guidance_embed": "guidance_embed",
    "text_states_dim": "text_dim", "text_states_dim_2": "pooled_dim",
}
# accepted release arguments that must hold the value the model implements
_RELEASE_DIT_FIXED = {"mlp_act_type": "gelu_tanh", "qk_norm_type": "rms", "text_projection": "single_refiner",
                      "use_attention_mask": True}
# diffusers HunyuanVideoTransformer3DModel config -> DiTConfig field
_DIFFUSERS_DIT_FIELDS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "num_layers": "double_blocks",
    "num_single_layers": "single_blocks", "num_refiner_layers": "refiner_blocks", "mlp_ratio": "mlp_ratio",
    "guidance_embeds": "guidance_embed", "text_embed_dim": "text_dim", "pooled_projection_dim": "pooled_dim",
    "rope_theta": "rope_theta", "rope_axes_dim": "rope_axes",
}


def _tuple3(v) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (1, v, v)
    if len(v) != 3:
        raise ValueError(f"patch_size {v!r} must be an int or a list of three ints (t, h, w)")
    return tuple(int(x) for x in v)


def dit_config_from_dict(d: dict[str, Any], base: DiTConfig | None = None) -> DiTConfig:
    """A DiTConfig from a release-style JSON of constructor arguments or a diffusers config.json."""
    base = base or DiTConfig()
    if "_class_name" in d or "num_attention_heads" in d:  # diffusers
        known = set(_DIFFUSERS_DIT_FIELDS) | {"num_attention_heads", "attention_head_dim", "patch_size",
                                              "patch_size_t", "qk_norm", "image_condition_type"}
        kw = {_DIFFUSERS_DIT_FIELDS[k]: v for k, v in d.items() if k in _DIFFUSERS_DIT_FIELDS}
        heads = d.get("num_attention_heads", 24)
        kw["num_heads"] = heads
        kw["hidden_size"] = heads * d.get("attention_head_dim", 128)
        kw["patch_size"] = (d.get("patch_size_t", 1), d.get("patch_size", 2), d.get("patch_size", 2))
        if d.get("qk_norm", "rms_norm") not in ("rms_norm", None):
            raise ValueError(f"qk_norm {d['qk_norm']!r} is not supported; accepted: 'rms_norm'")
        kw["qk_norm"] = d.get("qk_norm", "rms_norm") is not None
        if d.get("image_condition_type") == "token_replace":
            raise ValueError("image_condition_type 'token_replace' (HunyuanVideo-I2V 16ch) is not the Magic141 "
                             "architecture; accepted: None or 'latent_concat'")
        unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
    else:  # release constructor arguments
        kw = {_RELEASE_DIT_FIELDS[k]: v for k, v in d.items() if k in _RELEASE_DIT_FIELDS}
        for k, want in _RELEASE_DIT_FIXED.items():
            if k in d and d[k] != want:
                raise ValueError(f"{k}={d[k]!r} is not supported; accepted: {want!r}")
        ignored = {"dtype", "device", "text_states_dim_2", "model_type", "args", "text_len"}
        unknown = sorted(k for k in d if k not in _RELEASE_DIT_FIELDS and k not in _RELEASE_DIT_FIXED
                         and k not in ignored)
    if unknown:
        raise ValueError(f"unknown DiT config fields {unknown}")
    if "patch_size" in kw:
        kw["patch_size"] = _tuple3(kw["patch_size"])
    if "rope_axes" in kw:
        kw["rope_axes"] = tuple(int(x) for x in kw["rope_axes"])
    return dataclasses.replace(base, **kw)


def load_json(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def to_json_dict(cfg) -> dict[str, Any]:
    """A JSON-serialisable dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_json_dict(cls, d: dict[str, Any]):
    """The inverse of to_json_dict: lists become tuples where the field is a tuple."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kw)
