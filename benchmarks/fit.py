"""Which 8-device mesh fits the 13B I2V denoising step at 544x960x81 on which chip?

AOT-lowers and compiles one denoising step (DiT forward + the fp32 Euler update, the latent donated)
for each mesh, with abstract inputs only, and reports per device: parameter bytes (from the
shardings) and XLA's memory analysis (arguments, outputs, temporaries, aliasing). A mesh "fits" a
chip when it compiles and its peak (arguments + outputs + temporaries - aliased) is at most 90% of the
chip's memory, leaving room for the runtime. Nothing is allocated or run.

    python benchmarks/fit.py                          # 8 simulated CPU devices
    python benchmarks/fit.py --topology v5e:2x4       # the TPU compiler, no TPU needed (libtpu installed)
    python benchmarks/fit.py --topology v5e:2x4 --attention splash   # with the Pallas splash kernel

`--attention` picks the kernel (default blockwise; splash compiles the Pallas TPU kernel for a
topology, interpreted on other platforms; ring attention runs it on every key/value block).

`--topology` compiles for a TPU slice with the real TPU compiler on any machine where libtpu is
importable; that compiler refuses a program whose temporaries exceed the chip's HBM, which is then
reported as compiled=0 with the memory it asked for. Without it the XLA CPU compiler answers: it has
no bf16 matmul and hoists fp32 copies of the bf16 weights out of the layer loop (about twice the
parameter bytes), so its temporaries overestimate an accelerator's.
Prints one `RESULT fit ...` line per mesh, then a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

CHIPS_GIB = {"v5e": 16, "v6e": 32, "v5p": 95, "H100": 80}
DEFAULT_MESHES = ("data=8", "fsdp=8", "fsdp=4,sequence=2", "fsdp=2,tensor=2,sequence=2", "tensor=4,sequence=2",
                  "tensor=8", "sequence=8", "sequence=8/ring")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meshes", default=";".join(DEFAULT_MESHES),
                   help="';'-separated mesh specs; '/ring' or '/ulysses' picks the sequence-parallel method "
                        "(default: ulysses when heads divide)")
    p.add_argument("--preset", default="magic141-i2v-13b")
    p.add_argument("--size", default="544x960x81", help="HxWxFRAMES of the video")
    p.add_argument("--text-len", type=int, default=402, help="text tokens (256 LLM + 146 VLM in the release)")
    p.add_argument("--batch", type=int, default=1, help="videos per step (2: a CFG pair on the data axis)")
    p.add_argument("--attention", default="blockwise",
                   help="attention backend: blockwise (default) | splash | xla | cudnn | auto (models/attention.py)")
    p.add_argument("--block", type=int, default=512,
                   help="block length of blockwise or splash (512: the accelerator default)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--platform", default="cpu", help="cpu (simulated devices) or the accelerator platform")
    p.add_argument("--topology", help="compile for a TPU slice without having one, e.g. v5e:2x4 or v6e:2x4 "
                                      "(needs libtpu importable, e.g. pip install 'jax[tpu]')")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.platform == "cpu" and not args.topology:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from m141jax import parallel
    from m141jax.config import preset
    from m141jax.models.conditioning import Conditioning
    from m141jax.models.dit import abstract_params, dit_forward

    if args.topology:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    else:
        devices = jax.devices(args.platform)[:args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"error: {len(devices)} {args.platform} devices, {args.devices} needed")
    h, w, frames = (int(x) for x in args.size.split("x"))
    if h % 16 or w % 16 or (frames - 1) % 4:
        raise SystemExit(f"error: size {args.size}: height and width must be multiples of 16, frames 4k+1")
    base = preset(args.preset, attention=args.attention, attention_block=args.block)
    b, f, lh, lw, c = args.batch, (frames - 1) // 4 + 1, h // 8, w // 8, base.out_channels
    tokens = f * (lh // base.patch_size[1]) * (lw // base.patch_size[2]) + args.text_len
    print(f"{args.preset} at {h}x{w}x{frames}: latents {(b, f, lh, lw, c)}, {tokens} tokens; "
          f"{len(devices)} {devices[0].platform} devices", flush=True)
    params = abstract_params(base)

    def step(p, x, ref, sigma, sigma_next, text, mask, pooled, cfg):
        v = dit_forward(p, cfg, x, sigma * 1000.0, Conditioning(text, mask, pooled), ref)
        return x + v * (sigma_next - sigma)[:, None, None, None, None]

    rows = []
    for item in filter(None, args.meshes.split(";")):
        spec, _, method = item.partition("/")
        mesh = parallel.make_mesh(spec, devices)
        cfg = dataclasses.replace(base, sequence_parallel=parallel.sequence_parallel_method(base, mesh,
                                                                                            method or "auto"))
        psh = parallel.dit_param_shardings(cfg, mesh, params)
        row = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(
            shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape), b))
        inputs = (row((b, f, lh, lw, c)), row((b, 1, lh, lw, c)), row((b,)), row((b,)),
                  row((b, args.text_len, base.text_dim)), row((b, args.text_len), jnp.int32), row((b, base.pooled_dim)))
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, psh)
        param_bytes = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                          for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(psh)))
        fn = parallel.jit_sharded(lambda p, *a: step(p, *a, cfg), mesh, (psh,) + tuple(x.sharding for x in inputs),
                                  inputs[0].sharding, batch=b, donate_argnums=(1,))
        t0 = time.perf_counter()
        gib = lambda n: n / 2**30
        try:
            m = fn.lower(abstract, *inputs).compile().memory_analysis()
            temp = gib(m.temp_size_in_bytes)
            peak = gib(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                       - m.alias_size_in_bytes)
            detail = (f"argument_gib={gib(m.argument_size_in_bytes):.2f} output_gib={gib(m.output_size_in_bytes):.2f} "
                      f"temp_gib={temp:.2f} alias_gib={gib(m.alias_size_in_bytes):.2f}")
        except jax.errors.JaxRuntimeError as e:  # a TPU compile refuses what does not fit its HBM
            need = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
            if "RESOURCE_EXHAUSTED" not in str(e) or not need:
                raise
            temp, peak, detail = None, float(need.group(1)), "compiled=0"
        compile_s = time.perf_counter() - t0
        # a refusal rules out the chip compiled for; the others are judged by the memory it asked for
        target = args.topology.split(":")[0] if args.topology else None
        fits = {chip: peak <= 0.9 * cap and not (temp is None and chip == target) for chip, cap in CHIPS_GIB.items()}
        name = "x".join(f"{a}{n}" for a, n in mesh.shape.items() if n > 1) or "single"
        print(f"RESULT fit mesh={name} sequence_parallel={cfg.sequence_parallel} attention={args.attention} "
              f"block={args.block} batch={b} tokens={tokens} "
              f"platform={args.topology or devices[0].platform} param_gib={gib(param_bytes):.2f} {detail} "
              f"peak_gib={peak:.2f} compile_s={compile_s:.1f} "
              + " ".join(f"fits_{k}={int(v)}" for k, v in fits.items()), flush=True)
        rows.append((spec + (f" ({cfg.sequence_parallel})" if cfg.sequence_parallel != "none" else ""),
                     gib(param_bytes), temp, peak, fits))

    print("\n| mesh | params / device (GiB) | temporaries (GiB) | peak (GiB) | "
          + " | ".join(f"{k} {v} GB" for k, v in CHIPS_GIB.items()) + " |")
    print("|---|---|---|---|" + "---|" * len(CHIPS_GIB))
    for spec, pb, temp, peak, fits in rows:
        temp = "out of memory" if temp is None else f"{temp:.2f}"
        print(f"| {spec} | {pb:.2f} | {temp} | {peak:.2f} | "
              + " | ".join("yes" if fits[k] else "no" for k in CHIPS_GIB) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
