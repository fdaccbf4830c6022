"""Frozen model configuration dataclasses and named presets.

Every component has one frozen dataclass. Presets are plain instances; files under `configs/` and
command-line overrides only select a preset and replace fields (`dataclasses.replace`). The training
and distillation configs live in `m141jax.train.config`; the PyTorch release's constructor-argument
names and diffusers' / Hugging Face `config.json` names are mapped once, beside their converters
(`m141jax.convert.dit`, `.vae`, `.hf`).
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
    attention: str = "auto"  # auto | xla | blockwise | splash | cudnn (models/attention.py); auto: splash on TPU
    attention_block: int | None = None  # block length of blockwise / splash (None: per platform, per TPU generation)
    remat: str = "none"  # none | full | dots | attention | offload (models/dit.py _REMAT)
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
        if n < 3 or self.spatial_compression_ratio not in [2 ** k for k in range(1, n)]:
            raise ValueError(f"spatial_compression_ratio {self.spatial_compression_ratio} must be 2**k with "
                             f"1 <= k <= blocks-1 (space is downsampled in the first k blocks) and at least 3 "
                             f"blocks; got {n} blocks")
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



VAE_PRESETS: dict[str, VAEConfig] = {
    "hunyuan-vae": VAEConfig(),
    "small-vae": VAEConfig(block_out_channels=(32, 64, 128, 128), norm_num_groups=8),
    "tiny-vae": VAEConfig(block_out_channels=(8, 16, 16, 16), norm_num_groups=4),
}

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
