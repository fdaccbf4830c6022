"""How parameter trees holding compressed kernels are stored: each box as a dict of its arrays, its
format (type and static fields) kept apart, e.g. under "compressed" in a checkpoint's metadata.

`pack` splits a tree into (arrays, formats); `unpack` rebuilds the boxes (`box.BOX_TYPES`). The files
themselves are written and read by `m141jax.checkpoint`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from m141jax.compress.box import BOX_TYPES, Box, is_box
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


def pack(tree) -> tuple[dict, dict]:
    """(arrays, formats) of a parameter tree: every box replaced by the dict of its arrays; formats maps
    the box's '/'-joined path to its format."""
    formats = {}

    def unpack_box(p, x):
        if not is_box(x):
            return x
        arrays, formats[path_str(p)] = _box_state(x)
        return arrays

    return jax.tree_util.tree_map_with_path(unpack_box, tree, is_leaf=is_box), formats


def boxed_paths(formats: dict):
    """A predicate on '/'-joined array paths: does the array belong to a stored box?"""
    return lambda key: any(key.startswith(k + "/") for k in formats)


def unpack(tree, formats: dict, dtype=None):
    """The inverse of `pack`. `dtype`: floating-point parameters and the kernels' dense dtype become
    `dtype`; integer codes and quantization scales keep theirs."""
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
        raise ValueError(f"compressed kernels {sorted(missing)[:3]} are missing from the arrays")
    return tree


def _map_with_path_until(fn, tree, stop, path=()):
    """tree_map_with_path over nested dicts that stops descending where stop(path, node) holds."""
    if isinstance(tree, dict) and not stop(path, tree):
        return {k: _map_with_path_until(fn, v, stop, (*path, jax.tree_util.DictKey(k))) for k, v in tree.items()}
    return fn(path, tree)
