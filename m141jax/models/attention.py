"""One attention entry point with interchangeable backends.

Inputs are [B, L, H, D]. Masking follows the release (release.md B.6): `valid_len[b]` tokens form a prefix
segment (image tokens + valid text tokens) and the remaining padding tokens form a second segment; a
token attends only within its own segment. A dense boolean `mask` [B, 1|H, Lq, Lk] is accepted too
(the token refiner's rule, B.4), on the XLA backend.

Backends:
- ``xla``: materialises the L×L scores; exact segment semantics. Fast for short sequences.
- ``blockwise``: online softmax over key/value blocks inside query blocks, with a recomputing backward
  pass (custom VJP), so memory is O(L·block) in both directions; exact segment semantics. This is what
  makes the 43k-token 544×960×81 case fit, and it is the fastest CPU path at moderate lengths.
- ``cudnn``: `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs with a key-padding
  mask. Valid tokens get exactly the release's result; padding rows attend to the valid tokens instead
  of to each other, which the release's outputs never see.
- ``auto``: cudnn on a GPU with half-precision inputs, else blockwise for long sequences, else xla.

`sequence_parallel` ("ulysses" | "ring") hands the call to `m141jax.models.sequence_parallel` when a
mesh with a `sequence` axis larger than one is in context (`jax.set_mesh`); the backend above then
runs on each device's share.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "blockwise", "cudnn")
SEQUENCE_PARALLEL = ("none", "ulysses", "ring")
_NEG = -1e30  # finite "minus infinity" so fully masked rows stay NaN-free


def attention(q, k, v, *, valid_len=None, mask=None, impl: str = "auto", block: int | None = None,
              sequence_parallel: str = "none"):
    """Softmax attention with scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    block: the blockwise backend's block length (default 256 on CPU, where blocks must stay in cache,
    512 on accelerators).
    """
    if impl not in BACKENDS:
        raise ValueError(f"unknown attention backend {impl!r}; accepted: {BACKENDS}")
    if sequence_parallel not in SEQUENCE_PARALLEL:
        raise ValueError(f"unknown sequence-parallel method {sequence_parallel!r}; accepted: {SEQUENCE_PARALLEL}")
    if mask is not None:
        if impl not in ("auto", "xla"):
            raise ValueError(f"a dense attention mask needs the 'xla' backend, not {impl!r}")
        return _xla(q, k, v, _segments(q, k, None), mask)
    if sequence_parallel != "none":
        from m141jax.models import sequence_parallel as sp  # builds on this module's blockwise pieces
        if sp.sequence_shards() > 1:
            return sp.sequence_parallel_attention(q, k, v, valid_len=valid_len, method=sequence_parallel,
                                                  impl=impl, block=block)
    if impl == "auto":
        impl = _auto(q, k)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=valid_len, implementation="cudnn")
    seg_q, seg_k = _segments(q, k, valid_len)
    if impl == "xla":
        return _xla(q, k, v, (seg_q, seg_k), None)
    return blockwise_attention(q, k, v, seg_q, seg_k, block or default_block())


def default_block() -> int:
    """The blockwise block length: 256 on CPU, where blocks must stay in cache, 512 on accelerators."""
    return 256 if jax.default_backend() == "cpu" else 512


def _auto(q, k) -> str:
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    # the score tensor of one batch item and head beyond ~1M entries: go blockwise
    return "blockwise" if q.shape[1] * k.shape[1] > 1 << 20 else "xla"


def _segments(q, k, valid_len):
    """Segment ids [B, L]: 0 for the valid prefix, 1 for padding (all 0 without valid_len)."""
    b = q.shape[0]
    if valid_len is None:
        return jnp.zeros((b, q.shape[1]), jnp.int32), jnp.zeros((b, k.shape[1]), jnp.int32)
    valid_len = jnp.asarray(valid_len, jnp.int32)[:, None]
    return ((jnp.arange(q.shape[1])[None] >= valid_len).astype(jnp.int32),
            (jnp.arange(k.shape[1])[None] >= valid_len).astype(jnp.int32))


def _xla(q, k, v, segments, mask):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    seg_q, seg_k = segments
    allowed = seg_q[:, None, :, None] == seg_k[:, None, None, :]
    if mask is not None:
        allowed = allowed & mask
    s = jnp.where(allowed, s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


# ----------------------------------------------------------------------------- blockwise backend
#
# Internally [B, H, L, D] ("heads-major"), split into blocks [nb, B, H, bs, D]: every block product is then
# a plain batched matmul. The softmax scale is folded into q once. Padded positions of the last block get
# segment ids that match nothing (keys -1, queries -2).

def _split(n: int, block: int) -> tuple[int, int]:
    """(number of blocks, block size): as few blocks as `block` allows, sizes rounded up to 8."""
    nb = max(1, -(-n // block))
    size = -(-n // nb)
    return nb, -(-size // 8) * 8


def _to_blocks(x, nb: int, size: int):
    """[B, L, H, D] -> [nb, B, H, size, D] (zero-padded)."""
    b, n, h, d = x.shape
    x = jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, 0), (0, nb * size - n), (0, 0)])
    return jnp.moveaxis(x.reshape(b, h, nb, size, d), 2, 0)


def _from_blocks(x, n: int):
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
    nq, bq = _split(q.shape[1], block)
    nk, bk = _split(k.shape[1], block)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return (_to_blocks(q * jnp.asarray(scale, q.dtype), nq, bq), _to_blocks(k, nk, bk), _to_blocks(v, nk, bk),
            _seg_blocks(seg_q, nq, bq, -2), _seg_blocks(seg_k, nk, bk, -1))


def _scores(qb, kb, sq, sk):
    """Masked scores [B, H, bq, bk] in fp32 of one (pre-scaled) query block against one key block."""
    s = jnp.einsum("bhqd,bhkd->bhqk", qb, kb, preferred_element_type=jnp.float32)
    return jnp.where(sq[:, None, :, None] == sk[:, None, None, :], s, _NEG)


def _flash_fwd(q, k, v, seg_q, seg_k, block):
    out, lse = _flash_partial(q, k, v, seg_q, seg_k, block)
    out = out.astype(q.dtype)
    return out, (q, k, v, seg_q, seg_k, out, lse)


def _flash_partial(q, k, v, seg_q, seg_k, block):
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
        init = (stat + _NEG, stat, jnp.zeros(qb.shape, jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (ks, vs, sks))
        l = jnp.where(l == 0, 1.0, l)
        return acc / l[..., None], m + jnp.log(l)  # out [B, H, bq, D], logsumexp [B, H, bq]

    out, lse = jax.lax.map(q_block, (qs, sqs))
    return _from_blocks(out, q.shape[1]), lse


def _flash_bwd(block, res, dout):
    q, k, v = res[:3]
    dq, dk, dv = _flash_grads(block, res, dout)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


def _flash_grads(block, res, dout):
    """fp32 (dq, dk, dv) given the residuals (q, k, v, seg_q, seg_k, out, lse) of the full softmax.

    With `lse` of the full softmax and `k`/`v` one block of the keys, this is that block's share of
    the gradients (what ring attention sums over the ring)."""
    q, k, v, seg_q, seg_k, out, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs, ks, vs, sqs, sks = _layout(q, k, v, seg_q, seg_k, block)
    nq, bq = _split(q.shape[1], block)
    dos = _to_blocks(dout, nq, bq)
    # D_i = rowsum(dO ∘ O) per query: [nq, B, H, bq]
    delta = _to_blocks((dout.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True), nq, bq)[..., 0]

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

    dq = _from_blocks(jax.lax.map(dq_block, (qs, sqs, dos, lse, delta)), q.shape[1])
    dk, dv = jax.lax.map(dkv_block, (ks, vs, sks))
    return dq, _from_blocks(dk, k.shape[1]), _from_blocks(dv, v.shape[1])


_flash.defvjp(_flash_fwd, _flash_bwd)


def causal_padding_mask(attention_mask):
    """The mask of a causal text encoder with padding [B, 1, L, L]: query i sees keys j ≤ i that are not padding.

    attention_mask [B, L] (1 = token, 0 = padding), as transformers' LlamaModel / CLIPTextModel take it.
    Padding queries still see the valid keys before them, so no row is empty.
    """
    valid = jnp.asarray(attention_mask).astype(bool)
    n = valid.shape[1]
    causal = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
    return causal[None, None] & valid[:, None, None, :]
