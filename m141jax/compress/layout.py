"""Dense-layer kernels as matrices, and which kernels a compression applies to.

Quantization and N:M sparsity both work on the kernels of the models' dense layers, seen as matrices
[*lead, K, N]: `lead` stacked-layer axes ('layers'), K the contracted input axes flattened, N the output
axes flattened. How many axes lead and how many are contracted is stored by the layer that creates
the kernel (`models.layers.DenseKernel`) and read through each model's `kernel_layouts(cfg)`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import jax
import numpy as np

from m141jax.parallel import path_str

KERNEL = r"(^|/)kernel$"


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


def as_matrix(w, lay: Layout):
    """The kernel as [*lead, K, N]."""
    return w.reshape(*w.shape[:w.ndim - len(lay.shape)], lay.k, lay.n)


def from_matrix(x, shape: tuple[int, ...]):
    """[*lead, K, N] back to a kernel [*lead, *shape] (`Layout.shape`)."""
    return x.reshape(*x.shape[:-2], *shape)


def select(params, kernel_layouts: dict[str, tuple[int, int]], include: Sequence[str] = (KERNEL,),
           exclude: Sequence[str] = ()) -> dict[str, Layout]:
    """{path: Layout} of the dense kernels among `params` (arrays or ShapeDtypeStructs) whose path matches
    an `include` pattern and no `exclude` pattern. `kernel_layouts`: the model's `kernel_layouts(cfg)`
    ({path: (stacked-layer axes, contracted input axes)} of its dense kernels)."""
    chosen = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = path_str(p)
        if not any(re.search(r, key) for r in include) or any(re.search(r, key) for r in exclude):
            continue
        if key not in kernel_layouts:
            raise ValueError(f"{key} of shape {np.shape(leaf)} is not a dense kernel: exclude it or narrow the "
                             f"include patterns")
        lead, n_in = kernel_layouts[key]
        chosen[key] = Layout(lead, n_in, tuple(np.shape(leaf)[lead:]))
    if not chosen:
        raise ValueError(f"no parameter matches include {list(include)} outside exclude {list(exclude)}")
    return chosen


def map_selected(fn: Callable, params, chosen: dict[str, Layout]):
    """params with each chosen leaf x replaced by fn(x, layout, path)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(x, chosen[k], k) if (k := path_str(p)) in chosen else x, params)
