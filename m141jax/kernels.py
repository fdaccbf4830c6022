"""Dense-layer kernels as matrices, and compressed kernels that a layer reads as dense ones.

Quantization (`m141jax.quant`) and N:M sparsity (`m141jax.train.sparsity`) both work on the kernels of
the models' dense layers, seen as matrices [*lead, K, N]: `lead` stacked-layer axes ('layers'), K the
contracted input axes flattened, N the output axes flattened. This module holds what they share:

- `select(params, axes, include, exclude)`: which parameters are kernels to compress (regular
  expressions searched in the '/'-joined parameter path), each with its `Layout` read from the
  parameter's logical axis names;
- `pack_bits` / `unpack_bits`: low-bit codes (int4 values, N:M indices) packed into bytes along K;
- `Box`: the base of a compressed kernel stored in a parameter tree in place of the dense kernel. It
  is a flax `AxisMetadata`, so when a layer reads the parameter, flax unboxes it: the dense kernel is
  rebuilt there, inside the jitted forward, one layer at a time (inside `nn.scan` too). The models
  need no change; `densify` rebuilds a whole tree at once.
- `save` / `load`: Orbax checkpoints of trees holding boxes (the arrays in Orbax, each box's format
  in the checkpoint's metadata).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import PartitionSpec

from m141jax import checkpoint

LAYERS = "layers"  # the logical name of the stacked-layer axis (nn.scan / models.stack)
KERNEL = r"(^|/)kernel$"


def path_str(path) -> str:
    """'double_blocks/img_attn/qkv/kernel' for a pytree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A dense kernel [*lead, *in, *out]: `lead` stacked-layer axes, then `n_in` contracted input axes.

    `shape` is the kernel's shape without the leading axes (it does not change when `nn.scan` slices them).
    """

    lead: int
    n_in: int
    shape: tuple[int, ...]

    @property
    def k(self) -> int:
        return math.prod(self.shape[:self.n_in])

    @property
    def n(self) -> int:
        return math.prod(self.shape[self.n_in:])


def layout(shape, names) -> Layout:
    """The layout of a kernel from its logical axis names (input axes first, then output axes, as
    `models.layers.dense` names them). Only attention output projections contract two axes
    ('heads', 'kv'); every other dense layer contracts one."""
    names = tuple(names)
    lead = 0
    while lead < len(names) and names[lead] == LAYERS:
        lead += 1
    n_in = 2 if names[lead:lead + 2] == ("heads", "kv") else 1
    return Layout(lead, n_in, tuple(shape[lead:]))


def as_matrix(w, lay: Layout):
    """The kernel as [*lead, K, N]."""
    return w.reshape(*w.shape[:w.ndim - len(lay.shape)], lay.k, lay.n)


def from_matrix(x, shape: tuple[int, ...]):
    """[*lead, K, N] back to a kernel [*lead, *shape] (`Layout.shape`)."""
    return x.reshape(*x.shape[:-2], *shape)


def select(params, axes, include: Sequence[str] = (KERNEL,), exclude: Sequence[str] = ()) -> dict[str, Layout]:
    """{path: Layout} of the dense kernels among `params` (arrays or ShapeDtypeStructs) whose path matches
    an `include` pattern and no `exclude` pattern. `axes`: the matching tree of logical axis names
    (`param_logical_axes(cfg)` of the model)."""
    names = {path_str(p): tuple(a) for p, a in
             jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda a: isinstance(a, PartitionSpec))[0]}
    chosen = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = path_str(p)
        if not any(re.search(r, key) for r in include) or any(re.search(r, key) for r in exclude):
            continue
        if key not in names:
            raise ValueError(f"parameter {key} has no logical axis names: axes do not match the parameters")
        lay = layout(np.shape(leaf), names[key])
        if lay.n_in >= len(lay.shape):
            raise ValueError(f"{key} of shape {np.shape(leaf)} (axes {names[key]}) is not a dense kernel: "
                             f"exclude it or narrow the include patterns")
        chosen[key] = lay
    if not chosen:
        raise ValueError(f"no parameter matches include {list(include)} outside exclude {list(exclude)}")
    return chosen


def map_selected(fn: Callable, params, chosen: dict[str, Layout]):
    """params with each chosen leaf x replaced by fn(x, layout, path)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(x, chosen[k], k) if (k := path_str(p)) in chosen else x, params)


# ------------------------------------------------------------------------------------ bit packing

def code_bits(levels: int) -> int:
    """Bits per code for `levels` distinct codes, rounded up to 1, 2, 4 or 8 so codes never straddle bytes."""
    need = max(1, math.ceil(math.log2(levels)))
    if need > 8:
        raise ValueError(f"{levels} codes do not fit in a byte")
    return next(b for b in (1, 2, 4, 8) if b >= need)


def pack_bits(codes, bits: int):
    """Codes [..., K, N] (integers in [0, 2**bits)) packed along K into uint8 [..., K·bits/8, N]; the
    first code of each byte in its lowest bits."""
    per = 8 // bits
    k = codes.shape[-2]
    if k % per:
        raise ValueError(f"cannot pack {k} codes of {bits} bits into whole bytes")
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-2], k // per, per, codes.shape[-1])
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[:, None]
    return jnp.sum(c << shifts, axis=-2, dtype=jnp.uint8)


def unpack_bits(packed, bits: int):
    """The inverse of `pack_bits`: uint8 codes [..., K, N]."""
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[:, None]
    c = (packed[..., :, None, :] >> shifts) & jnp.uint8((1 << bits) - 1)
    return c.reshape(*packed.shape[:-2], packed.shape[-2] * per, packed.shape[-1])


# ------------------------------------------------------------------------------ compressed kernels

BOX_TYPES: dict[str, type] = {}


def static():
    """A box field that is part of the format (not an array): kept out of the pytree's leaves."""
    return flax.struct.field(pytree_node=False)


class Box(flax.struct.PyTreeNode, meta.AxisMetadata):
    """A compressed dense kernel in a parameter tree. Subclasses define `unbox()` (the dense kernel, with the
    leading axes of their arrays) and `astype(dtype)` (the same box rebuilding a kernel of `dtype`).

    The arrays are pytree children (sliced by `nn.scan` and `models.stack` along the leading axes like
    any parameter); the format (shapes without leading axes, dtypes, N:M...) is static.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        BOX_TYPES[cls.__name__] = cls

    def replace_boxed(self, val):
        raise TypeError(f"{type(self).__name__} parameters are read-only: densify the tree to train it")

    def add_axis(self, index, params):
        return self

    def remove_axis(self, index, params):
        return self


def is_box(x) -> bool:
    return isinstance(x, Box)


def densify(tree):
    """The tree with every compressed kernel rebuilt as a dense array (in one jitted program per kernel)."""
    rebuild = jax.jit(lambda b: b.unbox())
    return jax.tree_util.tree_map(lambda x: rebuild(x) if is_box(x) else x, tree, is_leaf=is_box)


def nbytes(tree) -> int:
    """Bytes of every array in the tree (jax/numpy arrays or ShapeDtypeStructs), boxes included."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


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


def add_rewrite_arguments(parser, src_help: str, dst_help: str) -> None:
    """--src, --dst and --overwrite of a command that runs `rewrite`."""
    parser.add_argument("--src", required=True, help=src_help)
    parser.add_argument("--dst", required=True, help=dst_help)
    parser.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")


def load(path: str | Path, dtype=None, component: str | None = None):
    """(metadata, tree) of a checkpoint written by `save` (or a plain one): the compressed kernels as
    boxes. `dtype`: floating-point parameters and the kernels' dense dtype become `dtype`; integer codes
    and quantization scales keep theirs."""
    from m141jax import quant  # noqa: F401  (registers the box types)
    from m141jax.train import sparsity  # noqa: F401

    info = checkpoint.read_meta(path, component)
    formats = info.get("compressed", {})
    tree = checkpoint.load_params(path)
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
