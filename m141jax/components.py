"""The models generation needs, and the checkpoint folder they are read from.

`m141jax generate --checkpoints DIR` reads one folder per component (LAYOUT): Orbax checkpoints made
by `tools/convert_torch_weights.py` plus the two tokenizer folders of the encoders. Every folder is
checked to exist and to hold the right component before any weights are read; each set of
parameters is checked against its config; the components are checked to fit together.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from m141jax import checkpoint, config, parallel
from m141jax.compress import box, io
from m141jax.checkpoint import CheckpointError
from m141jax.encoders import Encoders
from m141jax.models import dit as dit_model
from m141jax.models import vae as vae_model
from m141jax.prompts import MAX_LENGTH

# folder -> (component of its m141jax checkpoint, or None for a tokenizer folder; what it is)
LAYOUT = {
    "dit": ("dit", "the image-to-video DiT (magic141-i2v-13b architecture)"),
    "t2i": ("dit", "the text-to-image DiT (hunyuan-t2v-13b architecture), needed when no image is given"),
    "vae": ("vae", "the causal 3D VAE"),
    "vlm": ("vlm", "the LLaVA VLM: image tokens, and its language model encodes the prompts"),
    "clip": ("clip", "the CLIP-L text encoder"),
    "tokenizer": (None, "the LLaVA / Llama-3 tokenizer folder (with the image processor's preprocessor_config.json)"),
    "clip_tokenizer": (None, "the CLIP tokenizer folder"),
}


@dataclasses.dataclass(frozen=True)
class Component:
    """One loaded model: its config dataclass and its parameter pytree."""

    cfg: Any
    params: Any
    mesh: Any = None  # the jax.sharding.Mesh the parameters are placed on (None: one device)


@dataclasses.dataclass(frozen=True)
class Models:
    """The I2V DiT, the VAE, the encoder bundle (`m141jax.encoders.Encoders`), and the T2I DiT (or None)."""

    dit: Component
    vae: Component
    encoders: Any
    t2i: Component | None = None


def locate(root: str | Path, name: str) -> Path:
    """root/name, checked to exist and (for checkpoints) to hold its component; the error names both."""
    component, what = LAYOUT[name]
    path = Path(root) / name
    if not path.is_dir():
        how = (f"make it with tools/convert_torch_weights.py {component} --src SRC --dst {path}" if component else
               "save it with transformers' save_pretrained")
        raise CheckpointError(f"{path} is missing: {what}; {how}")
    if component is not None:
        checkpoint.read_meta(path, component)
    return path


def _model_module(component: str):
    return {"dit": dit_model, "vae": vae_model}[component]


def read_config(root: str | Path, name: str, dtype: str = "bf16"):
    """The config stored in root/name (checked to hold its component), with runtime dtypes `dtype`."""
    return checkpoint.read_config(locate(root, name), (LAYOUT[name][0],), dtype)[1]


def load_component(root: str | Path, name: str, dtype: str = "bf16", mesh=None,
                   sequence_parallel: str = "auto") -> Component:
    """The DiT or VAE in root/name, in `dtype`, its stored parameter shapes checked against its config;
    a DiT with a `mesh` is restored straight onto it (each device reads its own shards). A DiT written by
    `m141jax quantize` / `m141jax sparsify` is kept compressed (its layers rebuild dense kernels as they
    run), so it is read at its compressed size; on a mesh its compressed arrays are split along their
    output channels."""
    component, what = LAYOUT[name]
    cfg, path = read_config(root, name, dtype), Path(root) / name
    compressed = bool(checkpoint.read_meta(path, component).get("compressed"))
    shardings = None
    if mesh is not None:
        if component != "dit":
            raise ValueError(f"{name}/ cannot be placed on a mesh; only the DiTs are sharded")
        cfg, shardings = parallel.dit_on_mesh(cfg, mesh, sequence_parallel)
    params = None
    if compressed:
        dense = {parallel.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings or {})}

        def place(key, a, boxed):  # compressed arrays split along their output channels, the rest as dense
            return dense.get(key) if not boxed and key in dense else parallel.storage_sharding(a.shape, mesh)

        params = io.load(path, config.dtype_of(dtype), component, None if mesh is None else place)[1]
    shapes = lambda t: {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(t)}
    stored = jax.eval_shape(box.densify_traced, params) if compressed else checkpoint.abstract_tree(path)
    want, have = shapes(_model_module(component).abstract_params(cfg)), shapes(stored)
    if want != have:
        bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise CheckpointError(f"{path} ({what}): its parameters do not match its config at {len(bad)} entries, "
                              f"e.g. {bad[0]}: stored {have.get(bad[0])}, config {want.get(bad[0])}")
    if not compressed:
        params = checkpoint.load_params(path, dtype=config.dtype_of(dtype), shardings=shardings)
    return Component(cfg, params, mesh)


def check_configs(dit, vae, vlm, clip, t2i=None) -> None:
    """One-line errors for components that cannot work together (configs of dit/, vae/, vlm/, clip/, t2i/)."""
    if not dit.image_conditioned:
        raise CheckpointError(f"dit/ must be {LAYOUT['dit'][1]}: in_channels {2 * dit.out_channels + 1} "
                              f"(noise, reference, mask), got {dit.in_channels}")
    if vae.latent_channels != dit.out_channels:
        raise CheckpointError(f"vae/ has {vae.latent_channels} latent channels, dit/ needs {dit.out_channels}")
    for name, cfg in [("dit", dit)] + ([("t2i", t2i)] if t2i is not None else []):
        if (cfg.text_dim, cfg.pooled_dim) != (vlm.text.hidden_size, clip.hidden_size):
            raise CheckpointError(f"{name}/ takes text states of {cfg.text_dim} and pooled states of {cfg.pooled_dim}, "
                                  f"the encoders give {vlm.text.hidden_size} (vlm/) and {clip.hidden_size} (clip/)")
    if t2i is not None and (t2i.image_conditioned or not t2i.guidance_embed or t2i.out_channels != dit.out_channels):
        raise CheckpointError(f"t2i/ must be {LAYOUT['t2i'][1]}: in_channels {dit.out_channels} with a guidance "
                              f"embedding, got in_channels {t2i.in_channels}, guidance_embed {t2i.guidance_embed}")


def load_models(root: str | Path, with_t2i: bool, dtype: str = "bf16", mesh=None,
                sequence_parallel: str = "auto", max_length: int = MAX_LENGTH) -> Models:
    """Everything in the checkpoint folder `root` that generation needs (t2i/ only `with_t2i`): every
    folder and config is checked before any weights are read. With a `mesh` the DiTs and the encoders
    are sharded on it (the VAE, 0.5 GB, stays on one device). max_length: the text encoder's prompt
    window (tokens after the template)."""
    names = [n for n in LAYOUT if n != "t2i" or with_t2i]
    for name in names:
        locate(root, name)
    check_configs(*(read_config(root, n) for n in ("dit", "vae", "vlm", "clip")),
                  t2i=read_config(root, "t2i") if with_t2i else None)
    root = Path(root)
    encoders = Encoders.load(root / "vlm", root / "clip", root / "tokenizer", root / "clip_tokenizer", dtype,
                             max_length, mesh=mesh)
    dit = lambda name: load_component(root, name, dtype, mesh, sequence_parallel)  # noqa: E731
    return Models(dit=dit("dit"), vae=load_component(root, "vae", dtype), encoders=encoders,
                  t2i=dit("t2i") if with_t2i else None)
