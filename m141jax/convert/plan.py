"""A conversion plan: for every JAX parameter (and layer of a scanned stack), which PyTorch tensors it
is made from and how. Plans are checked completely (missing, unexpected and mis-shaped keys) before
any data is read, then executed one tensor at a time into preallocated output buffers.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from m141jax.convert.sources import FLOAT_DTYPES, TensorSource

# Whether `execute` converts tensors holding NaN or Inf (the converter's --allow-nonfinite); by default
# it refuses them, naming the tensors, since such weights make every output NaN.
ALLOW_NONFINITE: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_nonfinite", default=False)
SHOW = 5  # tensors named in a refusal before "... and N more"

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


@contextlib.contextmanager
def nonfinite_allowed(allow: bool = True):
    """Within this block, `execute` converts NaN / Inf weights instead of refusing them."""
    token = ALLOW_NONFINITE.set(allow)
    try:
        yield
    finally:
        ALLOW_NONFINITE.reset(token)


def _named(items: Sequence[str]) -> str:
    """'a, b, c' for the first SHOW items, with '... and N more' after them."""
    head = ", ".join(items[:SHOW])
    return head + (f", ... and {len(items) - SHOW} more" if len(items) > SHOW else "")


def check(plan: Sequence[Recipe], src: TensorSource, ignore: Callable[[str], bool] = lambda k: False,
          what: str = "checkpoint") -> None:
    """Raise PlanError listing missing keys, unexpected keys and shape mismatches (expected vs found);
    then, in one line, tensors the plan reads that are not floating point (nothing is cast silently)."""
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
    not_float = [f"{k} ({src.dtype(k)})" for k in sorted(want) if src.dtype(k) not in FLOAT_DTYPES]
    if not_float:
        raise PlanError(f"{len(not_float)} tensors of the {what} are not floating point, where float weights are "
                        f"expected (refusing to cast them): {_named(not_float)}")


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


def nonfinite(x: np.ndarray, chunk: int = 1 << 24) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a float array, in chunks so the temporaries stay small."""
    flat = x.reshape(-1)
    if flat.size and all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk)):
        return 0, 0
    nan = sum(int(np.isnan(flat[i:i + chunk]).sum()) for i in range(0, flat.size, chunk))
    inf = sum(int(np.isinf(flat[i:i + chunk]).sum()) for i in range(0, flat.size, chunk))
    return nan, inf


def execute(plan: Sequence[Recipe], src: TensorSource, abstract: dict, dtype, progress: bool = True,
            allow_nonfinite: bool | None = None) -> dict:
    """Build the parameter tree from `src`: jax arrays of `dtype` on the host CPU device.

    Recipes run leaf by leaf into aligned buffers that become jax arrays without a copy, so peak
    memory is the output plus a few source tensors. Output shapes come from `abstract` (the
    model's ShapeDtypeStruct tree) and every slice is checked against it, so a wrong transform can
    never write a silently mis-shaped checkpoint. Every source tensor is checked for NaN / Inf as it is
    read; unless `allow_nonfinite` (default: ALLOW_NONFINITE), a PlanError names them at the end.
    """
    allow = ALLOW_NONFINITE.get() if allow_nonfinite is None else allow_nonfinite
    bad: dict[str, str] = {}

    def read(key: str) -> np.ndarray:
        x = src.get(key)
        if not allow and key not in bad:
            nan, inf = nonfinite(x)
            if nan or inf:
                bad[key] = ", ".join(f"{n} {w}" for n, w in ((nan, "NaN"), (inf, "Inf")) if n)
        return x

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
            value = np.asarray(r.fn(*(read(k) for k, _ in r.sources)))
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
    if bad:
        named = _named([f"{k} ({v})" for k, v in sorted(bad.items())])
        raise PlanError(f"{len(bad)} tensors hold NaN or Inf values: {named}; "
                        f"refusing to convert them (pass --allow-nonfinite to convert them anyway)")
    return out
