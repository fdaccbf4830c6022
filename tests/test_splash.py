"""The splash backend (Pallas TPU kernel, run here in the Pallas interpreter) against the xla backend,
on its own, under sequence parallelism and through the DiT; the cudnn backend's call run by XLA."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import random_params
from numerics import rel_err

from m141jax import checkpoint, parallel
from m141jax.config import preset, to_json_dict
from m141jax.models import attention as A
from m141jax.models import dit, splash
from m141jax.models.sequence_parallel import attend

BF16_TOL = 2e-2  # bf16 splash vs the fp32 xla backend on the same (bf16) inputs, relative to max |ref|


def _qkv(b, l, h=2, d=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(k, (b, l, h, d), jnp.float32).astype(dtype) for k in ks]


def _value_and_grads(impl, q, k, v, w, valid, block=None):
    def f(q, k, v):
        o = A.attention(q, k, v, valid_len=valid, impl=impl, block=block)
        return (o.astype(jnp.float32) * w).sum(), o
    (_, o), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, g


# lengths below one block, a whole number of blocks, and past a block boundary; valid lengths per row:
# all tokens, a single token, a prefix
@pytest.mark.parametrize("length,block", [(45, 128), (256, 128), (200, 128)])
def test_splash_matches_xla_fp32(length, block):
    q, k, v, w = _qkv(3, length)
    valid = jnp.array([length, 1, length // 2 + 3])
    got, ggot = _value_and_grads("splash", q, k, v, w, valid, block)
    want, gwant = _value_and_grads("xla", q, k, v, w, valid)
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(ggot, gwant):
        assert np.isfinite(np.asarray(a)).all() and rel_err(a, b) <= 1e-5


def test_splash_bf16_within_bound():
    q, k, v, w = _qkv(2, 200, dtype=jnp.bfloat16)
    valid = jnp.array([200, 77])
    got, ggot = _value_and_grads("splash", q, k, v, w, valid, 128)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want, gwant = _value_and_grads("xla", *f32, w, valid)
    assert got.dtype == jnp.bfloat16 and rel_err(got.astype(jnp.float32), want) <= BF16_TOL
    for a, b in zip(ggot, gwant):
        assert rel_err(a.astype(jnp.float32), b) <= BF16_TOL


def test_log_sum_exp_and_finite_padding_rows():
    """save_residuals gives each row's log-sum-exp over its segment; the kernel's padded query rows (which
    match no key) stay finite, and are cut off."""
    q, k, v, _ = _qkv(2, 45)
    valid = np.array([45, 20])
    seg_q, seg_k = A._segments(q, k, jnp.asarray(valid))
    out, lse = splash.splash_attention(q, k, v, seg_q, seg_k, block=128, save_residuals=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    s = np.einsum("bqhd,bkhd->bhqk", np.float64(q), np.float64(k)) / 4.0
    seg = np.arange(45)[None] >= valid[:, None]
    s = np.where(seg[:, None, :, None] == seg[:, None, None, :], s, -np.inf)
    want = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    np.testing.assert_allclose(np.asarray(lse), want.transpose(0, 2, 1), atol=1e-5)
    # padded rows the kernel computes and we cut: every q row padded in segment Q_PAD
    qs = jnp.pad(q, [(0, 0), (0, 83), (0, 0), (0, 0)])
    full = splash.splash_attention(qs, qs, qs, jnp.pad(seg_q, [(0, 0), (0, 83)], constant_values=splash.Q_PAD),
                                   jnp.pad(seg_q, [(0, 0), (0, 83)], constant_values=splash.KV_PAD), block=128)
    assert np.isfinite(np.asarray(full)).all()


def test_splash_is_the_kernel_on_tpu_and_interpreted_elsewhere(monkeypatch):
    """Lowered for TPU the program holds the Mosaic kernel; for CPU the Pallas interpreter (no custom call).
    `auto` picks splash on a TPU; unknown names are refused."""
    q = jnp.zeros((1, 200, 2, 128), jnp.bfloat16)
    f = jax.jit(lambda q: A.attention(q, q, q, valid_len=jnp.array([150]), impl="splash"))
    assert "tpu_custom_call" in f.trace(q).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" not in f.trace(q).lower(lowering_platforms=("cpu",)).as_text()
    assert "splash" in A.BACKENDS
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert A.resolve("auto", q, q) == "splash"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        A.attention(q, q, q, impl="flash")


def test_block_sizes():
    assert splash.default_block("TPU v5 lite") == 512 and splash.default_block("TPU v6 lite") == 1024
    assert splash.block_for(43242, 512) == 512 and splash.block_for(45, 512) == 128
    assert splash.block_for(1000, 300) == 384  # rounded up to the 128 lanes


@pytest.mark.parametrize("method,mesh", [("ulysses", "sequence=4,tensor=2"), ("ring", "sequence=4,tensor=2"),
                                         ("none", "data=2,tensor=4")])
def test_splash_under_sequence_parallelism(method, mesh):
    """37 tokens over sequence=4 (padded to 40) with tensor=2: ulysses attends with splash per device; ring
    merges per-block splash results by log-sum-exp and sums per-block splash gradients. Without sequence
    parallelism on a mesh, splash runs under shard_map over batch and heads (Mosaic kernels cannot be
    partitioned automatically). Valid rows and the gradients they produce equal the single-device xla
    backend."""
    q, k, v, w = _qkv(2, 37, h=8, d=16)
    valid_len = jnp.array([30, 1])
    valid = (jnp.arange(37)[None] < valid_len[:, None])[..., None, None]
    w = jnp.where(valid, w, 0)

    def run(impl, method):
        def f(q, k, v):
            o = attend(q, k, v, valid_len=valid_len, method=method, impl=impl)
            return (o * w).sum(), o
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, want), gwant = run("xla", "none")
    with jax.set_mesh(parallel.make_mesh(mesh)):
        (_, got), ggot = run("splash", method)
    assert rel_err(jnp.where(valid, got, 0), jnp.where(valid, want, 0)) <= 1e-5
    for a, b in zip(ggot, gwant):
        assert rel_err(a, b) <= 1e-5


def test_splash_grads_of_key_blocks_sum_to_the_gradient():
    """`splash_grads` of two key blocks (150 keys each, padded to 256 with block 128; 200 queries over two
    query blocks) with the whole softmax's output and log-sum-exp: their sum is the xla gradient."""
    q, _, _, w = _qkv(2, 200, h=1)
    _, k, v, _ = _qkv(2, 300, h=1, seed=1)
    valid = jnp.array([170, 40])
    seg_q = (jnp.arange(200)[None] >= valid[:, None]).astype(jnp.int32)
    seg_k = (jnp.arange(300)[None] >= valid[:, None]).astype(jnp.int32)

    @jax.jit
    def shares(q, k, v, w):
        out, lse = splash.splash_attention(q, k, v, seg_q, seg_k, block=128, save_residuals=True)
        return [splash.splash_grads(q, k[:, s], v[:, s], seg_q, seg_k[:, s], out, lse, w, block=128)
                for s in (slice(0, 150), slice(150, 300))]

    (dq0, dk0, dv0), (dq1, dk1, dv1) = shares(q, k, v, w)
    got = dq0 + dq1, jnp.concatenate([dk0, dk1], 1), jnp.concatenate([dv0, dv1], 1)

    def xla(q, k, v):  # the same two segments with 300 keys: A.attention's are for self-attention
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        s = jnp.where(seg_q[:, None, :, None] == seg_k[:, None, None, :], s, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)

    _, vjp = jax.vjp(xla, q, k, v)
    for a, b in zip(got, vjp(w)):
        assert a.dtype == jnp.float32 and rel_err(a, b) <= 1e-5


def test_ring_backward_runs_the_splash_kernels():
    """Lowered for TPU, the gradient of ring attention with the splash backend holds the kernel's forward
    (with residuals) and its dq and dkv backward kernels: the ring's backward is splash, not blockwise."""
    q = jnp.zeros((1, 512, 8, 128), jnp.bfloat16)
    f = jax.jit(jax.grad(lambda q: attend(q, q, q, valid_len=jnp.array([400]), method="ring", impl="splash")
                         .astype(jnp.float32).sum()))
    with jax.set_mesh(parallel.make_mesh("sequence=4,tensor=2")):
        text = f.trace(q).lower(lowering_platforms=("tpu",)).as_text()
    assert set(re.findall(r"splash_mha_\w+", text)) == {
        "splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
        "splash_mha_dkv_segmented_no_residuals"}


def test_cudnn_call_with_query_and_key_lengths():
    """The cudnn backend's exact call, run by XLA: valid rows and their gradients are the release's,
    padding query rows are zero (not read by the release)."""
    q, k, v, w = _qkv(2, 45)
    valid_len = jnp.array([45, 13])
    valid = (jnp.arange(45)[None] < valid_len[:, None])[..., None, None]
    w = jnp.where(valid, w, 0)

    def grads(f):
        return jax.value_and_grad(lambda q, k, v: (f(q, k, v) * w).sum(), argnums=(0, 1, 2))(q, k, v)

    _, ggot = grads(lambda q, k, v: A.cudnn_attention(q, k, v, valid_len, implementation="xla"))
    _, gwant = grads(lambda q, k, v: A.attention(q, k, v, valid_len=valid_len, impl="xla"))
    got = A.cudnn_attention(q, k, v, valid_len, implementation="xla")
    want = A.attention(q, k, v, valid_len=valid_len, impl="xla")
    assert rel_err(jnp.where(valid, got, 0), jnp.where(valid, want, 0)) <= 1e-6
    assert not np.asarray(jnp.where(valid, 0, got)).any()
    for a, b in zip(ggot, gwant):
        assert rel_err(a, b) <= 1e-5


def test_cudnn_gradient_lowers_to_the_cudnn_kernels(monkeypatch):
    """Lowered for CUDA, the cudnn backend's gradient is cuDNN's flash attention forward and backward with
    the padding mask (query and key lengths), nothing else. No cuDNN on a CPU host: its version query is
    stubbed (9.10); the kernels' numbers are checked only on a GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    q = jnp.zeros((2, 300, 4, 128), jnp.bfloat16)
    f = jax.jit(jax.grad(lambda q, k, v: A.attention(q, k, v, valid_len=jnp.array([250, 10]), impl="cudnn")
                         .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    text = f.trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(\S+)\(", text)
    assert sorted(calls) == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    assert text.count('mask_type\\22: \\22PADDING') == 2
    assert "dot_general" not in text  # no XLA attention beside the kernels


def test_parity_dit_splash_equals_xla(tmp_path, run_parity):
    """`parity dit` on a checkpoint whose m141jax.json says "attention": "splash" equals "xla" (fp32)."""
    cfg = preset("tiny-i2v", param_dtype="fp32", dtype="fp32")
    params = random_params(dit, cfg, 0)
    for name in ("xla", "splash"):
        checkpoint.save(tmp_path / name, "dit", to_json_dict(dataclasses.replace(cfg, attention=name)), params)
    rng = np.random.default_rng(0)
    inputs = {"latents": rng.standard_normal((2, 16, 2, 8, 8), np.float32),
              "ref_latents": rng.standard_normal((2, 16, 1, 8, 8), np.float32),
              "timestep": np.array([900.0, 250.0], np.float32),
              "text_states": rng.standard_normal((2, 7, cfg.text_dim), np.float32),
              "text_mask": np.array([[1] * 7, [1] * 3 + [0] * 4], np.int32),
              "text_states_2": rng.standard_normal((2, cfg.pooled_dim), np.float32)}
    want = run_parity("dit", tmp_path / "xla", inputs)["velocity"]
    got = run_parity("dit", tmp_path / "splash", inputs)["velocity"]
    assert rel_err(got, want) <= 1e-5
