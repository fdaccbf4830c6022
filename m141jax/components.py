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

from m141jax import checkpoint
from m141jax.checkpoint import CheckpointError
from m141jax.encoders import Encoders
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


def read_config(root: str | Path, name: str, dtype: str = "bf16"):
    """The config stored in root/name (checked to hold its component), with runtime dtypes `dtype`."""
    return checkpoint.read_config(locate(root, name), (LAYOUT[name][0],), dtype)[1]


def load_component(root: str | Path, name: str, dtype: str = "bf16", mesh=None,
                   sequence_parallel: str = "auto") -> Component:
    """The DiT or VAE in root/name by the checked loader (`checkpoint.load`), in `dtype`; a DiT with a
    `mesh` is restored straight onto it. A DiT written by `m141jax quantize` / `m141jax sparsify` is kept
    compressed (its layers rebuild dense kernels as they run), so it is read at its compressed size."""
    component, what = LAYOUT[name]
    if mesh is not None and component != "dit":
        raise ValueError(f"{name}/ cannot be placed on a mesh; only the DiTs are sharded")
    _, cfg, params = checkpoint.load(locate(root, name), (component,), dtype, mesh=mesh,
                                     sequence_parallel=sequence_parallel, what=what)
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
