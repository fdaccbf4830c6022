"""Sequence-parallel attention over the mesh's `sequence` axis, for the 43k-token video sequence.

Both methods run under `shard_map` on the mesh in context (`jax.set_mesh`): the batch split over the
batch axes that divide it, the tokens over `sequence`, the heads over `tensor`.

- Ulysses: an all-to-all turns sequence shards into head shards, every device attends over the
  whole sequence for its heads with the usual backend (`attention`, cuDNN included), and a second
  all-to-all turns them back. Needs the heads of a tensor shard to divide by the sequence axis.
- Ring: each device keeps its queries and passes its key/value block around the ring; every step
  adds one block's partial result, merged by log-sum-exp. The backward pass walks the ring again,
  each block's gradient share computed from the global output and log-sum-exp, the key / value
  gradients travelling with their blocks, so memory stays O(L/n · block) in both directions. The
  per-block kernel is the splash kernel when the backend is splash (asked for, or auto on a TPU):
  forward with `save_residuals`, backward with its dq / dkv kernels (`splash_grads`); else the
  blockwise pieces (`flash_partial`, `flash_grads`, pure JAX).

Masking is the release's segment mask (release.md B.6): a token attends only within its segment (the
image tokens plus the valid text prefix; the text padding). When the token count does not divide
by the axis, it is padded: ring attention gives the pad tokens a third segment, so every token gets
exactly the single-device result; Ulysses puts them in the padding segment (valid tokens exact,
text padding rows, which the release never reads, see them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m141jax.axes import BATCH_AXES, SEQUENCE, TENSOR, fit_axes
from m141jax.models.attention import attention, resolve
from m141jax.models.blockwise import block_split, default_block, flash_grads, flash_partial, from_blocks, to_blocks
from m141jax.models.splash import splash_attention, splash_grads

AXIS = SEQUENCE
METHODS = ("none", "ulysses", "ring")


def _mesh():
    return jax.sharding.get_abstract_mesh()


def sequence_shards() -> int:
    """The size of the `sequence` axis of the mesh in context (1 without one)."""
    mesh = _mesh()
    return 1 if mesh.empty or AXIS not in mesh.shape else mesh.shape[AXIS]


def attend(q, k, v, *, valid_len=None, method: str = "none", impl: str = "auto", block: int | None = None):
    """Self-attention of q/k/v [B, L, H, D]: with `method` ("ulysses" | "ring") over the mesh's `sequence`
    axis when the mesh in context has one larger than 1, else `attention` on this device."""
    if method not in METHODS:
        raise ValueError(f"unknown sequence-parallel method {method!r}; accepted: {METHODS}")
    if method != "none" and sequence_shards() > 1:
        return sequence_parallel_attention(q, k, v, valid_len=valid_len, method=method, impl=impl, block=block)
    return attention(q, k, v, valid_len=valid_len, impl=impl, block=block)


def sequence_parallel_attention(q, k, v, *, valid_len=None, method: str = "ring", impl: str = "auto",
                                block: int | None = None):
    """Attention of q/k/v [B, L, H, D] with the tokens split over the `sequence` mesh axis."""
    mesh = _mesh()
    n = mesh.shape[AXIS]
    b, length, h, _ = q.shape
    if k.shape[1] != length:
        raise ValueError(f"sequence-parallel attention is self-attention: {length} queries, {k.shape[1]} keys")
    batch = fit_axes(BATCH_AXES, b, mesh)
    heads = fit_axes(TENSOR, h, mesh)
    local_heads = h // (mesh.shape[TENSOR] if heads else 1)
    if method == "ulysses" and local_heads % n:
        raise ValueError(f"Ulysses needs the {local_heads} heads of a tensor shard to divide by sequence={n}; "
                         f"use --sequence-parallel ring")
    pad = -length % n
    q, k, v = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v))
    valid_len = jnp.full((b,), length, jnp.int32) if valid_len is None else jnp.asarray(valid_len, jnp.int32)
    spec = P(batch, AXIS, heads, None)
    if method == "ulysses":
        local = functools.partial(_ulysses, impl=impl, block=block)
    elif method == "ring":
        local = functools.partial(_ring, length=length, block=block,
                                  splash=resolve(impl, q, k) == "splash")
    else:
        raise ValueError(f"unknown sequence-parallel method {method!r}; accepted: 'ulysses', 'ring'")
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch)), out_specs=spec,
                        check_vma=False)(q, k, v, valid_len)
    return out[:, :length]


# ------------------------------------------------------------------------------------- Ulysses

def _ulysses(q, k, v, valid_len, *, impl, block):
    """On one device: [b, L/n, h, D] -> all heads' share [b, L, h/n, D] -> attend -> back."""
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=AXIS, split_axis=2, concat_axis=1, tiled=True)
    o = attention(to_heads(q), to_heads(k), to_heads(v), valid_len=valid_len, impl=impl, block=block)
    return jax.lax.all_to_all(o, AXIS, split_axis=1, concat_axis=2, tiled=True)


# ---------------------------------------------------------------------------------------- ring

def _ring(q, k, v, valid_len, *, length, block, splash=False):
    """On one device: its query block against every key/value block as they pass around the ring.
    block: the per-block kernel's block length (None: its default)."""
    chunk = q.shape[1]
    pos = jax.lax.axis_index(AXIS) * chunk + jnp.arange(chunk)
    # segment 0: image + valid text; 1: text padding; 2: the padding added to divide the axis
    seg = (pos[None] >= valid_len[:, None]).astype(jnp.int32) + (pos[None] >= length).astype(jnp.int32)
    return ring_attention(q, k, v, seg, seg, "splash" if splash else "blockwise", block)


def _pass(xs):
    """Send every array to the next device on the ring."""
    n = jax.lax.axis_size(AXIS)
    return jax.lax.ppermute(xs, AXIS, [(i, (i + 1) % n) for i in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def ring_attention(q, k, v, seg_q, seg_k, kernel: str = "blockwise", block: int | None = None):
    """Exact segment-masked attention of this device's queries against the keys of the whole ring
    (call inside shard_map over the `sequence` axis). q/k/v [b, l, h, D], seg [b, l].

    kernel: what computes each key/value block, forward and backward: "blockwise" (`flash_partial`,
    `flash_grads`) or "splash" (the kernel with `save_residuals`, `splash_grads`); block: its block
    length (None: that kernel's default). Either way the backward pieces take the global output and
    log-sum-exp, so their sum over the ring is the exact gradient."""
    return _ring_fwd(q, k, v, seg_q, seg_k, kernel, block)[0]


def _partial(kernel, block, q, k, v, seg_q, seg_k):
    """One key/value block's fp32 output [b, l, h, D] and log-sum-exp per row [b, l, h]."""
    if kernel == "splash":
        o, lse = splash_attention(q, k, v, seg_q, seg_k, block=block, save_residuals=True)
        return o.astype(jnp.float32), lse
    o, lse = flash_partial(q, k, v, seg_q, seg_k, block or default_block())
    return o, _rows(lse, q.shape[1])


def _rows(lse, n):
    """Blockwise log-sum-exp [nq, B, H, bq] -> per row [B, n, H]."""
    return from_blocks(lse[..., None], n)[..., 0]


def _grads(kernel, block, q, k, v, seg_q, seg_k, out, lse, dout):
    """One key/value block's fp32 share (dq, dk, dv) of the gradient, given the global output and
    log-sum-exp per row [b, l, h]."""
    if kernel == "splash":
        return splash_grads(q, k, v, seg_q, seg_k, out, lse, dout, block=block)
    block = block or default_block()
    nq, bq = block_split(q.shape[1], block)
    return flash_grads(block, (q, k, v, seg_q, seg_k, out, to_blocks(lse[..., None], nq, bq)[..., 0]), dout)


def _ring_fwd(q, k, v, seg_q, seg_k, kernel, block):
    if kernel not in ("blockwise", "splash"):
        raise ValueError(f"unknown ring attention kernel {kernel!r}; accepted: 'blockwise', 'splash'")

    def add(out, lse, kv):
        o_j, lse_j = _partial(kernel, block, q, kv[0], kv[1], seg_q, kv[2])
        m = jnp.maximum(lse, lse_j)
        w, w_j = jnp.exp(lse - m), jnp.exp(lse_j - m)
        out = (out * w[..., None] + o_j * w_j[..., None]) / (w + w_j)[..., None]
        return out, m + jnp.log(w + w_j)

    def step(carry, _):
        out, lse, kv = carry
        nxt = _pass(kv)  # independent of this block's compute, so the two can overlap
        return (*add(out, lse, kv), nxt), None

    out, lse = _partial(kernel, block, q, k, v, seg_q, seg_k)  # the local block; n - 1 more follow
    carry = (out, lse, _pass((k, v, seg_k)))
    (out, lse, kv), _ = jax.lax.scan(step, carry, None, length=jax.lax.axis_size(AXIS) - 2)
    out, lse = add(out, lse, kv)
    out = out.astype(q.dtype)
    return out, (q, k, v, seg_q, seg_k, out, lse)


def _ring_bwd(kernel, block, res, dout):
    q, k, v, seg_q, seg_k, out, lse = res

    def grads(dq, kv, dkv):
        dq_j, dk_j, dv_j = _grads(kernel, block, q, kv[0], kv[1], seg_q, kv[2], out, lse, dout)
        return dq + dq_j, (dkv[0] + dk_j, dkv[1] + dv_j)

    def step(carry, _):
        dq, kv, dkv = carry
        dq, dkv = grads(dq, kv, dkv)
        return (dq, *_pass((kv, dkv))), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    carry = (zeros(q), (k, v, seg_k), (zeros(k), zeros(v)))
    (dq, kv, dkv), _ = jax.lax.scan(step, carry, None, length=jax.lax.axis_size(AXIS) - 1)
    dq, dkv = grads(dq, kv, dkv)
    dk, dv = _pass(dkv)  # the n-th hop brings each block's gradient home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


ring_attention.defvjp(_ring_fwd, _ring_bwd)
