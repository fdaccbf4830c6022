"""Blockwise exact attention: online softmax over key/value blocks inside query blocks.

Memory is O(L·block) in both directions: the backward pass (custom VJP) recomputes the block scores
from the saved log-sum-exp instead of storing them. Tokens attend only within their segment (segment
ids [B, L] per query and key). Besides the whole kernel (`blockwise_attention`), the pieces are public
for ring attention (models/sequence_parallel.py), which combines per-block partial results:
`flash_partial` (fp32 output and log-sum-exp of one key block) and `flash_grads` (one key block's
share of the gradients given the full softmax's log-sum-exp).

Internally [B, H, L, D] ("heads-major"), split into blocks [nb, B, H, bs, D]: every block product is then
a plain batched matmul. The softmax scale is folded into q once. Padded positions of the last block get
segment ids that match nothing (keys -1, queries -2).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity" so fully masked rows stay NaN-free


def default_block() -> int:
    """The block length: 256 on CPU, where blocks must stay in cache, 512 on accelerators."""
    return 256 if jax.default_backend() == "cpu" else 512


def block_split(n: int, block: int) -> tuple[int, int]:
    """(number of blocks, block size): as few blocks as `block` allows, sizes rounded up to 8."""
    nb = max(1, -(-n // block))
    size = -(-n // nb)
    return nb, -(-size // 8) * 8


def to_blocks(x, nb: int, size: int):
    """[B, L, H, D] -> [nb, B, H, size, D] (zero-padded)."""
    b, n, h, d = x.shape
    x = jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, 0), (0, nb * size - n), (0, 0)])
    return jnp.moveaxis(x.reshape(b, h, nb, size, d), 2, 0)


def from_blocks(x, n: int):
    """[nb, B, H, size, D] -> [B, n, H, D]."""
    nb, b, h, size, d = x.shape
    return jnp.swapaxes(jnp.moveaxis(x, 0, 2).reshape(b, h, nb * size, d), 1, 2)[:, :n]


def _seg_blocks(seg, nb: int, size: int, fill: int):
    """[B, L] -> [nb, B, size], padding with `fill`."""
    seg = jnp.pad(seg, [(0, 0), (0, nb * size - seg.shape[1])], constant_values=fill)
    return jnp.moveaxis(seg.reshape(seg.shape[0], nb, size), 1, 0)


def blockwise_attention(q, k, v, seg_q, seg_k, block: int = 512):
    """Memory-bounded exact attention with segment masking; differentiable with O(L·block) memory."""
    return _flash(q, k, v, seg_q, seg_k, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, seg_q, seg_k, block):
    return _flash_fwd(q, k, v, seg_q, seg_k, block)[0]


def _layout(q, k, v, seg_q, seg_k, block):
    nq, bq = block_split(q.shape[1], block)
    nk, bk = block_split(k.shape[1], block)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return (to_blocks(q * jnp.asarray(scale, q.dtype), nq, bq), to_blocks(k, nk, bk), to_blocks(v, nk, bk),
            _seg_blocks(seg_q, nq, bq, -2), _seg_blocks(seg_k, nk, bk, -1))


def _scores(qb, kb, sq, sk):
    """Masked scores [B, H, bq, bk] in fp32 of one (pre-scaled) query block against one key block."""
    s = jnp.einsum("bhqd,bhkd->bhqk", qb, kb, preferred_element_type=jnp.float32)
    return jnp.where(sq[:, None, :, None] == sk[:, None, None, :], s, NEG)


def _flash_fwd(q, k, v, seg_q, seg_k, block):
    out, lse = flash_partial(q, k, v, seg_q, seg_k, block)
    out = out.astype(q.dtype)
    return out, (q, k, v, seg_q, seg_k, out, lse)


def flash_partial(q, k, v, seg_q, seg_k, block):
    """The forward pass before the cast: out fp32 [B, Lq, H, D], logsumexp fp32 [nq, B, H, bq]."""
    qs, ks, vs, sqs, sks = _layout(q, k, v, seg_q, seg_k, block)

    def q_block(args):
        qb, sq = args

        def kv_step(carry, kv):
            m, l, acc = carry
            kb, vb, sk = kv
            s = _scores(qb, kb, sq, sk)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return (m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv), None

        stat = jnp.zeros(qb.shape[:-1], jnp.float32)
        init = (stat + NEG, stat, jnp.zeros(qb.shape, jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (ks, vs, sks))
        l = jnp.where(l == 0, 1.0, l)
        return acc / l[..., None], m + jnp.log(l)  # out [B, H, bq, D], logsumexp [B, H, bq]

    out, lse = jax.lax.map(q_block, (qs, sqs))
    return from_blocks(out, q.shape[1]), lse


def _flash_bwd(block, res, dout):
    q, k, v = res[:3]
    dq, dk, dv = flash_grads(block, res, dout)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


def flash_grads(block, res, dout):
    """fp32 (dq, dk, dv) given the residuals (q, k, v, seg_q, seg_k, out, lse) of the full softmax.

    With `lse` of the full softmax and `k`/`v` one block of the keys, this is that block's share of
    the gradients (what ring attention sums over the ring)."""
    q, k, v, seg_q, seg_k, out, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs, ks, vs, sqs, sks = _layout(q, k, v, seg_q, seg_k, block)
    nq, bq = block_split(q.shape[1], block)
    dos = to_blocks(dout, nq, bq)
    # D_i = rowsum(dO ∘ O) per query: [nq, B, H, bq]
    delta = to_blocks((dout.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True), nq, bq)[..., 0]

    def probs(qb, kb, sq, sk, lse_b):
        return jnp.exp(_scores(qb, kb, sq, sk) - lse_b[..., None])

    def dq_block(args):  # one query block against every key block
        qb, sq, dob, lse_b, dl = args

        def step(dq, kv):
            kb, vb, sk = kv
            p = probs(qb, kb, sq, sk, lse_b)
            ds = p * (jnp.einsum("bhqd,bhkd->bhqk", dob, vb, preferred_element_type=jnp.float32) - dl[..., None])
            return dq + jnp.einsum("bhqk,bhkd->bhqd", ds, kb.astype(jnp.float32)), None

        dq, _ = jax.lax.scan(step, jnp.zeros(qb.shape, jnp.float32), (ks, vs, sks))
        return dq * scale

    def dkv_block(args):  # one key block against every query block
        kb, vb, sk = args

        def step(carry, qa):
            dk, dv = carry
            qb, sq, dob, lse_b, dl = qa
            p = probs(qb, kb, sq, sk, lse_b)
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p, dob.astype(jnp.float32))
            ds = p * (jnp.einsum("bhqd,bhkd->bhqk", dob, vb, preferred_element_type=jnp.float32) - dl[..., None])
            return (dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qb.astype(jnp.float32)), dv), None

        zeros = jnp.zeros(kb.shape, jnp.float32)
        (dk, dv), _ = jax.lax.scan(step, (zeros, zeros), (qs, sqs, dos, lse, delta))
        return dk, dv  # qb is pre-scaled, so dk already carries the scale

    dq = from_blocks(jax.lax.map(dq_block, (qs, sqs, dos, lse, delta)), q.shape[1])
    dk, dv = jax.lax.map(dkv_block, (ks, vs, sks))
    return dq, from_blocks(dk, k.shape[1]), from_blocks(dv, v.shape[1])


_flash.defvjp(_flash_fwd, _flash_bwd)
