"""Per-device memory of the 13B DMD2 training state on 8 / 64 / 256-device meshes, from shapes only.

The state is built with jax.eval_shape (nothing is allocated): the generator and the fake score in the
model's parameter dtype (fp32 master weights) with their AdamW moments, the discriminator head, and the
frozen bf16 teacher. Each array is placed by the logical-axis rules (m141jax/parallel/rules.py, through
m141jax/train/mesh.py) on an fsdp = every device mesh, and its per-device shard size is summed.

With --compile, the DMD2 step itself is also compiled ahead of time on 8 simulated host devices for a
small clip (a 13B program with a short sequence) and XLA's per-device memory analysis is printed: the
arguments are the state above; the temporaries are the step's activations at that sequence length.

    python benchmarks/dmd_memory.py [--compile]
    RESULT dmd_memory devices=N generator_gib=… generator_opt_gib=… critic_gib=… critic_opt_gib=…
           teacher_gib=… total_gib=…   (one line)
    RESULT dmd_memory_aot devices=8 tokens=… argument_gib=… output_gib=… temp_gib=… alias_gib=…   (--compile)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

GIB = 2 ** 30


def shard_bytes(tree, model, n: int) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs placed by the logical-axis rules on an
    fsdp=n mesh (an abstract mesh: no devices needed)."""
    import jax
    from jax.sharding import AbstractMesh

    from m141jax.axes import MESH_AXES
    from m141jax.train.mesh import state_shardings

    mesh = AbstractMesh((1, n, 1, 1), MESH_AXES)
    shardings = state_shardings(tree, model, mesh)
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def state_table(devices=(8, 64, 256)):
    import dataclasses

    import jax

    from m141jax.models.dit import abstract_params
    from m141jax.train.config import DISTILL_PRESETS
    from m141jax.train.dmd import init_dmd_state

    cfg = DISTILL_PRESETS["magic141-i2v-13b"]
    teacher = abstract_params(dataclasses.replace(cfg.model, param_dtype=cfg.teacher_dtype))
    state = jax.eval_shape(lambda t: init_dmd_state(cfg, t, jax.random.PRNGKey(0)), teacher)
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(teacher))
    parts = {"generator": state.generator, "generator_opt": state.generator_opt, "critic": state.critic,
             "critic_opt": state.critic_opt, "teacher": teacher}
    print(f"13B DMD2 state: DiT {n_params:,} parameters; generator/fake score {cfg.model.param_dtype}, "
          f"teacher {cfg.teacher_dtype}, AdamW moments fp32")
    print("| devices | generator | generator AdamW | fake score + head | critic AdamW | teacher | total / device |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for n in devices:
        gib = {k: shard_bytes(v, cfg.model, n) / GIB for k, v in parts.items()}
        total = sum(gib.values())
        print(f"| {n} | " + " | ".join(f"{gib[k]:.2f} GiB" for k in parts) + f" | **{total:.2f} GiB** |")
        results.append(f"RESULT dmd_memory devices={n} " + " ".join(f"{k}_gib={v:.3f}" for k, v in gib.items())
                       + f" total_gib={total:.3f}")
    print("\n".join(results))
    return cfg, state, teacher


def compile_step(cfg, state, teacher, frames: int, size: int, text_len: int):
    """AOT-compile the generator-turn DMD2 step on the 8 host devices; print XLA's memory analysis."""
    import jax
    import jax.numpy as jnp

    from m141jax.train.dmd import make_dmd_step
    from m141jax.train.mesh import batch_shardings, make_mesh, state_shardings

    mesh = make_mesh()
    n, bs, m = mesh.size, batch_shardings(mesh), cfg.model
    n_txt = text_len - cfg.n_image_tokens
    f32 = jnp.float32
    batch = {"latents": ((n, frames, size, size, m.out_channels), f32),
             "ref_latents": ((n, 1, size, size, m.out_channels), f32),
             "text_states": ((n, text_len, m.text_dim), f32), "text_mask": ((n, text_len), jnp.int32),
             "text_states_2": ((n, m.pooled_dim), f32), "null_text_states": ((n_txt, m.text_dim), f32),
             "null_text_mask": ((n_txt,), jnp.int32), "null_text_states_2": ((m.pooled_dim,), f32)}
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=bs["replicated" if k.startswith("null_") else "batch"])
             for k, (s, d) in batch.items()}

    def place(tree):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                            state_shardings(tree, cfg.model, mesh))

    st, te = place(state), place(teacher)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=bs["replicated"])
    t0 = time.perf_counter()
    step = jax.jit(make_dmd_step(cfg), static_argnums=4, donate_argnums=0,
                   out_shardings=(state_shardings(state, mesh), None))
    compiled = step.lower(st, te, batch, key, True).compile()
    mem = compiled.memory_analysis()
    tokens = frames * (size // 2) ** 2 + text_len
    print(f"AOT compile of the 13B DMD2 step on {n} host devices ({tokens} tokens per clip, batch {n}): "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"RESULT dmd_memory_aot devices={n} tokens={tokens} argument_gib={mem.argument_size_in_bytes / GIB:.3f} "
          f"output_gib={mem.output_size_in_bytes / GIB:.3f} temp_gib={mem.temp_size_in_bytes / GIB:.3f} "
          f"alias_gib={mem.alias_size_in_bytes / GIB:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compile", action="store_true", help="also AOT-compile the step on 8 host devices")
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--size", type=int, default=16, help="latent height = width of the compiled clip")
    p.add_argument("--text-len", type=int, default=16)
    args = p.parse_args()
    if args.compile:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    cfg, state, teacher = state_table()
    if args.compile:
        compile_step(cfg, state, teacher, args.frames, args.size, args.text_len)


if __name__ == "__main__":
    main()
