"""VAE key map: the release's AutoencoderKLCausal3D names and diffusers' AutoencoderKLHunyuanVideo
names are the same (release.md D.6), and the JAX module names mirror them, so every JAX leaf maps to one
PyTorch key mechanically: `down_blocks_0/resnets_1/conv1/conv/kernel` <- `down_blocks.0.resnets.1.conv1.conv.weight`.

Conv3d weights [out, in, kt, kh, kw] become kernels [kt, kh, kw, in, out]; Linear weights [out, in]
become [in, out]; GroupNorm weight/bias become scale/bias. The release's `vae/pytorch_model.pt` stores
its keys under `vae.`; as the release's loader does, only those keys are read when any key has it.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from m141jax.config import VAEConfig
from m141jax.convert.plan import Recipe, recipe

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
    from m141jax.models.vae import abstract_params

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

    from m141jax.config import VAE_PRESETS, load_json, preset, vae_config_from_dict

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

    from m141jax.convert.plan import check, execute
    from m141jax.convert.sources import open_source
    from m141jax.models.vae import abstract_params

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
