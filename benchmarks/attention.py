"""The attention kernels at the real shape: 43,242 tokens (544x960x81 + 402 text), 24 heads, head dim 128, bf16.

For each backend, batch and pass (forward; forward + backward as a VJP), compiles the attention of one
device with the release's segment mask (valid_len = tokens - 150: text padding) and prints

    RESULT attention impl=... pass=fwd|fwd_bwd batch=... tokens=... platform=... temp_gib=... compiled=1

with XLA's memory analysis (temporaries per chip). On an accelerator (no --topology) it also runs the
program and adds `ms=` (median of --repeats) and `tflops=`: model FLOPs 4·B·H·L²·D for the forward and
3.5 times that for forward + backward (the recomputation inside the kernels' backward not counted).
`mosaic=1` says the lowered program holds a Pallas TPU (Mosaic) kernel call: splash compiled, not interpreted.

    python benchmarks/attention.py --topology v5e:2x4   # the TPU compiler on a CPU host (libtpu installed)
    python benchmarks/attention.py --topology v6e:2x4
    python benchmarks/attention.py                      # on the accelerator: compile, run and time
    python benchmarks/attention.py --topology v5e:2x4 --mesh sequence=8 --method ring   # a v5e-8 ring

`--mesh` runs it over a device mesh (`sequence` axis: sequence parallelism by `--method`, ring or
ulysses; models/sequence_parallel.py), the inputs split over `sequence` where the tokens divide
(else replicated; the attention pads them); temporaries are per chip.

Default backends: splash and blockwise on TPU (and for --topology), cudnn and blockwise on a GPU.
A compile the TPU compiler refuses for memory prints compiled=0 with the temporaries it asked for.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", help="compile for a TPU slice without having one, e.g. v5e:2x4 (needs libtpu)")
    p.add_argument("--impls", help="comma-separated backends (default: per platform, see above)")
    p.add_argument("--tokens", type=int, default=43242)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batches", default="1,2")
    p.add_argument("--passes", default="fwd,fwd_bwd")
    p.add_argument("--block", type=int, help="block length (default: blockwise 512; splash per TPU generation)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mesh", help="a device mesh, e.g. sequence=8 (default: one device)")
    p.add_argument("--method", default="ring", choices=("ring", "ulysses"),
                   help="sequence parallelism over the mesh's sequence axis")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from m141jax import parallel
    from m141jax.models import splash
    from m141jax.models.sequence_parallel import attend

    if args.topology:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
        device = devices[0]
        platform = args.topology
    else:
        devices = jax.devices()
        device = devices[0]
        platform = f"{device.platform}:{device.device_kind.replace(' ', '_')}"
    tpu = args.topology or device.platform == "tpu"
    impls = (args.impls.split(",") if args.impls
             else ["splash", "blockwise"] if tpu else ["cudnn", "blockwise"] if device.platform == "gpu"
             else ["blockwise"])
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    mesh = parallel.make_mesh(args.mesh or {}, devices if args.mesh else [device])
    method = args.method if args.mesh else "none"
    split = "sequence" if args.tokens % mesh.shape["sequence"] == 0 else None  # else replicated inputs
    length, h, d = args.tokens, args.heads, args.dim
    print(f"attention at {length} tokens x {h} heads x {d} ({args.dtype}) on {platform} ({device.device_kind}), "
          f"mesh {args.mesh or 'one device'}", flush=True)

    for impl in impls:
        block = args.block or (splash.default_block(device.device_kind) if impl == "splash" else 512)
        for b in (int(x) for x in args.batches.split(",")):
            valid = jnp.full((b,), length - 150, jnp.int32)

            def fwd(q, k, v, valid, impl=impl, block=block):
                return attend(q, k, v, valid_len=valid, method=method, impl=impl, block=block)

            def fwd_bwd(q, k, v, valid, dout, fwd=fwd):
                out, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, valid), q, k, v)
                return out, vjp(dout)

            x = jax.ShapeDtypeStruct((b, length, h, d), dtype, sharding=NamedSharding(mesh, P(None, split)))
            lens = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=NamedSharding(mesh, P()))
            for name in args.passes.split(","):
                fn, shapes = (fwd, (x, x, x, lens)) if name == "fwd" else (fwd_bwd, (x, x, x, lens, x))
                flops = 4 * b * h * length * length * d * (1 if name == "fwd" else 3.5)
                line = f"RESULT attention impl={impl} pass={name} batch={b} tokens={length} heads={h} dim={d} " \
                       f"block={block} dtype={args.dtype} platform={platform} mesh={args.mesh or 'single'} " \
                       f"method={method}"
                t0 = time.perf_counter()
                try:
                    with jax.set_mesh(mesh):
                        lowered = jax.jit(fn).lower(*shapes)
                    mosaic = int("tpu_custom_call" in lowered.as_text())  # the Pallas TPU kernel, not interpreted
                    compiled = lowered.compile()
                except Exception as e:  # a TPU compile refuses what does not fit its HBM
                    need = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
                    if "RESOURCE_EXHAUSTED" in str(e) and need:
                        print(f"{line} temp_gib={float(need.group(1)):.2f} compiled=0", flush=True)
                    else:
                        print(f"{line} compiled=0 error={type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                    continue
                compile_s = time.perf_counter() - t0
                temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
                line += f" temp_gib={temp:.2f} compiled=1 mosaic={mosaic} compile_s={compile_s:.1f}"
                if not args.topology:
                    keys = jax.random.split(jax.random.PRNGKey(0), 4)
                    arrays = [jax.device_put(jax.random.normal(k, x.shape, dtype), x.sharding) for k in keys]
                    inputs = (*arrays[:3], jax.device_put(valid, lens.sharding)) + ((arrays[3],) if name != "fwd" else ())
                    jax.block_until_ready(compiled(*inputs))
                    times = []
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        jax.block_until_ready(compiled(*inputs))
                        times.append(time.perf_counter() - t)
                    ms = statistics.median(times) * 1e3
                    line += f" ms={ms:.2f} tflops={flops / (ms * 1e-3) / 1e12:.1f}"
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
