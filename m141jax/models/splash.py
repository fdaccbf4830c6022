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
kernel refuses to differentiate it), and `splash_grads` runs the kernel's backward pass for a block of
keys given another softmax's output and log-sum-exp: ring attention (models/sequence_parallel.py)
merges per-block results through the first and sums per-block gradients with the second.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
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


def _layout(q, k, v, seg_q, seg_k, block):
    """One device's share in the kernel's layout: q scaled by 1/sqrt(D), q/k/v heads-major [B, H, L, D]
    and segment ids [B, L], all padded to whole blocks; and the blocks (bq, bk)."""
    lq, lk, d = q.shape[1], k.shape[1], q.shape[3]
    bq, bk = block_for(lq, block), block_for(lk, block)
    pq, pk = _round_up(lq, bq) - lq, _round_up(lk, bk) - lk
    qs = _heads_major(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), pq)
    ks, vs = _heads_major(k, pk), _heads_major(v, pk)
    sq = jnp.pad(jnp.asarray(seg_q, jnp.int32), [(0, 0), (0, pq)], constant_values=Q_PAD)
    sk = jnp.pad(jnp.asarray(seg_k, jnp.int32), [(0, 0), (0, pk)], constant_values=KV_PAD)
    return (qs, ks, vs, sq, sk), (bq, bk)


def _heads_major(x, pad):
    """[B, L, H, ...] -> [B, H, L + pad, ...], zero-padded."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))


def _tokens_major(x, n):
    """[B, H, L + pad, ...] -> [B, n, H, ...]."""
    return jnp.swapaxes(x[:, :, :n], 1, 2)


def _on_platform(run, *args):
    """`run(interpret, *args)`: the compiled kernel where the program is lowered for TPU, the Pallas
    interpreter on every other platform."""
    return jax.lax.platform_dependent(*args, tpu=functools.partial(run, False),
                                      default=functools.partial(run, True))


def _splash(q, k, v, seg_q, seg_k, *, block, save_residuals):
    """`splash_attention` on one device's share."""
    lq, h = q.shape[1], q.shape[2]
    (qs, ks, vs, sq, sk), (bq, bk) = _layout(q, k, v, seg_q, seg_k, block)

    def run(interpret, qs, ks, vs, sq, sk):
        kernel = _kernel(h, qs.shape[2], ks.shape[2], bq, bk, save_residuals, interpret)
        return jax.vmap(lambda q, k, v, a, c: kernel(q, k, v, segment_ids=sa.SegmentIds(q=a, kv=c)))(
            qs, ks, vs, sq, sk)

    res = _on_platform(run, qs, ks, vs, sq, sk)
    out, lse = res if save_residuals else (res, None)
    out = _tokens_major(out, lq)
    if not save_residuals:
        return out
    return out, _tokens_major(lse[0] if isinstance(lse, (tuple, list)) else lse, lq)


def splash_grads(q, k, v, seg_q, seg_k, out, lse, dout, *, block: int | None = None):
    """fp32 (dq, dk, dv): these keys' share of the gradient of a softmax attention whose output `out`
    [B, Lq, H, D] and log-sum-exp `lse` [B, Lq, H] (as `save_residuals` gives it) may cover more keys
    than k/v, given the output's cotangent `dout`. Runs the splash backward kernels (dq, dkv) with
    those statistics in place of the block's own: with every key it is the kernel's own backward pass;
    ring attention (models/sequence_parallel.py) sums it over the key blocks of the ring. One device's
    share (no automatic partitioning of the kernel: call it inside `shard_map` or without a mesh).

    The kernel's public custom VJP saves its own block's output and log-sum-exp, so the backward
    function behind it (`_splash_attention_bwd`, jax 0.10) is called with the global ones."""
    lq, lk, h, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    (qs, ks, vs, sq, sk), (bq, bk) = _layout(q, k, v, seg_q, seg_k, block)
    pq = qs.shape[2] - lq
    outs, douts = _heads_major(out, pq), _heads_major(dout.astype(out.dtype), pq)
    lses = _heads_major(jnp.asarray(lse, jnp.float32), pq)  # padded rows: 0, their dout is 0

    def run(interpret, qs, ks, vs, sq, sk, outs, lses, douts):
        kernel = _kernel(h, qs.shape[2], ks.shape[2], bq, bk, False, interpret)
        kw = kernel.kwargs

        def one(q, k, v, a, c, o, lse, do):
            res = (q, k, v, sa.SegmentIds(q=a, kv=c), None, o, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
            grads = sak._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None,
                                              kw["mask_function"], kw["attn_logits_soft_cap"], interpret, res, do)
            return grads[3:6]  # dq, dk, dv (after the three mask infos)

        return jax.vmap(one)(qs, ks, vs, sq, sk, outs, lses, douts)

    dq, dk, dv = _on_platform(run, qs, ks, vs, sq, sk, outs, lses, douts)
    f32 = lambda x, n: _tokens_major(x, n).astype(jnp.float32)
    return f32(dq, lq) * (1.0 / math.sqrt(d)), f32(dk, lk), f32(dv, lk)  # dq: the kernel's q was scaled
