"""VAE key map: the release's AutoencoderKLCausal3D names and diffusers' AutoencoderKLHunyuanVideo
names are the same (release.md D.6), and the JAX module names mirror them, so every JAX leaf maps to one
PyTorch key mechanically: `down_blocks_0/resnets_1/conv1/conv/kernel` <- `down_blocks.0.resnets.1.conv1.conv.weight`.

Conv3d weights [out, in, kt, kh, kw] become kernels [kt, kh, kw, in, out]; Linear weights [out, in]
become [in, out]; GroupNorm weight/bias become scale/bias. The release's `vae/pytorch_model.pt` stores
its keys under `vae.`; as the release's loader does, only those keys are read when any key has it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np

from m141jax.config import VAE_PRESETS, VAEConfig, load_json, preset
from m141jax.convert.plan import Recipe, check, execute, recipe
from m141jax.convert.sources import open_source
from m141jax.models.vae import abstract_params

# ---- the release's / diffusers' VAE config.json -> VAEConfig

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


_INDEXED = re.compile(r"^(.*)_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch name of a JAX parameter path."""
    parts = [_INDEXED.sub(r"\1.\2", p) for p in path[:-1]]
    return ".".join(parts + [_LEAF[path[-1]]])


def _conv(w):  # [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
    return w.transpose(2, 3, 4, 1, 0)


def _linear(w):
    return w.T


def _ident(x):
    return x


def _torch_shape(shape: tuple[int, ...]) -> tuple[tuple[int, ...], object]:
    """(PyTorch shape, transform to the JAX layout) for a JAX leaf shape."""
    if len(shape) == 5:
        return (shape[4], shape[3], *shape[:3]), _conv
    if len(shape) == 2:
        return (shape[1], shape[0]), _linear
    return tuple(shape), _ident


def plan(cfg: VAEConfig, prefix: str = "") -> list[Recipe]:
    """One recipe per JAX leaf of the model built from cfg, reading `prefix + torch_key(path)`."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
        keys = tuple(k.key for k in path)
        shape, fn = _torch_shape(tuple(leaf.shape))
        out.append(recipe(keys, None, fn, (prefix + torch_key(keys), shape)))
    return out


def resolve_config(config: str | None, folder_config: dict | None) -> VAEConfig:
    """--config as a JSON file (release or diffusers config.json) or a preset name; else the source
    folder's config.json; else the released HunyuanVideo VAE."""
    from pathlib import Path

    if config is not None:
        if Path(config).is_file():
            return vae_config_from_dict(load_json(config))
        if config in VAE_PRESETS:
            return preset(config, VAE_PRESETS)
        raise ValueError(f"--config {config!r} is neither a JSON file nor a preset; presets: {sorted(VAE_PRESETS)}")
    if folder_config is not None:
        return vae_config_from_dict(folder_config)
    return preset("hunyuan-vae", VAE_PRESETS)


def convert(src: str, config: str | None, dtype, progress: bool = True):
    """(VAEConfig, numpy parameter tree) from a PyTorch VAE checkpoint."""
    import dataclasses

    source, folder_config = open_source(src, strip=("vae.", "model.", "module."))
    cfg = resolve_config(config, folder_config)
    prefix = "vae." if any(k.startswith("vae.") for k in source.keys()) else ""
    print(f"vae: {len(source.keys())} tensors"
          + (f", prefix {source.prefix!r} stripped" if source.prefix else "")
          + (", reading the 'vae.' keys only" if prefix else ""), flush=True)
    recipes = plan(cfg, prefix)
    check(recipes, source, ignore=lambda k: not k.startswith(prefix), what="VAE checkpoint")
    params = execute(recipes, source, abstract_params(cfg), dtype, progress)
    return dataclasses.replace(cfg, param_dtype="bf16" if dtype != np.float32 else "fp32"), params
