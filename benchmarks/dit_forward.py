"""DiT forward: jitted JAX vs diffusers' HunyuanVideoTransformer3DModel in PyTorch, same weights, inputs
and machine, measured in one run; compile time against depth; on an accelerator, the 13B preset at
544×960×81 (seconds per forward, TFLOP/s, MFU by the FLOP formula of anchors.md §5).

    python benchmarks/dit_forward.py [--sizes tiny,small] [--repeats 5] [--skip-compile] [--skip-13b]

Each measurement ends in a line `RESULT <name> key=value ...`. In `dit_<size>` lines `ratio` = JAX time /
PyTorch time (below 1: JAX is faster); `threads` is the fixed CPU thread count of both (`--threads`,
default: every core the process may use), `torch_device` where PyTorch ran (always `cpu`: the reference is
the CPU one, also on an accelerator, where `jax_device` differs). `dit_compile` gives the compile time of
60 blocks over 4 as `deep_over_shallow` (no PyTorch in it).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fix_threads  # noqa: E402

from m141jax.config import preset  # noqa: E402
from m141jax.models import dit  # noqa: E402
from m141jax.models.conditioning import Conditioning  # noqa: E402

# peak dense bf16 TFLOP/s per chip (anchors.md §5)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0, "TPU7x": 2307.0}

THREADS = None  # set by main: the CPU thread count both frameworks use
SIZES = {  # config preset, batch, latent frames, latent height, width, text length, valid text lengths
    "tiny": ("tiny-i2v", 2, 3, 8, 8, 16, (16, 9)),
    "small": ("small-i2v", 2, 9, 32, 32, 64, (64, 40)),
}


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up (compiles for JAX)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dit_flops(cfg, n_img: int, n_txt: int) -> float:
    """Forward FLOPs: (L_dbl + L_sgl)·(24·d²·N + 4·N²·d) (anchors.md §5; embedders and refiner excluded)."""
    n, d = n_img + n_txt, cfg.hidden_size
    return (cfg.double_blocks + cfg.single_blocks) * (24 * d * d * n + 4 * n * n * d)


def torch_model(cfg, seed=0):
    import torch
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, num_layers=cfg.double_blocks, num_single_layers=cfg.single_blocks,
        num_refiner_layers=cfg.refiner_blocks, mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size[1],
        patch_size_t=cfg.patch_size[0], guidance_embeds=cfg.guidance_embed, text_embed_dim=cfg.text_dim,
        pooled_projection_dim=cfg.pooled_dim, rope_axes_dim=cfg.rope_axes, image_condition_type="latent_concat").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m


def convert_in_memory(model, cfg):
    """Our converter's diffusers plan applied to an in-memory state dict (same weights on both sides)."""
    from m141jax.convert.dit import diffusers_plan
    from m141jax.convert.plan import execute

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    class Source:
        prefix = ""

        def keys(self):
            return set(sd)

        def shape(self, k):
            return sd[k].shape

        def get(self, k):
            return sd[k]

    return execute(diffusers_plan(cfg), Source(), dit.abstract_params(cfg), np.float32, progress=False)


def bench_vs_torch(name: str, repeats: int, attention: str):
    import torch

    preset_name, b, f, h, w, l, valid = SIZES[name]
    cfg = preset(preset_name, param_dtype="fp32", dtype="fp32", attention=attention)
    model = torch_model(cfg)
    params = jax.device_put(convert_in_memory(model, cfg))
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(b, 16, f, h, w)).astype(np.float32)
    ref = rng.normal(size=(b, 16, 1, h, w)).astype(np.float32)
    txt = rng.normal(size=(b, l, cfg.text_dim)).astype(np.float32)
    mask = np.array([[1] * n + [0] * (l - n) for n in valid], np.int64)
    pooled = rng.normal(size=(b, cfg.pooled_dim)).astype(np.float32)
    t = np.array([1000.0, 625.0][:b], np.float32)

    x_in = np.concatenate([lat, np.pad(ref, [(0, 0), (0, 0), (0, f - 1), (0, 0), (0, 0)]),
                           np.broadcast_to((np.arange(f) < 1)[None, None, :, None, None], (b, 1, f, h, w))], 1)
    tx = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x_in.astype(np.float32), t, txt, mask, pooled)]

    def run_torch():
        with torch.no_grad():
            return model(*tx, return_dict=False)[0]

    fwd = jax.jit(lambda p, *a: dit.dit_forward(p, cfg, *a))
    cl = lambda a: jnp.moveaxis(jnp.asarray(a), 1, -1)  # noqa: E731
    args = (cl(lat), jnp.asarray(t), Conditioning(jnp.asarray(txt), jnp.asarray(mask, jnp.int32), jnp.asarray(pooled)),
            cl(ref))

    def run_jax():
        return fwd(params, *args).block_until_ready()

    err = float(np.abs(np.moveaxis(np.asarray(run_jax()), -1, 1) - run_torch().numpy()).max())
    jax_s, torch_s = timeit(run_jax, repeats), timeit(run_torch, repeats)
    tokens = f * (h // 2) * (w // 2)
    print(f"RESULT dit_{name} attention={attention} tokens={tokens + l} jax_s={jax_s:.4f} torch_s={torch_s:.4f} "
          f"ratio={jax_s / torch_s:.3f} max_abs_err={err:.2e} threads={THREADS} torch_threads={torch.get_num_threads()} "
          f"torch_device=cpu jax_device={jax.devices()[0].platform}", flush=True)


def compile_seconds(cfg) -> float:
    x = dit.dummy_inputs(cfg)
    params = dit.abstract_params(cfg)
    t0 = time.perf_counter()
    jax.jit(lambda p, *a: dit.MMDiT(cfg).apply({"params": p}, *a)).lower(params, *x).compile()
    return time.perf_counter() - t0


def bench_compile(repeats: int):
    """Lower + compile time (best of `repeats` fresh compilations) at 2+2 and 20+40 blocks, tiny width."""
    shallow = preset("tiny-i2v", param_dtype="fp32", dtype="fp32")
    deep = dataclasses.replace(shallow, double_blocks=20, single_blocks=40)
    s = min(compile_seconds(shallow) for _ in range(repeats))
    d = min(compile_seconds(deep) for _ in range(repeats))
    print(f"RESULT dit_compile blocks_4_s={s:.2f} blocks_60_s={d:.2f} deep_over_shallow={d / s:.3f} threads={THREADS}",
          flush=True)


def chip_peak() -> tuple[str, float] | None:
    kind = jax.devices()[0].device_kind
    for k, v in PEAK_TFLOPS.items():
        if k.lower() in kind.lower().replace(" ", ""):
            return k, v
    return None


def bench_13b(repeats: int):
    """The real preset with random bf16 weights at 544×960×81 (21×68×120 latents), 402 text tokens."""
    cfg = preset("magic141-i2v-13b")
    b, f, h, w, l = 1, 21, 68, 120, 402
    params = dit.init_params(cfg, jax.random.PRNGKey(0))
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    cond = Conditioning(jax.random.normal(k[2], (b, l, cfg.text_dim)),
                        jnp.concatenate([jnp.ones((b, 300), jnp.int32), jnp.zeros((b, l - 300), jnp.int32)], 1),
                        jax.random.normal(k[3], (b, cfg.pooled_dim)))
    args = (jax.random.normal(k[0], (b, f, h, w, 16)), jnp.array([1000.0]), cond,
            jax.random.normal(k[1], (b, 1, h, w, 16)))
    fwd = jax.jit(lambda p, *a: dit.dit_forward(p, cfg, *a))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, *args).compile()
    compile_s = time.perf_counter() - t0
    sec = timeit(lambda: compiled(params, *args).block_until_ready(), repeats)
    flops = dit_flops(cfg, f * (h // 2) * (w // 2), l)
    tflops = flops / sec / 1e12
    peak = chip_peak()
    mfu = f" mfu={tflops / peak[1]:.3f} chip={peak[0]}" if peak else ""
    print(f"RESULT dit_13b_544x960x81 forward_s={sec:.3f} compile_s={compile_s:.1f} pflop={flops / 1e15:.3f} "
          f"tflops={tflops:.1f}{mfu} per_clip_4step_s={4 * sec:.2f} device={jax.devices()[0].device_kind.replace(' ', '_')}",
          flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--attention", default="auto", help="comma-separated backends to measure")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-13b", action="store_true")
    p.add_argument("--threads", type=int, help="CPU threads of JAX and PyTorch (default: every core the process may use)")
    a = p.parse_args()
    global THREADS
    THREADS = fix_threads(a.threads)
    on_accelerator = jax.default_backend() != "cpu"
    for name in a.sizes.split(","):
        for attention in a.attention.split(","):
            bench_vs_torch(name, a.repeats, attention)
    if not a.skip_compile:
        bench_compile(a.repeats)
    if on_accelerator and not a.skip_13b:
        bench_13b(a.repeats)
    elif not a.skip_13b:
        print("13B at 544x960x81: needs a GPU/TPU (not run on CPU)")


if __name__ == "__main__":
    main()
