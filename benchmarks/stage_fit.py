"""Does each stage of the 13B text → video path fit one chip? Compiled for a single chip with abstract inputs.

    python benchmarks/stage_fit.py --topology v5e:2x2            # one chip of a v5e slice (needs libtpu)
    python benchmarks/stage_fit.py --topology v5e:2x2 --modes int4 --stages dit

Stages of `m141jax generate` at 544×960×81, batch 1, as `--low-memory` runs them (one component's
weights on the chip at a time):

- encoders: the LLaVA-Llama-3-8B prompt encoder (351 tokens), CLIP-L (77 tokens) and the VLM image
  tokens (the image prompt); the three share the stage's resident weights, so the stage peak is
  every encoder weight + the largest program's (arguments − its weights + outputs + temporaries);
- t2i: the 13B T2V DiT at one latent frame, 50 steps with embedded guidance (the compiled sampler);
- dit: the 13B I2V DiT, the 4-step sampler over 21 latent frames (43,242 tokens);
- vae_decode: the largest tile of the tiled VAE decode (17 × 32 × 32 latents), plus the frames the
  tiling holds between tile programs (every tile's output and the joined float32 clip: an upper bound).

Weights (`--modes`): bf16, int8, int4 as `m141jax generate --quantize` makes them
(`compress.quant.quantize_one`): the DiTs' blocks in the mode (other DiT kernels int8), the encoders
int8 whenever quantized, the VAE unchanged. One line per stage and mode:

    RESULT stage_fit stage=… weights=bf16|int8|int4 weights_gib=… peak_gib=… fits_v5e=0|1 fits_v6e=0|1

then per mode the resident total (every component's weights on the chip + the largest stage's work
space) against the staged maximum (`--low-memory`: the largest stage peak), and for each stage that
does not fit a v5e by how much and what would make it fit. peak = arguments + outputs + temporaries −
aliased; a chip fits when peak ≤ 90 % of its HBM (v5e 16 GiB, v6e 32 GiB). A compile the TPU compiler
refuses for lack of memory reports the memory it asked for (`compiled=0`). Without --topology the local
backend compiles (CPU: XLA upcasts bf16 weights, so its figures overestimate an accelerator's).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HBM_GIB = {"v5e": 16, "v6e": 32}
HEADROOM = 0.9  # the runtime's share of HBM is left free
LLM_TOKENS = 351  # the prompt encoder's input: the 'video' template (95 tokens) + the 256-token prompt window
CLIP_TOKENS = 77
VLM_TEXT_TOKENS = 153  # the image-only VLM prompt's text tokens (its image token expands to the image features)
STAGES = ("encoders", "t2i", "dit", "vae_decode")
SKIP_LAYER = 2  # m141jax.encoders.SKIP_LAYER (that module needs Pillow, which a bare jax[tpu] venv lacks)


@dataclasses.dataclass
class EncoderWeights:
    """The fields of `m141jax.encoders.Encoders` that `quant.quantize_encoders` reads."""

    llm: object
    clip: object
    vlm: object
    params: dict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", help="TPU slice whose first chip is compiled for, e.g. v5e:2x2 (needs libtpu)")
    p.add_argument("--modes", default="bf16,int8,int4")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--size", default="544x960x81", help="HxWxFRAMES of the clip")
    p.add_argument("--attention", default="splash", help="DiT attention backend (splash: what a TPU runs)")
    p.add_argument("--block", type=int, default=512, help="attention block length")
    p.add_argument("--dit", default="magic141-i2v-13b")
    p.add_argument("--t2i", default="hunyuan-t2v-13b")
    p.add_argument("--vae", default="hunyuan-vae")
    p.add_argument("--llava", default="llava-llama-3-8b")
    p.add_argument("--clip", default="clip-l")
    p.add_argument("--t2i-steps", type=int, default=50)
    return p.parse_args(argv)


def gib(n: float) -> float:
    return n / 2**30


def nbytes(tree) -> int:
    import jax
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from m141jax import parallel, sampling
    from m141jax.compress import quant
    from m141jax.config import CLIP_TEXT_PRESETS, LLAVA_PRESETS, VAE_PRESETS, dtype_of, preset
    from m141jax.models import clip, dit, llama, llava, vae
    from m141jax.models import vae_tiling as tiling
    from m141jax.models.conditioning import Conditioning
    from m141jax.prompts import MAX_LENGTH

    if args.topology:
        from jax.experimental import topologies
        device = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices[0]
    else:
        device = jax.devices()[0]
    mesh = parallel.make_mesh("data=1", [device])
    whole = NamedSharding(mesh, P())
    target = args.topology.split(":")[0] if args.topology else None
    h, w, frames = (int(x) for x in args.size.split("x"))
    modes, stages = args.modes.split(","), args.stages.split(",")
    for name in stages:
        if name not in STAGES:
            raise SystemExit(f"error: unknown stage {name!r}; accepted: {', '.join(STAGES)}")
    for mode in modes:
        if mode not in ("bf16", *quant.MODES):
            raise SystemExit(f"error: unknown weights {mode!r}; accepted: bf16, {', '.join(quant.MODES)}")
    print(f"stages at {h}x{w}x{frames}, batch 1, on one {device.device_kind} ({args.topology or device.platform})",
          flush=True)

    def placed(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), tree)

    def compile_peak(fn, *inputs) -> tuple[float, bool, float]:
        """(peak GiB, compiled, seconds) of fn on the chip: a refusal gives the memory the compiler asked for."""
        start = time.perf_counter()
        jitted = parallel.jit_sharded(fn, mesh, whole, whole, batch=1)
        try:
            m = jitted.lower(*(placed(x) for x in inputs)).compile().memory_analysis()
            peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
            return gib(peak), True, time.perf_counter() - start
        except jax.errors.JaxRuntimeError as e:
            need = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
            if "RESOURCE_EXHAUSTED" not in str(e) or not need:
                raise
            return float(need.group(1)), False, time.perf_counter() - start

    def dit_weights(cfg, mode):
        params = dit.abstract_params(cfg)
        return params if mode == "bf16" else jax.eval_shape(lambda p: quant.quantize_dit(p, cfg, mode), params)

    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    lh, lw, lf = h // 8, w // 8, (frames - 1) // 4 + 1

    def text(cfg, n):
        return Conditioning(f32(1, n, cfg.text_dim), i32(1, n), f32(1, cfg.pooled_dim))

    def stage_dit(mode):
        cfg = preset(args.dit, attention=args.attention, attention_block=args.block)
        params = dit_weights(cfg, mode)
        steps = sampling.schedule(4)
        fn = lambda p, x, s, r, c: sampling.denoise(p, cfg, x, s, r, c, None, jnp.float32(1.0), None)  # noqa: E731
        peak, ok, s = compile_peak(fn, params, f32(1, lf, lh, lw, cfg.out_channels), f32(len(steps)),
                                   f32(1, 1, lh, lw, cfg.out_channels), text(cfg, 402))
        return peak, ok, s, gib(nbytes(params))

    def stage_t2i(mode):
        cfg = preset(args.t2i, attention=args.attention, attention_block=args.block)
        params = dit_weights(cfg, mode)
        fn = lambda p, x, s, c, g: sampling.denoise(p, cfg, x, s, None, c, None, jnp.float32(1.0), g)  # noqa: E731
        peak, ok, s = compile_peak(fn, params, f32(1, 1, lh, lw, cfg.out_channels), f32(args.t2i_steps + 1),
                                   text(cfg, 256), f32(1))
        return peak, ok, s, gib(nbytes(params))

    def stage_encoders(mode):
        vcfg, ccfg = LLAVA_PRESETS[args.llava], CLIP_TEXT_PRESETS[args.clip]
        params = {**llava.abstract_params(vcfg), "clip": clip.abstract_params(ccfg)}
        if mode != "bf16":  # the encoders are int8 whenever the DiTs are quantized (`quant.quantize_one`)
            bundle = EncoderWeights(llm=vcfg.text, clip=ccfg, vlm=vcfg, params=params)
            params = jax.eval_shape(lambda p: quant.quantize_encoders(dataclasses.replace(bundle, params=p),
                                                                      "int8").params, params)
        lm = params["language_model"]
        crop = LLM_TOKENS - MAX_LENGTH
        vlm_tokens = VLM_TEXT_TOKENS + vcfg.image_seq_length
        size = vcfg.vision.image_size
        programs = [  # (fn, its weights, its other inputs)
            (lambda p, i, m: llama.hidden_states(p, vcfg.text, i, m, SKIP_LAYER)[:, crop:], lm,
             (i32(1, LLM_TOKENS), i32(1, LLM_TOKENS))),
            (lambda p, i, m: clip.text_forward(p, ccfg, i, m)[1], params["clip"],
             (i32(1, CLIP_TOKENS), i32(1, CLIP_TOKENS))),
            (lambda p, i, px: llava.llava_forward(p, vcfg, i, jnp.ones_like(i), px),  # the 146 kept tokens: after
             {k: v for k, v in params.items() if k != "clip"}, (i32(1, vlm_tokens), f32(1, size, size, 3))),
        ]
        total, work, ok, seconds = nbytes(params), 0.0, True, 0.0
        for fn, weights, inputs in programs:
            peak, compiled, s = compile_peak(fn, weights, *inputs)
            work, ok, seconds = max(work, peak - gib(nbytes(weights))), ok and compiled, seconds + s
        return gib(total) + work, ok, seconds, gib(total)

    def stage_vae_decode(mode):
        cfg = VAE_PRESETS[args.vae]
        params = vae.abstract_params(cfg)
        rules = tiling.decode_rules(cfg)
        tile = (1, min(lf, rules.time.tile), min(lh, rules.space.tile), min(lw, rules.space.tile), cfg.latent_channels)
        z = jax.ShapeDtypeStruct(tile, dtype_of(cfg.dtype))
        peak, ok, s = compile_peak(lambda p, x: vae.decode_tile(p, cfg, x), params, z)
        # held between tile programs: every tile's output (an upper bound) and the joined clip in float32
        out = jax.eval_shape(lambda p, x: vae.decode(p, cfg, x), params, f32(1, lf, lh, lw, cfg.latent_channels))
        tiles = len(tiling.starts(lf, rules.time.stride)) if lf > rules.time.tile - 1 else 1
        per = jax.eval_shape(lambda p, x: vae.decode_tile(p, cfg, x), params, z)
        spatial = len(tiling.starts(lh, rules.space.stride)) * len(tiling.starts(lw, rules.space.stride))
        held = tiles * spatial * nbytes(per) + nbytes(out)
        return peak + gib(held), ok, s, gib(nbytes(params))

    run = dict(encoders=stage_encoders, t2i=stage_t2i, dit=stage_dit, vae_decode=stage_vae_decode)
    # what a stage's weights are in each mode: the VAE is never quantized, the encoders only to int8
    as_run = dict(encoders=lambda m: "bf16" if m == "bf16" else "int8", vae_decode=lambda m: "bf16")
    table, compiled = {}, {}
    for mode in modes:
        for name in stages:
            key = (name, as_run.get(name, str)(mode))
            if key not in compiled:
                compiled[key] = run[name](key[1])
            peak, ok, seconds, weights = compiled[key]
            fits = {c: ok or c != target for c in HBM_GIB}
            fits = {c: fits[c] and peak <= HEADROOM * cap for c, cap in HBM_GIB.items()}
            table[mode, name] = (peak, weights, fits)
            print(f"RESULT stage_fit stage={name} weights={mode} platform={args.topology or device.platform} "
                  f"weights_gib={weights:.2f} peak_gib={peak:.2f} compiled={int(ok)} "
                  + " ".join(f"fits_{c}={int(v)}" for c, v in fits.items()) + f" compile_s={seconds:.0f}",
                  flush=True)
        done = [n for n in stages if (mode, n) in table]
        staged = max(table[mode, n][0] for n in done)
        resident = sum(table[mode, n][1] for n in done) + max(table[mode, n][0] - table[mode, n][1] for n in done)
        print(f"RESULT stage_fit_total weights={mode} stages={'+'.join(done)} resident_gib={resident:.2f} "
              f"staged_gib={staged:.2f} "
              + " ".join(f"fits_{c}_resident={int(resident <= HEADROOM * cap)} "
                         f"fits_{c}_staged={int(staged <= HEADROOM * cap)}" for c, cap in HBM_GIB.items()),
              flush=True)
    print("\n| stage | weights | weights (GiB) | peak (GiB) | " + " | ".join(f"{c} {g} GiB" for c, g in HBM_GIB.items())
          + " |\n|---|---|---|---|" + "---|" * len(HBM_GIB))
    for (mode, name), (peak, weights, fits) in table.items():
        print(f"| {name} | {mode} | {weights:.2f} | {peak:.2f} | "
              + " | ".join("yes" if fits[c] else "no" for c in HBM_GIB) + " |")
    for (mode, name), (peak, _, fits) in table.items():
        if not fits["v5e"]:
            better = [m for m in ("bf16", *quant.MODES) if (m, name) in table and table[m, name][2]["v5e"]]
            how = (f"weights={better[0]}" if better else
                   f"{math.ceil(peak / (HEADROOM * HBM_GIB['v5e']))} chips sharing it (benchmarks/fit.py meshes)")
            print(f"{name} with {mode} weights: {peak - HEADROOM * HBM_GIB['v5e']:.2f} GiB over a v5e's "
                  f"{HEADROOM * HBM_GIB['v5e']:.1f} usable GiB; fits with {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
