"""N:M structured sparsity of dense kernels: masks, pruning and the compact storage format.

- `nm_masks(params, chosen, n, m)`: in every group of m consecutive inputs (along the flattened input
  axes K) of every output channel, keep the n weights of largest magnitude (ties: the first). Kernels
  are chosen by parameter-path patterns (`select_dit`; embeddings, norms, modulation and the final
  layer are excluded by default, `config.SPARSITY_EXCLUDE`). `prune` applies masks once (one-shot).
- `NMSparse`: the compact format (the n kept values of each group and their positions in it, packed in
  1, 2, 4 or 8-bit codes; the kept values optionally int8), a `Box` that each layer rebuilds as a dense
  kernel when it reads it; `compress` makes it, `checkpoint.save` / `checkpoint.load` store and read it.
- `nm_operands` / `nm_matmul`: the same kernel as the operands of a hardware 2:4 sparse matmul
  (`jax.experimental.sparse.nm`, NVIDIA GPUs, jax versions that ship it): a benchmark path only.

Training that keeps the kernels sparse (the gradual schedule, sparsity-preserving updates) is
`m141jax.train.sparsity`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from m141jax.compress.bits import code_bits, pack_bits, unpack_bits
from m141jax.compress.box import Box, is_box, static
from m141jax.compress.layout import Layout, as_matrix, from_matrix, map_selected, select
from m141jax.compress.quant import dit_layouts, quantize_dit, quantize_matrix
from m141jax.config import DiTConfig, SparsityConfig
from m141jax.parallel import path_str

VALUE_FORMATS = ("dense", "int8")


def select_dit(params, cfg: DiTConfig, sparsity: SparsityConfig = SparsityConfig()) -> dict[str, Layout]:
    """The DiT kernels `sparsity.include` / `sparsity.exclude` choose, checked to split into groups of m."""
    chosen = select(params, dit_layouts(cfg), sparsity.include, sparsity.exclude)
    check(chosen, sparsity.m)
    return chosen


def check(chosen: dict[str, Layout], m: int) -> None:
    for path, lay in chosen.items():
        if lay.k % m:
            raise ValueError(f"N:M sparsity with M={m} needs input sizes divisible by {m}: {path} has {lay.k} "
                             f"inputs; exclude it")


def _groups(x, m: int):
    """[*lead, K, N] -> [*lead, K/m, m, N]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] // m, m, x.shape[-1])


def nm_mask(w, lay: Layout, n, m: int):
    """Boolean mask of w's shape keeping the n largest |w| of each group of m inputs (n may be traced)."""
    mag = jnp.abs(_groups(as_matrix(w, lay), m).astype(jnp.float32))  # [*lead, G, m, N]
    a, b = mag[..., :, None, :], mag[..., None, :, :]  # element i (axis -3) against element j (axis -2)
    first = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[:, :, None]  # j before i
    rank = jnp.sum((b > a) | ((b == a) & first), axis=-2)  # elements ranked above i in its group
    return from_matrix((rank < n).reshape(*rank.shape[:-3], -1, rank.shape[-1]), lay.shape)


def nm_masks(params, chosen: dict[str, Layout], n, m: int):
    """A tree like params: N:M masks at the chosen kernels, a scalar True (keep all) elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: nm_mask(x, chosen[k], n, m) if (k := path_str(p)) in chosen else jnp.ones((), bool),
        params)


def prune(params, masks):
    """params with the weights outside their masks set to zero."""
    return jax.tree_util.tree_map(lambda x, keep: jnp.where(keep, x, jnp.zeros((), x.dtype)), params, masks)


class NMSparse(Box):
    """An N:M-sparse kernel: per group of m inputs, the n kept values and their positions in the group.

    `unbox()` rebuilds the dense kernel [*lead, *shape] (zeros outside the kept positions).
    """

    values: Any  # [*lead, K·n/m, N] kept values, group after group, ascending position; array or QArray
    indices: jax.Array  # uint8 [*lead, K·n/m·bits/8, N]: positions in the group, `bits`-bit codes (pack_bits)
    n: int = static()
    m: int = static()
    shape: tuple = static()  # the dense kernel's shape without leading axes

    @property
    def bits(self) -> int:
        return code_bits(self.m)

    def kept(self):
        """The kept values [*lead, K/m, n, N] (dequantised when int8)."""
        v = self.values.unbox() if is_box(self.values) else self.values
        return v.reshape(*v.shape[:-2], v.shape[-2] // self.n, self.n, v.shape[-1])

    def positions(self):
        """The positions in the group of the kept values [*lead, K/m, n, N] (int32)."""
        idx = unpack_bits(self.indices, self.bits).astype(jnp.int32)
        return idx.reshape(*idx.shape[:-2], idx.shape[-2] // self.n, self.n, idx.shape[-1])

    def unbox(self):
        kept, pos = self.kept(), self.positions()  # [*lead, G, n, N]
        hit = pos[..., None, :, :] == jnp.arange(self.m)[:, None, None]  # [*lead, G, m, n, N]
        dense = jnp.sum(jnp.where(hit, kept[..., None, :, :], jnp.zeros((), kept.dtype)), axis=-2, dtype=kept.dtype)
        return from_matrix(dense.reshape(*dense.shape[:-3], -1, dense.shape[-1]), self.shape)

    def astype(self, dtype) -> "NMSparse":
        return self.replace(values=self.values.astype(dtype))


@functools.partial(jax.jit, static_argnames=("lay", "n", "m", "values"))
def compress_kernel(w, lay: Layout, n: int, m: int, values: str = "dense") -> NMSparse:
    """The NMSparse of w keeping the n largest |w| per group of m (w's zeros, if already pruned N:M)."""
    g = _groups(as_matrix(w, lay), m)  # [*lead, G, m, N]
    keep = _groups(as_matrix(nm_mask(w, lay, n, m), lay), m)
    rank = jnp.cumsum(keep, axis=-2)  # 1..n at the kept positions
    is_slot = keep[..., None, :, :] & (rank[..., None, :, :] == jnp.arange(1, n + 1)[:, None, None])
    pos = jnp.argmax(is_slot, axis=-2)  # [*lead, G, n, N]: the position of the k-th kept value
    kept = jnp.take_along_axis(g, pos, axis=-2)
    flat = lambda a: a.reshape(*a.shape[:-3], -1, a.shape[-1])  # noqa: E731
    indices = pack_bits(flat(pos).astype(jnp.uint8), code_bits(m))
    kept = flat(kept)
    if values == "int8":
        kept = quantize_matrix(kept, "int8", kept.shape[-2:], w.dtype)
    elif values != "dense":
        raise ValueError(f"unknown kept-value format {values!r}; accepted: {', '.join(VALUE_FORMATS)}")
    return NMSparse(kept, indices, n=n, m=m, shape=lay.shape)


def compress(params, chosen: dict[str, Layout], n: int = 2, m: int = 4, values: str = "dense"):
    """params with the chosen kernels in the compact N:M format (pruned by magnitude if they are not yet).
    values: "dense" keeps the kept values in the kernel's dtype, "int8" quantizes them per output channel."""
    check(chosen, m)
    bits = code_bits(m)
    for path, lay in chosen.items():
        if (lay.k // m * n * bits) % 8:
            raise ValueError(f"{path}: {lay.k // m * n} kept positions of {bits} bits do not fill whole bytes")
    return map_selected(lambda w, lay, _: compress_kernel(w, lay, n, m, values), params, chosen)


# ---------------------------------------------------------------------- hardware 2:4 (benchmark only)

def nm_operands(sp: NMSparse):
    """(values [N, K/2], metadata uint16 [N, K/16]) of a 2:4 NMSparse kernel [K, N] without leading axes:
    the sparse operand of `jax.experimental.sparse.nm.nm_spmm` with K minor. Its metadata holds the 2-bit
    positions of 16 inputs' 8 kept values, the first in the lowest bits: our packed indices read as
    little-endian uint16."""
    if (sp.n, sp.m) != (2, 4) or is_box(sp.values) or sp.values.ndim != 2:
        raise ValueError(f"the hardware sparse matmul takes one unstacked 2:4 kernel with unquantized values, "
                         f"got {sp.n}:{sp.m} values of shape {jnp.shape(sp.values)}")
    if sp.values.shape[0] % 8:
        raise ValueError(f"the hardware 2:4 metadata needs inputs in multiples of 16, got {2 * sp.values.shape[0]}")
    idx = sp.indices.T  # [N, K/8]
    return sp.values.T, idx[:, 0::2].astype(jnp.uint16) | (idx[:, 1::2].astype(jnp.uint16) << 8)


def nm_matmul(x, sp: NMSparse):
    """x [T, K] (bf16) times the 2:4 kernel [K, N] with the hardware sparse dot -> [T, N] bf16.

    Needs `jax.experimental.sparse.nm` (jax 0.4.27 to the versions that still ship it) and an NVIDIA GPU
    with sparse tensor cores; raises NotImplementedError otherwise.
    """
    try:
        from jax.experimental.sparse import nm
    except ImportError:
        raise NotImplementedError(f"jax {jax.__version__} has no jax.experimental.sparse.nm (N:M sparse dot)") from None
    values, metadata = nm_operands(sp)
    return nm.nm_spmm(x, values, metadata, dimension_numbers=(((1,), (1,)), ((), ())), sparse_operand_idx=1,
                      output_dtype=jnp.bfloat16)


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--nm {text!r} must be N:M, e.g. 2:4") from None
    SparsityConfig(n=n, m=m)
    return n, m


def sparsify_checkpoint(cfg: DiTConfig, params, n: int, m: int, values: str = "dense"):
    """The compact N:M-sparse params of a DiT; with int8 values the kernels the sparsity leaves dense
    (modulation, embeddings, final layer) are int8 too."""
    tree = compress(params, select_dit(params, cfg, SparsityConfig(n=n, m=m)), n, m, values)
    return quantize_dit(tree, cfg, "int8") if values == "int8" else tree
