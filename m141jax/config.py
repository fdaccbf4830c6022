"""Frozen configuration dataclasses and named presets.

Every component has one frozen dataclass. Presets are plain instances; files under `configs/` and
command-line overrides only select a preset and replace fields (`dataclasses.replace`). The PyTorch
release's constructor-argument names and diffusers' `config.json` names are mapped here, once.
"""

from __future__ import annotations

import dataclasses
import json
import typing
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
    """The HunyuanVideo-style MMDiT (release.md B.0). Defaults are the released 13B image-to-video model."""

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
    attention_block: int | None = None  # block length of the blockwise backend (None: per platform)
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


def runtime_dtypes(cfg, dtype: str):
    """The config with parameters and activations in `dtype` (fp32 | bf16), nested configs included."""
    dtype_of(dtype)
    kw = {f.name: runtime_dtypes(getattr(cfg, f.name), dtype) for f in dataclasses.fields(cfg)
          if dataclasses.is_dataclass(getattr(cfg, f.name))}
    kw.update({k: dtype for k in ("param_dtype", "dtype") if hasattr(cfg, k)})
    return dataclasses.replace(cfg, **kw)


def load_json(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def to_json_dict(cfg) -> dict[str, Any]:
    """A JSON-serialisable dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_json_dict(cls, d: dict[str, Any]):
    """The inverse of to_json_dict: lists become tuples, dicts of nested config fields become configs."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in d.items():
        nested = [t for t in (hints[k], *typing.get_args(hints[k])) if dataclasses.is_dataclass(t)]
        if isinstance(v, dict) and nested:
            v = from_json_dict(nested[0], v)
        kw[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


# ------------------------------------------------------------------ the causal 3D VAE (release.md D)

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The causal 3D VAE "884-16c-hy" (release.md D.1). Defaults are the released HunyuanVideo VAE.

    `sample_size` / `sample_tsize` are the release's tile sizes in pixels / frames (release.md D.5b); the
    overlap factor 0.25 is fixed by the release.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder resnets per block; the decoder has one more
    norm_num_groups: int = 32
    spatial_compression_ratio: int = 8
    time_compression_ratio: int = 4
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.476986
    # per-channel statistics of the posterior means; when given, latents are normalised per channel,
    # (z − mean) / std, instead of z · scaling_factor (the release's single factor). The demo VAE uses them:
    # its channels' means and spreads differ by far more than a single factor can even out
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()
    sample_size: int = 256
    sample_tsize: int = 64
    # runtime choices (not architecture)
    param_dtype: str = "bf16"
    dtype: str = "bf16"  # activation / conv dtype; GroupNorm and softmax always run in fp32

    def __post_init__(self):
        n = len(self.block_out_channels)
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {self.block_out_channels}: {bad} not divisible by "
                             f"norm_num_groups {self.norm_num_groups}")
        if self.time_compression_ratio != 4:
            raise ValueError(f"time_compression_ratio {self.time_compression_ratio} is not supported; accepted: 4")
        if n < 3 or 2 ** (n - 1) != self.spatial_compression_ratio:
            raise ValueError(f"spatial_compression_ratio {self.spatial_compression_ratio} must be 2**(blocks-1) "
                             f"with at least 3 blocks (the release derives the latent tile size from the block "
                             f"count); got {n} blocks")
        stride, tstride = int(self.sample_size * 0.75), int(self.sample_tsize * 0.75)
        if stride % self.spatial_compression_ratio or self.sample_size % self.spatial_compression_ratio:
            raise ValueError(f"sample_size {self.sample_size} and its tile stride {stride} must be multiples of "
                             f"{self.spatial_compression_ratio} (e.g. a multiple of 32)")
        if tstride % self.time_compression_ratio or self.sample_tsize % self.time_compression_ratio:
            raise ValueError(f"sample_tsize {self.sample_tsize} and its tile stride {tstride} must be multiples of "
                             f"{self.time_compression_ratio} (e.g. a multiple of 16)")
        stats = len(self.latents_mean), len(self.latents_std)
        if stats not in ((0, 0), (self.latent_channels,) * 2) or any(v <= 0 for v in self.latents_std):
            raise ValueError(f"latents_mean {self.latents_mean} and latents_std {self.latents_std} must both be empty "
                             f"or both hold {self.latent_channels} values (one per latent channel), every std > 0")
        dtype_of(self.param_dtype), dtype_of(self.dtype)

    def architecture(self) -> dict[str, Any]:
        """Architecture fields only (what a checkpoint must match)."""
        skip = {"param_dtype", "dtype", "sample_size", "sample_tsize", "scaling_factor", "latents_mean", "latents_std"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


VAE_PRESETS: dict[str, VAEConfig] = {
    "hunyuan-vae": VAEConfig(),
    "small-vae": VAEConfig(block_out_channels=(32, 64, 128, 128), norm_num_groups=8),
    "tiny-vae": VAEConfig(block_out_channels=(8, 16, 16, 16), norm_num_groups=4),
}

# accepted config fields that must hold the value the model implements (release and diffusers)
_VAE_FIXED = {"act_fn": "silu", "in_channels": 3, "out_channels": 3}
_VAE_BLOCKS = {"down_block_types": ("DownEncoderBlockCausal3D", "HunyuanVideoDownBlock3D"),
               "up_block_types": ("UpDecoderBlockCausal3D", "HunyuanVideoUpBlock3D")}
# release AutoencoderKLCausal3D / diffusers AutoencoderKLHunyuanVideo argument -> VAEConfig field
_VAE_FIELDS = {"latent_channels": "latent_channels", "block_out_channels": "block_out_channels",
               "layers_per_block": "layers_per_block", "norm_num_groups": "norm_num_groups",
               "spatial_compression_ratio": "spatial_compression_ratio",
               "time_compression_ratio": "time_compression_ratio", "temporal_compression_ratio": "time_compression_ratio",
               "mid_block_add_attention": "mid_block_add_attention", "scaling_factor": "scaling_factor",
               "sample_size": "sample_size", "sample_tsize": "sample_tsize"}


def vae_config_from_dict(d: dict[str, Any], base: VAEConfig | None = None) -> VAEConfig:
    """A VAEConfig from the release's config.json (AutoencoderKLCausal3D) or diffusers'
    (AutoencoderKLHunyuanVideo). diffusers has no tile sizes: the release's 256 px / 64 frames stay."""
    base = base or VAEConfig()
    for k, want in _VAE_FIXED.items():
        if k in d and d[k] != want:
            raise ValueError(f"VAE {k}={d[k]!r} is not supported; accepted: {want!r}")
    n = len(d.get("block_out_channels", base.block_out_channels))
    for k, accepted in _VAE_BLOCKS.items():
        if k in d and (len(d[k]) != n or any(t not in accepted for t in d[k])):
            raise ValueError(f"VAE {k}={d[k]!r} is not supported; accepted: {n} × one of {accepted}")
    unknown = sorted(k for k in d if k not in _VAE_FIELDS and k not in _VAE_FIXED and k not in _VAE_BLOCKS
                     and k not in ("force_upcast",) and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown VAE config fields {unknown}")
    kw = {_VAE_FIELDS[k]: v for k, v in d.items() if k in _VAE_FIELDS}
    if "block_out_channels" in kw:
        kw["block_out_channels"] = tuple(int(c) for c in kw["block_out_channels"])
    if isinstance(kw.get("sample_size"), (list, tuple)):  # the release reads the first entry
        kw["sample_size"] = int(kw["sample_size"][0])
    return dataclasses.replace(base, **kw)


# ------------------------------------------------------------------ text and image encoders (release.md E)

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-3 decoder (release.md E.1): grouped-query attention, RoPE (rotate-half), RMSNorm, SwiGLU.

    Defaults: the language model of xtuner/llava-llama-3-8b-v1_1 (Llama-3-8B-Instruct, vocabulary
    extended to 128320), which is also HunyuanVideo's text encoder.
    """

    vocab_size: int = 128320
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    mlp_hidden: int = 14336
    rms_eps: float = 1e-5
    rope_theta: float = 500000.0
    param_dtype: str = "bf16"
    dtype: str = "bf16"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        dtype_of(self.param_dtype), dtype_of(self.dtype)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The CLIP text transformer (release.md E.2). Defaults: CLIP ViT-L/14's text model (openai/clip-vit-large-patch14).

    Pooling: the final-LayerNorm state at the EOS position. With the legacy `eos_token_id` 2 (the
    openai configs) that is the argmax of the token ids, as in transformers; otherwise the first
    occurrence of `eos_token_id`.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    act: str = "quick_gelu"
    eos_token_id: int = 2
    param_dtype: str = "bf16"
    dtype: str = "bf16"

    def __post_init__(self):
        _check_clip(self)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The CLIP vision transformer (release.md E.3). Defaults: CLIP ViT-L/14 at 336 px (LLaVA's vision tower)."""

    image_size: int = 336
    patch_size: int = 14
    channels: int = 3
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_hidden: int = 4096
    layer_norm_eps: float = 1e-5
    act: str = "quick_gelu"
    attention: str = "xla"  # runtime: backend of the unmasked vision attention (577 tokens: xla is exact and cheap)
    param_dtype: str = "bf16"
    dtype: str = "bf16"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _check_clip(self)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


CLIP_ACTS = ("quick_gelu", "gelu")


def _check_clip(cfg) -> None:
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    if cfg.act not in CLIP_ACTS:
        raise ValueError(f"activation {cfg.act!r} is not supported; accepted: {CLIP_ACTS}")
    dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """LLaVA (release.md E.3): CLIP vision tower -> 2-layer projector -> features merged into the Llama input.

    Defaults: xtuner/llava-llama-3-8b-v1_1-transformers. `feature_layer` indexes the vision tower's
    hidden states as transformers does (−2: the output of the second-to-last layer); strategy
    "default" drops the CLS token, "full" keeps it.
    """

    text: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    image_token_id: int = 128257
    feature_layer: int = -2
    feature_select: str = "default"
    projector_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        if self.feature_select not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.feature_select!r} is not supported; "
                             f"accepted: 'default', 'full'")
        if not -self.vision.num_layers - 1 <= self.feature_layer <= self.vision.num_layers:
            raise ValueError(f"vision_feature_layer {self.feature_layer} is out of range for "
                             f"{self.vision.num_layers} vision layers")
        if self.projector_act not in CLIP_ACTS:
            raise ValueError(f"projector activation {self.projector_act!r} is not supported; accepted: {CLIP_ACTS}")

    @property
    def vision_layers_run(self) -> int:
        """How many vision layers produce the selected feature (hidden_states[feature_layer])."""
        n = self.vision.num_layers
        return self.feature_layer % (n + 1)

    @property
    def image_seq_length(self) -> int:
        """Image-feature positions per image in the Llama input (576 for ViT-L/14-336, CLS dropped)."""
        return self.vision.num_patches + (self.feature_select == "full")


_TINY_LLAMA = LlamaConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          mlp_hidden=128)
LLAMA_PRESETS: dict[str, LlamaConfig] = {"llama-3-8b": LlamaConfig(), "tiny-llama": _TINY_LLAMA}
CLIP_TEXT_PRESETS: dict[str, CLIPTextConfig] = {
    "clip-l": CLIPTextConfig(),
    "tiny-clip": CLIPTextConfig(vocab_size=1024, hidden_size=32, num_layers=2, num_heads=4, mlp_hidden=64),
}
LLAVA_PRESETS: dict[str, LlavaConfig] = {
    "llava-llama-3-8b": LlavaConfig(),
    # 336 px / 14 keeps the real 576 image positions (and so the 146 selected tokens) at a tiny width
    "tiny-llava": LlavaConfig(text=_TINY_LLAMA, image_token_id=1001,
                              vision=CLIPVisionConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_hidden=64)),
}


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


# ------------------------------------------------------------------ compression: quantization, N:M sparsity (release.md G)

# Parameter-path patterns (regular expressions searched in 'double_blocks/img_attn/qkv/kernel'-style paths)
EMBEDDINGS = (r"(^|/)(img_in|time_in|vector_in|guidance_in|input_embedder|t_embedder|c_embedder|patch_embedding"
              r"|embed_tokens|token_embedding|position_embedding)/")
NORMS = r"norm"
MODULATION = r"(_mod|modulation)/"
FINAL_LAYER = r"(^|/)final_layer/"
QUANT_EXCLUDE = (EMBEDDINGS, NORMS, FINAL_LAYER)
SPARSITY_EXCLUDE = (EMBEDDINGS, NORMS, MODULATION, FINAL_LAYER)


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """N:M structured sparsity of dense kernels: in every group of m consecutive inputs of an output
    channel, the n largest-magnitude weights are kept.

    Schedule: dense before begin_step; from begin_step to end_step the kept weights per group fall from
    m to n along the cubic sparsity ramp of Zhu & Gupta (2017), masks recomputed every `frequency`
    steps; n:m from end_step on. begin_step == end_step prunes once (one-shot).
    """

    n: int = 2
    m: int = 4
    include: tuple[str, ...] = (r"(^|/)kernel$",)
    exclude: tuple[str, ...] = SPARSITY_EXCLUDE
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 100

    def __post_init__(self):
        if not 0 < self.n <= self.m <= 256:
            raise ValueError(f"N:M sparsity {self.n}:{self.m} must have 0 < N <= M <= 256")
        if not 0 <= self.begin_step <= self.end_step or self.frequency < 1:
            raise ValueError(f"sparsity schedule begin_step {self.begin_step}, end_step {self.end_step}, frequency "
                             f"{self.frequency}: need 0 <= begin_step <= end_step and frequency >= 1")
# ------------------------------------------------------------------ training and distillation (release.md C.2-C.3, F)

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW after global-norm clipping, with a linear warm-up then a constant / cosine / linear decay."""

    learning_rate: float = 1e-5
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine | linear (down to final_lr_ratio·learning_rate at the last step)
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        if self.decay not in ("constant", "cosine", "linear"):
            raise ValueError(f"unknown decay {self.decay!r}; accepted: constant, cosine, linear")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """The flow-matching objective: x_σ = (1−σ)x₀ + σε, target ε − x₀ (release.md C.2), σ sampling and loss
    weighting as the release's helpers (C.3), CFG dropout as the release prepares it (F)."""

    sigma_sampling: str = "logit_normal"  # logit_normal | uniform | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0  # SD3 time shift s·σ/(1+(s−1)·σ) applied to the sampled σ; 1 = none (unknown for the release)
    weighting: str = "none"  # none | sigma_sqrt (σ⁻²) | cosmap
    cfg_dropout: float = 0.1  # probability that a sample's text is replaced by the empty prompt
    n_image_tokens: int = 146  # leading VLM image tokens of the text sequence; the dropout keeps them
    ref_frame_loss: bool = True  # include the conditioned frame 0 in the loss (unknown for the release)

    def __post_init__(self):
        if self.sigma_sampling not in ("logit_normal", "uniform", "mode"):
            raise ValueError(f"unknown sigma_sampling {self.sigma_sampling!r}; accepted: logit_normal, uniform, mode")
        if self.weighting not in ("none", "sigma_sqrt", "cosmap"):
            raise ValueError(f"unknown weighting {self.weighting!r}; accepted: none, sigma_sqrt, cosmap")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout {self.cfg_dropout} must lie in [0, 1]")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from: 'synthetic' (random latents + conditioning, shapes below) or a directory
    written by `m141jax prepare-data`."""

    source: str = "synthetic"
    batch_size: int = 1  # global batch; each host reads batch_size / process_count
    seed: int = 0  # shuffling seed
    read_threads: int = 4  # grain reader threads
    prefetch: int = 8  # batches read ahead
    num_samples: int = 64  # synthetic only
    frames: int = 2  # synthetic latent frames / height / width / text tokens
    height: int = 8
    width: int = 8
    text_len: int = 8


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length, randomness, logging and checkpointing of a training run."""

    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Flow-matching training of the DiT (`m141jax train`)."""

    model: DiTConfig = DiTConfig(param_dtype="fp32", remat="full")
    init: str = ""  # a DiT checkpoint to start from; '' = random initialisation
    flow: FlowConfig = FlowConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    ema_decay: float = 0.0  # 0 disables the EMA of the parameters
    sparsity: SparsityConfig | None = None  # N:M-sparse fine-tuning of the DiT (schedule in optimizer updates)
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()


@dataclasses.dataclass(frozen=True)
class DMDConfig:
    """DMD2 adversarial step distillation. Magic141's values were not published (release.md F); the defaults are
    DMD2's (SDXL) where one exists and marked otherwise."""

    student_steps: int = 4  # the generator's σ's are the inference σ's (release.md C.1) ...
    shift: float = 5.0  # ... with this shift
    real_guidance: float = 6.0  # CFG scale of the teacher's (real) score: distils CFG (not published; 6 assumed)
    critic_steps: int = 5  # two time-scale rule: critic updates per generator update
    dm_weight: float = 1.0
    gen_gan_weight: float = 5e-3  # generator's non-saturating GAN loss
    critic_gan_weight: float = 1e-2  # discriminator loss added to the fake score's flow loss
    dm_sigma_min: float = 0.02  # σ range of the distribution-matching gradient (DMD2: timesteps 20..980)
    dm_sigma_max: float = 0.98
    dm_shift: float = 1.0  # time shift on the distribution-matching σ's
    gan_sigma_max: float = 1.0  # discriminator inputs are noised to σ ~ U[0, gan_sigma_max) (0: clean)
    head_hidden: int = 0  # discriminator head width; 0 = the DiT's hidden size
    fake_flow: FlowConfig = FlowConfig(sigma_sampling="uniform", cfg_dropout=0.0)  # the fake score's loss

    def __post_init__(self):
        if self.student_steps < 1 or self.critic_steps < 1:
            raise ValueError(f"student_steps {self.student_steps} and critic_steps {self.critic_steps} must be ≥ 1")
        if not 0.0 <= self.dm_sigma_min < self.dm_sigma_max <= 1.0:
            raise ValueError(f"dm_sigma_min {self.dm_sigma_min} / dm_sigma_max {self.dm_sigma_max} must satisfy "
                             f"0 ≤ min < max ≤ 1")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """DMD2 distillation of a teacher DiT into a few-step generator (`m141jax distill`)."""

    model: DiTConfig = DiTConfig(param_dtype="fp32", remat="full")
    teacher: str = ""  # the teacher DiT checkpoint; '' = random initialisation (tests only)
    teacher_dtype: str = "bf16"  # the frozen teacher is held in this dtype
    dmd: DMDConfig = DMDConfig()
    generator_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=5e-7, clip_norm=10.0)
    critic_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=5e-7, clip_norm=10.0)
    sparsity: SparsityConfig | None = None  # keeps the generator N:M sparse (schedule in generator updates)
    n_image_tokens: int = 146  # leading VLM image tokens kept by the real score's unconditional branch
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()


_TINY = dict(param_dtype="fp32", dtype="fp32")
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "magic141-i2v-13b": TrainConfig(),
    "tiny-i2v": TrainConfig(model=preset("tiny-i2v", **_TINY), flow=FlowConfig(n_image_tokens=2),
                            optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=10),
                            data=DataConfig(batch_size=2), run=RunConfig(steps=20, checkpoint_every=10)),
}
DISTILL_PRESETS: dict[str, DistillConfig] = {
    "magic141-i2v-13b": DistillConfig(),
    "tiny-i2v": DistillConfig(model=preset("tiny-i2v", **_TINY), teacher_dtype="fp32", n_image_tokens=2,
                              dmd=DMDConfig(critic_steps=2, real_guidance=3.0),
                              generator_optimizer=OptimizerConfig(learning_rate=1e-4),
                              critic_optimizer=OptimizerConfig(learning_rate=1e-4),
                              data=DataConfig(batch_size=2), run=RunConfig(steps=20, checkpoint_every=10)),
}


def _coerce(hint, value, where: str):
    """value converted to the field type `hint` (a type or a nested config dataclass)."""
    if dataclasses.is_dataclass(hint):
        return value
    origin = getattr(hint, "__origin__", hint)
    if origin is tuple:
        return tuple(value)
    if origin is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r} must be true or false")
        return value
    if origin in (int, float):
        try:
            out = origin(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r} must be a number ({origin.__name__})") from None
        if origin is int and out != float(value):
            raise ValueError(f"{where}={value!r} must be an integer")
        return out
    if origin is str:
        return str(value)
    return value


def merge_config(cfg, updates: dict[str, Any], where: str = ""):
    """cfg (a config dataclass) with the fields of a nested dict replaced. A `model` given as a string is
    a DiT preset name; a dict with a 'preset' key starts from that preset. An optional nested config
    (`sparsity`) set while None starts from its defaults; null switches it off."""
    hints = typing.get_type_hints(type(cfg))
    kw = {}
    for key, value in updates.items():
        name = f"{where}{key}"
        if key not in hints:
            raise ValueError(f"unknown config field {name!r}; accepted: {sorted(hints)}")
        current = getattr(cfg, key)
        if current is None and isinstance(value, dict):  # an optional nested config, off so far: its defaults
            current = next(t for t in typing.get_args(hints[key]) if dataclasses.is_dataclass(t))()
        if value is None and type(None) in typing.get_args(hints[key]):
            kw[key] = None
            continue
        if isinstance(current, DiTConfig) and isinstance(value, str):
            value = {"preset": value}
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a mapping of fields, got {value!r}")
            value = dict(value)
            if isinstance(current, DiTConfig) and "preset" in value:
                current = preset(value.pop("preset"))
            kw[key] = merge_config(current, value, f"{name}.")
        else:
            kw[key] = _coerce(hints[key], value, name)
    return dataclasses.replace(cfg, **kw)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are JSON when they parse as JSON, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like field.sub=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override of {p!r}")
        node[leaf] = value
    return out


def load_run_config(presets: dict[str, Any], path: str | Path | None = None, overrides: list[str] = ()):
    """A training/distillation config: a preset chosen by `preset` (an override, else the file's key, else
    the first preset), the file's other keys and then `overrides` (['optimizer.learning_rate=1e-4', ...])
    merged over it. Files are JSON or YAML."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of config fields")
    extra = parse_overrides(list(overrides))
    name = extra.pop("preset", data.pop("preset", next(iter(presets))))
    data.pop("preset", None)
    return merge_config(merge_config(preset(name, presets), data), extra)
