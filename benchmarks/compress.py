"""Compression benchmark (release.md G): DiT parameter bytes per format, and the output error each costs.

1. The released 13B I2V DiT, by shapes only (jax.eval_shape, no weights): parameter bytes in bf16,
   2:4 sparse (compact: kept values + 2-bit positions), int8, int4 (group 32), 2:4 + int8.
   Targets: int8 halves 25.6 GB to 12.8 GB, int4 ≤ 7 GB, 2:4 + int8 below int8 alone.
2. The tiny I2V DiT (random fp32 weights): the same 4-step sampling run (noise, text, reference and
   schedule fixed) with dense weights and with each format; the relative L2 and max errors of the
   final latents against dense. Sparse formats are also compared with the pruned dense model (the
   error of the format itself; pruning without fine-tuning dominates the error against dense).
3. NVIDIA GPU with `jax.experimental.sparse.nm` only: a 2:4 sparse matmul at a DiT MLP shape against
   the dense bf16 matmul (elsewhere: a RESULT line saying why it was not measured).

    python benchmarks/compress.py [--skip-13b] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from m141jax import sampling
from m141jax.compress import layout, nm, quant
from m141jax.compress.box import nbytes
from m141jax.config import preset
from m141jax.models import dit
from m141jax.models.conditioning import Conditioning

FORMATS = ("dense", "sparse_2_4", "int8", "int4", "sparse_2_4_int8")


def compressors(params, cfg):
    """{format: function params -> compressed tree}; the 2:4 formats prune the default selection."""
    chosen = nm.select_dit(params, cfg)
    return {
        "dense": lambda p: p,
        "sparse_2_4": lambda p: nm.compress(p, chosen),
        "int8": lambda p: quant.quantize_dit(p, cfg, "int8"),
        "int4": lambda p: quant.quantize_dit(p, cfg, "int4"),
        # kept values int8, and the kernels the sparsity leaves dense (modulation) int8 as well
        "sparse_2_4_int8": lambda p: quant.quantize_dit(nm.compress(p, chosen, values="int8"), cfg, "int8"),
    }


def bytes_13b() -> None:
    cfg = preset("magic141-i2v-13b")
    abstract = dit.abstract_params(cfg)
    dense = nbytes(abstract)
    for name, fn in compressors(abstract, cfg).items():
        size = nbytes(jax.eval_shape(fn, abstract))
        print(f"RESULT compress_bytes_13b format={name} gb={size / 1e9:.3f} gib={size / 2 ** 30:.3f} "
              f"ratio={size / dense:.4f}", flush=True)


def rel_l2(a, b) -> float:
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def tiny_errors(steps: int) -> None:
    cfg = preset("tiny-i2v", param_dtype="fp32", dtype="fp32")
    params = dit.init_params(cfg, jax.random.PRNGKey(0))
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    noise = jax.random.normal(k[0], (2, 3, 8, 8, cfg.out_channels))
    ref = jax.random.normal(k[1], (2, 1, 8, 8, cfg.out_channels))
    text = Conditioning(jax.random.normal(k[2], (2, 6, cfg.text_dim)), jnp.ones((2, 6), jnp.int32).at[1, 4:].set(0),
                        jax.random.normal(k[3], (2, cfg.pooled_dim)))
    run = lambda p: sampling.sample(p, cfg, noise, text, sigmas=sampling.schedule(steps), ref_latents=ref)  # noqa: E731
    dense = run(params)
    chosen = nm.select_dit(params, cfg)
    pruned = run(nm.prune(params, nm.nm_masks(params, chosen, 2, 4)))
    for name, fn in compressors(params, cfg).items():
        tree = fn(params)
        out = run(tree)
        extra = f" rel_l2_vs_pruned={rel_l2(out, pruned):.3e}" if name.startswith("sparse") else ""
        print(f"RESULT compress_error_tiny format={name} steps={steps} rel_l2={rel_l2(out, dense):.3e} "
              f"max_abs={float(jnp.abs(out - dense).max()):.3e}{extra} "
              f"ratio={nbytes(tree) / nbytes(params):.4f}", flush=True)


def _time(fn, *args, reps: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def nm_matmul(tokens: int) -> None:
    """x [tokens, 3072] @ fc1 [3072, 12288] dense bf16 vs the hardware 2:4 sparse dot."""
    k, n = 3072, 12288
    if jax.default_backend() != "gpu":
        print(f"RESULT compress_nm_matmul status=not_measured reason=backend_{jax.default_backend()}_has_no_2_4_dot")
        return
    w = jax.random.normal(jax.random.PRNGKey(0), (k, n), jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(1), (tokens, k), jnp.bfloat16)
    sp = nm.compress_kernel(w, layout.Layout(0, 1, (k, n)), 2, 4)
    dense_w = sp.unbox()
    try:
        sparse_s = _time(jax.jit(nm.nm_matmul), x, sp)
    except NotImplementedError as e:
        print(f"RESULT compress_nm_matmul status=not_measured reason={str(e).replace(' ', '_')}")
        return
    dense_s = _time(jax.jit(lambda a, b: a @ b), x, dense_w)
    err = rel_l2(jax.jit(nm.nm_matmul)(x, sp).astype(jnp.float32), (x @ dense_w).astype(jnp.float32))
    print(f"RESULT compress_nm_matmul tokens={tokens} dense_s={dense_s:.6f} sparse_s={sparse_s:.6f} "
          f"ratio={dense_s / sparse_s:.3f} rel_l2={err:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-13b", action="store_true", help="skip the 13B shape-only byte counts")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the tiny run")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the GPU 2:4 matmul")
    args = p.parse_args()
    if not args.skip_13b:
        bytes_13b()
    tiny_errors(args.steps)
    nm_matmul(args.tokens)


if __name__ == "__main__":
    main()
