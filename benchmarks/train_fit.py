"""Does a 13B flow-matching step, DMD2 generator turn and DMD2 critic turn fit a TPU slice? Compiled with
abstract inputs by the real TPU compiler (no TPU needed, libtpu importable):

    python benchmarks/train_fit.py --topology v6e:8x8          # a v6e-64 slice
    python benchmarks/train_fit.py --topology v5p:4x4x4 --steps flow

Each step uses the mesh, remat policy and gradient accumulation of its config file
(configs/train/magic141-i2v-13b.yaml, configs/distill/magic141-i2v-13b-dmd2.yaml; --mesh / --videos /
overrides change them), the I2V DiT at 544×960×81 (43,242 tokens with 402 text tokens). One line per step:

    RESULT train_fit topology=… step=flow|dmd_generator|dmd_critic mesh=… videos=N host_state=… peak_gib=…
           args_gib=… host_args_gib=… hbm_gib=… fits=0|1 xla_tflop=… model_tflop=… est_step_s_at_50pct=…

peak = arguments + outputs + temporaries − aliased, per chip; fits = compiled and peak ≤ 90 % of HBM;
args / host_args = the step's arguments in device / host memory per chip: `optimizer.state_memory=host` (an
`optimizer.` override applies to both DMD2 optimizers) moves the optimizer state from the first to the second;
model_tflop from the jaxpr's analytic count (`train.observe.step_flops`), xla_tflop from cost_analysis();
est_step_s_at_50pct = model_tflop / (50 % of the chips' bf16 peak × chips): an estimate, no TPU runs.
The activations, the part of the peak that grows with the batch, scale with the micro-batch (videos /
accumulate): `--videos 128 accumulate=8` asks whether 16 videos per micro-batch fit.
Without --topology it compiles for the local devices (CPU: simulated, `--devices`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

HBM_GIB = {"v5e": 16, "v6e": 32, "v5p": 95}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", help="TPU slice, e.g. v6e:8x8 or v5p:4x4x4 (needs libtpu)")
    p.add_argument("--steps", default="flow,dmd_generator,dmd_critic")
    p.add_argument("--mesh", help="mesh for every step (default: each config file's)")
    p.add_argument("--videos", type=int, help="global batch (default: the config's data.batch_size)")
    p.add_argument("--size", default="544x960x81")
    p.add_argument("--text-len", type=int, default=402)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--attention", help="the DiT's attention backend, e.g. splash (default: the config's, auto)")
    p.add_argument("--train-config", default=os.path.join(ROOT, "configs/train/magic141-i2v-13b.yaml"))
    p.add_argument("--distill-config", default=os.path.join(ROOT, "configs/distill/magic141-i2v-13b-dmd2.yaml"))
    p.add_argument("overrides", nargs="*", help="config overrides for both files, e.g. model.remat=dots accumulate=2")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.topology:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
    sys.path.insert(0, ROOT)

    import dataclasses
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from m141jax import parallel
    from m141jax.models.dit import abstract_params
    from m141jax.train import dmd, flow, observe
    from m141jax.train.config import DISTILL_PRESETS, TRAIN_PRESETS, load_run_config
    from m141jax.train.dmd import init_dmd_state, make_dmd_step
    from m141jax.train.flow import init_train_state, make_train_step
    from m141jax.train.mesh import dit_config, state_shardings, strategy

    if args.topology:
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    else:
        devices = jax.devices()[:args.devices]
    chip = args.topology.split(":")[0] if args.topology else None
    hbm = HBM_GIB.get(chip)
    h, w, frames = (int(x) for x in args.size.split("x"))
    over = [*args.overrides, *([f"data.batch_size={args.videos}"] if args.videos else []), "data.source=synthetic",
            *([f"model.attention={args.attention}"] if args.attention else [])]

    def setup(presets, path):
        opts = ("generator_optimizer", "critic_optimizer") if presets is DISTILL_PRESETS else ("optimizer",)
        # an `optimizer.` override sets every optimizer of the config (both of DMD2's)
        mine = [x for x in over if not x.startswith("optimizer.")]
        mine += [o + x[len("optimizer"):] for x in over if x.startswith("optimizer.") for o in opts]
        cfg = load_run_config(presets, path, mine)
        mesh = parallel.make_mesh(args.mesh or cfg.mesh or "fsdp=-1", devices)
        return dataclasses.replace(cfg, model=dit_config(cfg.model, mesh)), mesh

    def batch_of(cfg, mesh, n_img):
        m, b, n_null = cfg.model, cfg.data.batch_size, args.text_len - n_img
        f, lh, lw = (frames - 1) // 4 + 1, h // 8, w // 8
        shapes = {"latents": ((b, f, lh, lw, m.out_channels), jnp.float32),
                  "ref_latents": ((b, 1, lh, lw, m.out_channels), jnp.float32),
                  "text_states": ((b, args.text_len, m.text_dim), jnp.float32),
                  "text_mask": ((b, args.text_len), jnp.int32), "text_states_2": ((b, m.pooled_dim), jnp.float32),
                  "null_text_states": ((n_null, m.text_dim), jnp.float32), "null_text_mask": ((n_null,), jnp.int32),
                  "null_text_states_2": ((m.pooled_dim,), jnp.float32)}
        return {k: jax.ShapeDtypeStruct(s, d, sharding=(NamedSharding(mesh, P()) if k.startswith("null_") else
                                                        parallel.batch_sharding(mesh, len(s), b)))
                for k, (s, d) in shapes.items()}

    def compile_step(name, cfg, mesh, fn, state, consts, count, n_img, host):
        videos = cfg.data.batch_size
        st = strategy(mesh, cfg.run.shard_min_size, host)
        place = lambda tree: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,  # noqa: E731
                                          state_shardings(tree, cfg.model, mesh, st))
        state, consts = place(state), tuple(place(c) for c in consts)
        batch = batch_of(cfg, mesh, n_img)
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
        rep = NamedSharding(mesh, P())
        sh = lambda t: jax.tree.map(lambda a: a.sharding, t)  # noqa: E731
        jitted = parallel.jit_sharded(lambda s, cs, b, r: fn(s, *cs, b, r), mesh,
                                      (sh(state), sh(consts), sh(batch), rep), (sh(state), rep),
                                      batch=videos // cfg.accumulate, donate_argnums=0)
        model_tflop = count(state, *consts, batch, rng) / 1e12
        t0 = time.perf_counter()
        try:
            compiled = jitted.lower(state, consts, batch, rng).compile()
            m = compiled.memory_analysis()
            peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes) / 2**30
            arg_gib, host_arg_gib = m.argument_size_in_bytes / 2**30, m.host_argument_size_in_bytes / 2**30
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            xla = (cost or {}).get("flops", float("nan")) * len(devices) / 1e12
            ok = True
        except jax.errors.JaxRuntimeError as e:
            need = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
            if "RESOURCE_EXHAUSTED" not in str(e) or not need:
                raise
            peak, xla, ok = float(need.group(1)), float("nan"), False
            arg_gib = host_arg_gib = float("nan")
        fits = ok and (hbm is None or peak <= 0.9 * hbm)
        chip_peak = observe.peak_flops(devices[0])  # an estimate: model FLOPs at half the chips' bf16 peak
        estimate = model_tflop * 1e12 / (0.5 * chip_peak * len(devices)) if chip_peak else float("nan")
        spec = ",".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1)
        print(f"RESULT train_fit topology={args.topology or devices[0].platform} step={name} mesh={spec} "
              f"videos={videos} remat={cfg.model.remat} accumulate={cfg.accumulate} attention={cfg.model.attention} "
              f"sequence_parallel={cfg.model.sequence_parallel} host_state={','.join(host) or 'none'} "
              f"peak_gib={peak:.2f} args_gib={arg_gib:.2f} host_args_gib={host_arg_gib:.2f} hbm_gib={hbm or 'nan'} "
              f"fits={int(fits)} xla_tflop={xla:.1f} model_tflop={model_tflop:.1f} "
              f"est_step_s_at_50pct={estimate:.1f} compile_s={time.perf_counter() - t0:.0f}", flush=True)

    wanted = args.steps.split(",")
    if "flow" in wanted:
        cfg, mesh = setup(TRAIN_PRESETS, args.train_config)
        state = jax.eval_shape(lambda: init_train_state(cfg, abstract_params(cfg.model)))
        count = make_train_step(observe.model_flops_config(cfg))
        compile_step("flow", cfg, mesh, make_train_step(cfg), state, (),
                     lambda s, b, r: observe.step_flops(count, s, b, r), cfg.flow.n_image_tokens, flow.host_fields(cfg))
    if {"dmd_generator", "dmd_critic"} & set(wanted):
        cfg, mesh = setup(DISTILL_PRESETS, args.distill_config)
        teacher = abstract_params(dataclasses.replace(cfg.model, param_dtype=cfg.teacher_dtype))
        state = jax.eval_shape(functools.partial(init_dmd_state, cfg), teacher, jax.random.PRNGKey(0))
        step, count = make_dmd_step(cfg), make_dmd_step(observe.model_flops_config(cfg))
        for name, turn in (("dmd_generator", True), ("dmd_critic", False)):
            if name in wanted:
                compile_step(name, cfg, mesh, lambda s, t, b, r, turn=turn: step(s, t, b, r, turn), state, (teacher,),
                             lambda s, t, b, r, turn=turn: observe.step_flops(count, s, t, b, r, turn,
                                                                               static_argnums=4),
                             cfg.n_image_tokens, dmd.host_fields(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
