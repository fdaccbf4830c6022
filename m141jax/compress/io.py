"""Orbax checkpoints of parameter trees holding compressed kernels (`m141jax.checkpoint` layout).

The arrays of each box are stored as a dict in the Orbax tree, its format (type and static fields) under
"compressed" in the checkpoint's metadata; `load` rebuilds the boxes (`box.BOX_TYPES`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from m141jax import checkpoint
from m141jax.compress.box import BOX_TYPES, Box, is_box, nbytes
from m141jax.parallel import path_str


def _box_state(box: Box) -> tuple[dict, dict]:
    """(arrays, format) of a box: its array fields (nested boxes as dicts) and its static fields + type."""
    arrays, fmt = {}, {"type": type(box).__name__}
    for f in dataclasses.fields(box):
        v = getattr(box, f.name)
        if not f.metadata.get("pytree_node", True):
            fmt[f.name] = v
        elif is_box(v):
            arrays[f.name], fmt[f.name] = _box_state(v)
        elif v is not None:
            arrays[f.name] = v
    return arrays, fmt


def _box_from_state(arrays: dict, fmt: dict) -> Box:
    cls = BOX_TYPES[fmt["type"]]
    kw = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("pytree_node", True):
            kw[f.name] = tuple(fmt[f.name]) if isinstance(fmt[f.name], list) else fmt[f.name]
        elif isinstance(fmt.get(f.name), dict):
            kw[f.name] = _box_from_state(arrays[f.name], fmt[f.name])
        else:
            kw[f.name] = arrays.get(f.name)
    return cls(**kw)


def save(dst: str | Path, component: str, config: dict[str, Any], tree, overwrite: bool = False) -> Path:
    """An Orbax checkpoint (`m141jax.checkpoint` layout) of a parameter tree holding compressed kernels:
    each box is stored as a dict of its arrays, its format under "compressed" in the metadata."""
    formats = {}

    def unpack(p, x):
        if not is_box(x):
            return x
        arrays, formats[path_str(p)] = _box_state(x)
        return arrays

    arrays = jax.tree_util.tree_map_with_path(unpack, tree, is_leaf=is_box)
    return checkpoint.save(dst, component, config, arrays, overwrite=overwrite, extra={"compressed": formats})


def rewrite(src: str | Path, dst: str | Path, compress: Callable[[str, Any, Any], Any], components: Sequence[str],
            overwrite: bool = False) -> str:
    """Write compress(component, config, params) of checkpoint src (of one of `components`) to dst with
    `save`; returns 'X GB -> Y GB'. dst is checked before any weights are read."""
    component, cfg = checkpoint.read_config(src, tuple(components))
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    params = checkpoint.load_params(src)
    before = nbytes(params)
    tree = compress(component, cfg, params)
    save(dst, component, checkpoint.read_meta(src)["config"], tree, overwrite=overwrite)
    return f"{before / 1e9:.3f} GB -> {nbytes(tree) / 1e9:.3f} GB"


def load(path: str | Path, dtype=None, component: str | None = None,
         place: Callable[[str, Any, bool], Any] | None = None):
    """(metadata, tree) of a checkpoint written by `save` (or a plain one): the compressed kernels as
    boxes. `dtype`: floating-point parameters and the kernels' dense dtype become `dtype`; integer codes
    and quantization scales keep theirs. `place(path, stored array shape/dtype, inside a box)`: the
    sharding each stored array is restored onto (default: the first device)."""
    info = checkpoint.read_meta(path, component)
    formats = info.get("compressed", {})
    shardings = None
    if place is not None:
        boxed = lambda key: any(key.startswith(k + "/") for k in formats)  # noqa: E731
        shardings = jax.tree_util.tree_map_with_path(lambda p, a: place(path_str(p), a, boxed(path_str(p))),
                                                     checkpoint.abstract_tree(path))
    tree = checkpoint.load_params(path, shardings=shardings)
    missing = set(formats)

    def rebuild(p, x):
        key = path_str(p)
        if key in formats:
            missing.discard(key)
            x = _box_from_state(x, formats[key])
            return x.astype(dtype) if dtype is not None else x
        return x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x

    is_stored_box = lambda p, x: isinstance(x, dict) and path_str(p) in formats  # noqa: E731
    tree = _map_with_path_until(rebuild, tree, is_stored_box)
    if missing:
        raise checkpoint.CheckpointError(f"{path}: compressed kernels {sorted(missing)[:3]} are missing from the arrays")
    return info, tree


def _map_with_path_until(fn, tree, stop, path=()):
    """tree_map_with_path over nested dicts that stops descending where stop(path, node) holds."""
    if isinstance(tree, dict) and not stop(path, tree):
        return {k: _map_with_path_until(fn, v, stop, (*path, jax.tree_util.DictKey(k))) for k, v in tree.items()}
    return fn(path, tree)
