"""The Pallas TPU splash-attention kernel with the release's segment mask (release.md B.6).

`jax.experimental.pallas.ops.tpu.splash_attention` computes exact softmax attention block by block in
VMEM, forward and backward (its own custom VJP), and skips nothing here: the mask is a `FullMask` per
head and the release's two segments (the valid prefix = image tokens + valid text tokens, id 0; the
text padding, id 1) are its `SegmentIds` (a query attends to a key only when their ids are equal).

What this module adds around the kernel:
- any length: q and k/v are padded to a multiple of the kernel's blocks; padded queries get id
  `Q_PAD`, padded keys `KV_PAD`, which match nothing real and not each other, so padded keys are never
  attended and padded query rows (fully masked: the kernel's finite mask value keeps them finite) are
  cut off;
- the softmax scale: the kernel scales nothing, so q is multiplied by 1/sqrt(D) first;
- layout: the kernel takes [heads, len, dim] per batch element; [B, L, H, D] is transposed and the
  kernel is vmapped over the batch;
- the platform: `jax.lax.platform_dependent` lowers the compiled kernel for TPU and the Pallas
  interpreter (slow, exact: tests) for every other platform. The choice is made when the program is
  lowered, so an ahead-of-time compile for a TPU topology on a CPU host gets the real kernel;
- meshes: a Mosaic kernel cannot be partitioned automatically, so on a mesh in context whose axes are
  not already manual (outside `shard_map`) the call is wrapped in `shard_map` over the batch axes that
  divide the batch and the `tensor` axis where it divides the heads (other axes: replicated);
- block sizes: `attention_block` of the DiT config (rounded to the kernel's 128-lane multiple, cut to
  the padded length), by default per TPU generation (`default_block`).

`save_residuals=True` also returns the fp32 log-sum-exp per row [B, Lq, H] (the forward only: the
kernel refuses to differentiate it); ring attention (models/sequence_parallel.py) merges per-block
results through it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from m141jax.axes import BATCH_AXES, TENSOR, fit_axes

LANES = 128  # the kernel's blocks are multiples of the 128-wide vector lanes
Q_PAD, KV_PAD = -2, -1  # segment ids of the padding added to reach whole blocks: they match nothing
# block length by TPU generation (device_kind prefixes); v6e/v7 have the larger MXU and VMEM budget
GENERATION_BLOCKS = (("TPU v6", 1024), ("TPU7", 1024), ("TPU v7", 1024), ("TPU v5", 512), ("TPU v4", 512))
FALLBACK_BLOCK = 512


def default_block(device_kind: str | None = None) -> int:
    """The splash block length for a TPU generation (`jax.devices()[0].device_kind` when not given)."""
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    for prefix, block in GENERATION_BLOCKS:
        if device_kind.startswith(prefix):
            return block
    return FALLBACK_BLOCK


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_for(length: int, block: int | None) -> int:
    """The kernel block for a sequence of `length`: `block` (default per generation) rounded up to 128
    lanes and no longer than the length rounded up to 128."""
    block = default_block() if block is None else block
    if block <= 0:
        raise ValueError(f"splash block length must be positive, got {block}")
    return min(_round_up(block, LANES), _round_up(length, LANES))


def _kernel(heads: int, lq: int, lk: int, bq: int, bk: int, save_residuals: bool, interpret: bool):
    """A fresh kernel per trace: its mask tables become constants of the trace that builds it (cached
    across traces they would leak tracers; built eagerly they would need a device of the mesh in
    context, which an ahead-of-time topology does not have)."""
    blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                           block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                           block_q_dq=bq, block_kv_dq=bk)
    mask = sa.MultiHeadMask([sa.FullMask((lq, lk)) for _ in range(heads)])
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              save_residuals=save_residuals, interpret=interpret)


def splash_attention(q, k, v, seg_q, seg_k, *, block: int | None = None, save_residuals: bool = False):
    """Segment-masked softmax attention (scale 1/sqrt(D)) with the splash kernel.

    q [B, Lq, H, D], k/v [B, Lk, H, D], seg_q [B, Lq] / seg_k [B, Lk] int segment ids (non-negative).
    Returns [B, Lq, H, D] in q's dtype, and with `save_residuals` also the log-sum-exp [B, Lq, H] fp32.
    """
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"splash attention here is multi-head: {q.shape[2]} query heads, {k.shape[2]} key heads")
    mesh = jax.sharding.get_abstract_mesh()
    auto = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    local = functools.partial(_splash, block=block, save_residuals=save_residuals)
    if not any(mesh.shape[a] > 1 for a in auto):
        return local(q, k, v, seg_q, seg_k)
    batch, heads = fit_axes(BATCH_AXES, q.shape[0], mesh), fit_axes(TENSOR, q.shape[2], mesh)
    x, seg = P(batch, None, heads, None), P(batch, None)
    out = (x, P(batch, None, heads)) if save_residuals else x
    return jax.shard_map(local, mesh=mesh, in_specs=(x, x, x, seg, seg), out_specs=out, axis_names=set(auto),
                         check_vma=False)(q, k, v, seg_q, seg_k)


def _splash(q, k, v, seg_q, seg_k, *, block, save_residuals):
    """`splash_attention` on one device's share."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = block_for(lq, block), block_for(lk, block)
    pq, pk = _round_up(lq, bq) - lq, _round_up(lk, bk) - lk
    heads_major = lambda x, pad: jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, 0), (0, pad), (0, 0)])
    qs = heads_major(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), pq)
    ks, vs = heads_major(k, pk), heads_major(v, pk)
    sq = jnp.pad(jnp.asarray(seg_q, jnp.int32), [(0, 0), (0, pq)], constant_values=Q_PAD)
    sk = jnp.pad(jnp.asarray(seg_k, jnp.int32), [(0, 0), (0, pk)], constant_values=KV_PAD)

    def run(interpret, qs, ks, vs, sq, sk):
        kernel = _kernel(h, lq + pq, lk + pk, bq, bk, save_residuals, interpret)
        return jax.vmap(lambda q, k, v, a, c: kernel(q, k, v, segment_ids=sa.SegmentIds(q=a, kv=c)))(
            qs, ks, vs, sq, sk)

    res = jax.lax.platform_dependent(qs, ks, vs, sq, sk, tpu=functools.partial(run, False),
                                     default=functools.partial(run, True))
    out, lse = res if save_residuals else (res, None)
    out = jnp.swapaxes(out[:, :, :lq], 1, 2)
    if not save_residuals:
        return out
    return out, jnp.swapaxes(lse[0] if isinstance(lse, (tuple, list)) else lse, 1, 2)[:, :lq]
