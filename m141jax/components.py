"""The models generation needs, and the checkpoint folder they are read from.

`m141jax generate --checkpoints DIR` reads one folder per component (LAYOUT): Orbax checkpoints made
by `tools/convert_torch_weights.py` plus the two tokenizer folders of the encoders. Every folder is
checked to exist and to hold the right component before any weights are read; each set of
parameters is checked against its config; the components are checked to fit together.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from m141jax import checkpoint
from m141jax.checkpoint import CheckpointError
from m141jax.compress import quant
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


def loaders(root: str | Path, with_t2i: bool, dtype: str = "bf16", mesh=None, sequence_parallel: str = "auto",
            max_length: int = MAX_LENGTH) -> dict:
    """{encoders, dit, vae (, t2i)}: a function each that loads that component (see `load_models`), after
    every folder and config has been checked."""
    names = [n for n in LAYOUT if n != "t2i" or with_t2i]
    for name in names:
        locate(root, name)
    check_configs(*(read_config(root, n) for n in ("dit", "vae", "vlm", "clip")),
                  t2i=read_config(root, "t2i") if with_t2i else None)
    root = Path(root)
    dit = lambda name: lambda: load_component(root, name, dtype, mesh, sequence_parallel)  # noqa: E731
    out = dict(encoders=lambda: Encoders.load(root / "vlm", root / "clip", root / "tokenizer", root / "clip_tokenizer",
                                              dtype, max_length, mesh=mesh),
               dit=dit("dit"), vae=lambda: load_component(root, "vae", dtype))
    if with_t2i:
        out["t2i"] = dit("t2i")
    return out


def load_models(root: str | Path, with_t2i: bool, dtype: str = "bf16", mesh=None,
                sequence_parallel: str = "auto", max_length: int = MAX_LENGTH) -> Models:
    """Everything in the checkpoint folder `root` that generation needs (t2i/ only `with_t2i`): every
    folder and config is checked before any weights are read. With a `mesh` the DiTs and the encoders
    are sharded on it (the VAE, 0.5 GB, stays on one device). max_length: the text encoder's prompt
    window (tokens after the template)."""
    return Models(**{name: load() for name, load in loaders(root, with_t2i, dtype, mesh, sequence_parallel,
                                                           max_length).items()})


def _host_copy(obj):
    """(obj with numpy copies of its params, the params' tree structure, each leaf's device sharding)."""
    leaves, treedef = jax.tree.flatten(obj.params)
    shardings = [a.sharding if isinstance(a, jax.Array) else None for a in leaves]
    host = [np.asarray(jax.device_get(a)) if isinstance(a, jax.Array) else a for a in leaves]
    return dataclasses.replace(obj, params=jax.tree.unflatten(treedef, host)), treedef, shardings


class StagedModels:
    """`--low-memory`: staged residency. The weights of every component are kept in host memory (numpy
    copies of the parameters, compressed ones as compressed); `stage(name)` puts one component's
    weights on the device (where they were: same shardings), dropping the previous one, so only the
    running stage's weights are on the device: the encoders, then the T2I DiT, then the I2V DiT, then
    the VAE. Outputs equal the resident path's: the same arrays and programs. The attributes `encoders`,
    `t2i`, `dit`, `vae` are the host copies (their configs are what the pipeline reads outside stages)."""

    NAMES = ("encoders", "t2i", "dit", "vae")

    def __init__(self, models: Models | dict):
        """From loaded models, or from {name: function that loads it} (`loaders`): then the components are
        loaded one after another, each moved to host memory before the next is read, so the device never
        holds more than one."""
        self._staged = {}
        for name in self.NAMES:
            obj = models.get(name) if isinstance(models, dict) else getattr(models, name)
            obj = obj() if callable(obj) else obj
            self._staged[name] = None if obj is None else _host_copy(obj)
            del obj
        self.current: str | None = None
        self._device = None
        self.swaps = 0
        self.swap_seconds = 0.0

    def __getattr__(self, name):
        if name in StagedModels.NAMES:
            staged = self._staged[name]
            return None if staged is None else staged[0]
        raise AttributeError(name)

    def stage(self, name: str):
        """Component `name` with its weights on the device; the previous stage's weights are released."""
        if name == self.current:
            return self._device
        if self._staged[name] is None:
            raise ValueError(f"no {name} loaded")
        self._device = None  # drop the previous stage's device arrays before placing the next
        start = time.perf_counter()
        host, treedef, shardings = self._staged[name]
        leaves = jax.tree.leaves(host.params)
        placed = [a if s is None else jax.device_put(a, s) for a, s in zip(leaves, shardings)]
        self._device = dataclasses.replace(host, params=jax.block_until_ready(jax.tree.unflatten(treedef, placed)))
        self.current = name
        self.swaps += 1
        self.swap_seconds += time.perf_counter() - start
        return self._device

    def summary(self) -> str:
        return (f"low memory: {self.swaps} stage swap(s) host -> device, {self.swap_seconds:.2f} s "
                f"({self.swap_seconds / max(self.swaps, 1):.2f} s each)")

    def release(self) -> None:
        """No weights on the device."""
        self._device, self.current = None, None


def load_staged(root: str | Path, with_t2i: bool, dtype: str = "bf16", mesh=None, sequence_parallel: str = "auto",
                max_length: int = MAX_LENGTH, quantize: str | None = None) -> StagedModels:
    """`load_models` for `--low-memory`: each component is read (and quantized, `quant.quantize_one`) and
    moved to host memory before the next one is read, so at no time does the device hold two of them."""
    found = loaders(root, with_t2i, dtype, mesh, sequence_parallel, max_length)
    if quantize:
        found = {name: (lambda name=name, load=load: quant.quantize_one(name, load(), quantize))
                 for name, load in found.items()}
    return StagedModels(found)
