"""A conversion plan: for every JAX parameter (and layer of a scanned stack), which PyTorch tensors it
is made from and how. Plans are checked completely (missing, unexpected and mis-shaped keys) before
any data is read, then executed one tensor at a time into preallocated output buffers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from m141jax.convert.sources import TensorSource

Path_ = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One output slice: params[target][layer] = fn(*source tensors). layer None: the whole leaf."""

    target: Path_
    layer: int | None
    sources: tuple[tuple[str, tuple[int, ...]], ...]  # (PyTorch key, expected shape)
    fn: Callable[..., np.ndarray]


class PlanError(ValueError):
    """The source does not match the plan; the message lists every problem by name."""


def recipe(target: Sequence[str], layer: int | None, fn: Callable, *sources: tuple[str, Sequence[int]]) -> Recipe:
    return Recipe(tuple(target), layer, tuple((k, tuple(s)) for k, s in sources), fn)


def expected_keys(plan: Sequence[Recipe]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for r in plan:
        for k, s in r.sources:
            out[k] = s
    return out


def check(plan: Sequence[Recipe], src: TensorSource, ignore: Callable[[str], bool] = lambda k: False,
          what: str = "checkpoint") -> None:
    """Raise PlanError listing missing keys, unexpected keys and shape mismatches (expected vs found)."""
    want = expected_keys(plan)
    have = {k for k in src.keys() if not ignore(k)}
    missing = sorted(set(want) - have)
    unexpected = sorted(have - set(want))
    bad = sorted(f"{k}: expected {list(want[k])}, found {list(src.shape(k))}"
                 for k in set(want) & have if tuple(src.shape(k)) != want[k])
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad)):
        if items:
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
    if problems:
        raise PlanError(f"the {what} does not match the model configuration"
                        + (f" (prefix {src.prefix!r} stripped)" if src.prefix else "") + ":\n" + "\n".join(problems))


def _set(tree: dict, path: Path_, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data is `align`-byte aligned: jax.device_put onto the CPU then aliases
    it instead of copying, so saving a converted checkpoint needs no second copy of the weights."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def execute(plan: Sequence[Recipe], src: TensorSource, abstract: dict, dtype, progress: bool = True) -> dict:
    """Build the parameter tree from `src`: jax arrays of `dtype` on the host CPU device.

    Recipes run leaf by leaf into aligned buffers that become jax arrays without a copy, so peak
    memory is the output plus a few source tensors. Output shapes come from `abstract` (the
    model's ShapeDtypeStruct tree) and every slice is checked against it, so a wrong transform can
    never write a silently mis-shaped checkpoint.
    """
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    by_leaf: dict[Path_, list[Recipe]] = {}
    for r in plan:
        by_leaf.setdefault(r.target, []).append(r)
    if set(by_leaf) != set(flat):
        raise PlanError(f"internal: plan misses {sorted(set(flat) - set(by_leaf))}, "
                        f"has extra {sorted(set(by_leaf) - set(flat))}")
    cpu = jax.devices("cpu")[0]
    out: dict = {}
    bar = tqdm(total=len(plan), desc="converting", unit="tensor", disable=not progress)
    for target, recipes in by_leaf.items():
        shape = flat[target].shape
        layers = [r.layer for r in recipes]
        if layers != [None] and sorted(layers) != list(range(shape[0])):
            raise PlanError(f"internal: {'/'.join(target)} gets layers {layers}")
        buf = aligned_empty(shape, dtype)
        for r in recipes:
            value = np.asarray(r.fn(*(src.get(k) for k, _ in r.sources)))
            want = shape if r.layer is None else shape[1:]
            if value.shape != tuple(want):
                raise PlanError(f"internal: {'/'.join(target)} layer {r.layer}: built {value.shape}, "
                                f"model expects {tuple(want)}")
            if r.layer is None:
                buf[...] = value
            else:
                buf[r.layer] = value
            bar.update()
        _set(out, target, jax.device_put(buf, cpu).block_until_ready())  # aliases the aligned buffer
        del buf
    bar.close()
    return out
