"""Generation speed.

CPU (always): the compiled 4-step sampler against the PyTorch reference (diffusers'
HunyuanVideoTransformer3DModel with the same weights, driven by the release's Python loop) on a tiny
config, and the time per stage (encoders, T2I, VAE encode, sampling, decode, write) of a whole
text → image → video run with tiny random models.

Accelerator (--accelerator): one 4-step 544×960×81 clip with the 13B presets and random bf16 weights:
seconds per clip and per second of video against the paper's claim (a 5 s clip in 3 s; one minute
of video in one minute) and the FLOP floor of the DiT (anchors: F = L·(24·d²·N + 4·N²·d) per forward).
Without an accelerator, --accelerator only lowers the 13B program (a check that it builds) and prints
the floor.

    python benchmarks/generate.py [--accelerator] [--repeats 3]

Every measurement ends in one `RESULT <name> key=value ...` line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if "--batch" in sys.argv:  # the mesh of the batch section: 8 simulated CPU devices, set before JAX starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_of, result  # noqa: E402

from m141jax import pipeline, sampling  # noqa: E402
from m141jax.config import preset  # noqa: E402
from m141jax.models import dit as dit_lib  # noqa: E402
from m141jax.models.conditioning import Conditioning  # noqa: E402

PAPER_SECONDS_PER_VIDEO_SECOND = 3.0 / 5.0  # "5-second video clips within 3 seconds"
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "v5e": 197.0, "v5 lite": 197.0, "v5p": 459.0,
                    "v6e": 918.0, "v6 lite": 918.0}


def dit_flops(cfg, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one DiT forward: (double + single blocks)·(24·d²·N + 4·N²·d), N = all tokens (anchors §5)."""
    n, d = image_tokens + text_tokens, cfg.hidden_size
    return (cfg.double_blocks + cfg.single_blocks) * (24 * d * d * n + 4 * n * n * d)


def peak_tflops(device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None)


def random_inputs(cfg, batch: int, frames: int, size: tuple[int, int], text_tokens: int, seed: int = 0):
    r = np.random.default_rng(seed)
    h, w = size[0] // 8, size[1] // 8
    text = Conditioning(r.standard_normal((batch, text_tokens, cfg.text_dim), np.float32),
                        np.ones((batch, text_tokens), np.int32), r.standard_normal((batch, cfg.pooled_dim), np.float32))
    noise = r.standard_normal((batch, pipeline.latent_frames(frames), h, w, cfg.out_channels), np.float32)
    ref = r.standard_normal((batch, 1, h, w, cfg.out_channels), np.float32) if cfg.image_conditioned else None
    return noise, ref, text


# ----------------------------------------------------------------------------------------- CPU

def bench_sampler_vs_torch(repeats: int, config: str = "small-i2v", frames: int = 9, size: tuple[int, int] = (128, 128),
                           steps: int = 4) -> None:
    """Our compiled loop against diffusers' transformer in the release's Python loop, same weights, fp32."""
    import torch
    from diffusers import HunyuanVideoTransformer3DModel

    from m141jax.convert import dit as convert_dit

    cfg = preset(config, param_dtype="fp32", dtype="fp32")
    ref_model = HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, num_layers=cfg.double_blocks, num_single_layers=cfg.single_blocks,
        num_refiner_layers=cfg.refiner_blocks, patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
        guidance_embeds=False, text_embed_dim=cfg.text_dim, pooled_projection_dim=cfg.pooled_dim,
        rope_axes_dim=cfg.rope_axes, image_condition_type="latent_concat").eval()
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file
        save_file(ref_model.state_dict(), f"{tmp}/model.safetensors")
        _, params = convert_dit.convert(f"{tmp}/model.safetensors", config, np.float32, progress=False)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    noise, ref, text = random_inputs(cfg, 1, frames, size, 24)
    sigmas = sampling.schedule(steps)

    def ours():
        return sampling.sample(params, cfg, noise, text, sigmas=sigmas, ref_latents=ref)

    x0, r0 = torch.from_numpy(np.moveaxis(noise, -1, 1)), torch.from_numpy(np.moveaxis(ref, -1, 1))
    f = x0.shape[2]
    cond = torch.cat([r0, torch.zeros_like(x0[:, :, 1:])], 2)
    mask = torch.zeros_like(x0[:, :1])
    mask[:, :, 0] = 1
    states, tmask, pooled = (torch.from_numpy(np.asarray(a)) for a in jax.tree.leaves(text))

    def theirs():  # the release's loop: one forward per step, Euler step in fp32
        x = x0.clone()
        with torch.no_grad():
            for i in range(steps):
                v = ref_model(torch.cat([x, cond, mask], 1), torch.full((1,), float(sigmas[i]) * 1000), states, tmask,
                              pooled, return_dict=False)[0]
                x = x + v * float(sigmas[i + 1] - sigmas[i])
        return x

    jax_first, jax_s = best_of(ours, repeats)
    start = time.perf_counter()
    theirs()
    torch_first = time.perf_counter() - start
    torch_s = min(_timed(theirs) for _ in range(repeats))
    err = float(np.abs(np.moveaxis(np.asarray(ours()), -1, 1) - theirs().numpy()).max())
    result("sampler_cpu_vs_torch", config=config, latents=f"{f}x{size[0] // 8}x{size[1] // 8}", steps=steps,
           jax_s=jax_s, jax_first_s=jax_first, torch_s=torch_s, torch_first_s=torch_first, ratio=jax_s / torch_s,
           max_abs_err=err)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_pipeline_cpu(repeats: int) -> None:
    """Time per stage of `m141jax generate`'s text → image → video path (two clips) with tiny random models
    read from a checkpoint folder, after a warm-up run that compiles everything."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures import write_tiny_checkpoints

    from m141jax import components

    settings = pipeline.Settings(frames=17, clip_frames=9, size=(64, 64), t2i_steps=8)
    with tempfile.TemporaryDirectory() as tmp:
        models = components.load_models(write_tiny_checkpoints(Path(tmp) / "ckpt"), with_t2i=True, dtype="fp32")
        runs = []
        for _ in range(repeats + 1):  # the first run compiles
            runs.append(pipeline.Timings())
            pipeline.generate(models, ["a red fox in the snow"], [Path(tmp) / "v.mp4"], settings=settings,
                              timings=runs[-1], progress=False)
    best = min(runs[1:], key=lambda t: sum(t.seconds.values()))
    print(best.summary())
    result("generate_tiny_cpu", frames=settings.frames, clips=len(settings.clips()), size="64x64",
           **{f"{k.replace('-', '_')}_s": v for k, v in best.seconds.items()}, total_s=sum(best.seconds.values()),
           first_run_s=sum(runs[0].seconds.values()))


def bench_start(prompt: str = "a red circle moves to the right", argv: tuple[str, ...] = ("--preset", "demo")) -> None:
    """Seconds of a whole `m141jax generate --preset demo` process (start-up, loading, compilation, the
    stages, the MP4) with an empty persistent compilation cache (cold) and again with the one the first
    run filled (warm: nothing compiles)."""
    import os
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory() as tmp:
        seconds, counts = [], []
        for name in ("cold", "warm"):
            start = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "m141jax", "generate", *argv, "--prompt", prompt, "--quiet",
                                  "--out", str(Path(tmp) / f"{name}.mp4"), "--compilation-cache", str(Path(tmp) / "jax")],
                                 env=env, capture_output=True, text=True)
            seconds.append(time.perf_counter() - start)
            if run.returncode:
                raise SystemExit(f"generate failed ({run.returncode}): {run.stderr[-2000:]}")
            counts.append(re.search(r"compilation: (\d+) program", run.stderr)[1])
    result("generate_start", preset=" ".join(argv).replace("--preset ", ""), cold_s=seconds[0], warm_s=seconds[1],
           compiled_cold=counts[0], compiled_warm=counts[1], ratio=seconds[0] / seconds[1])


def _generate_process(argv: list[str], out: Path) -> tuple[float, int]:
    """(seconds, peak resident set in bytes) of one `m141jax generate` process (`os.wait4`'s rusage of that
    child alone); its standard error ends up in out.log."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "m141jax", "generate", *argv, "--quiet", "--out", str(out)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"generate failed ({os.waitstatus_to_exitcode(status)}): {log.read_text()[-2000:]}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024  # Linux reports KiB


def bench_rss(clips: int = 6, size: str = "128x128", prompt: str = "a red circle moving right") -> None:
    """Peak host memory (RSS) of a 1-clip and a `clips`-clip `m141jax generate --preset demo` video, each
    in a fresh process with a warm compilation cache (a first run fills it), so both load and compile
    alike: the sliding window carries only the reference frames from clip to clip, so the peak should
    not grow with the number of clips. clip_mib: one clip's decoded float32 frames, what each clip would
    add if clips were held."""
    import math

    frames = lambda n: 17 + 16 * (n - 1)  # noqa: E731 - the demo's 17-frame clips, each later one adds 16
    with tempfile.TemporaryDirectory() as tmp:
        base = ["--preset", "demo", "--prompt", prompt, "--size", size, "--compilation-cache", str(Path(tmp) / "jax")]
        _generate_process([*base, "--frames", "17"], Path(tmp) / "warm.mp4")
        (s1, rss1), (sn, rssn) = (_generate_process([*base, "--frames", str(frames(n))], Path(tmp) / f"{n}.mp4")
                                  for n in (1, clips))
    h, w = (int(x) for x in size.split("x"))
    result("generate_rss", preset="demo", size=size, clips=f"1,{clips}", frames=f"17,{frames(clips)}",
           rss_1_mib=rss1 / 2**20, rss_n_mib=rssn / 2**20, growth=rssn / rss1 - 1,
           clip_mib=17 * h * w * 3 * 4 / 2**20, seconds_1=s1, seconds_n=sn, flat=int(math.isclose(rssn, rss1, rel_tol=0.1)))


def bench_batch(prompts: int = 8, spec: str = "data=8", repeats: int = 1) -> None:
    """Videos per minute of a JSON Lines batch (`serve.run_batch`: text → image → video, 5 frames of 64×64)
    of `prompts` tiny-model prompts, on one device and on a `spec` mesh of 8 simulated CPU devices (the
    batch's rows split over its data axis), after a first run that compiles; best of `repeats`. Simulated
    devices share this host's cores, so the ratio says what splitting costs here, not an accelerator's speed-up."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures import write_tiny_checkpoints

    from m141jax import components, parallel, serve

    settings = pipeline.Settings(frames=5, clip_frames=5, size=(64, 64), t2i_steps=4)
    rate = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoints(Path(tmp) / "ckpt")
        for name, mesh in [("one", None), ("mesh", parallel.make_mesh(spec))]:
            models = components.load_models(ckpt, with_t2i=True, dtype="fp32", mesh=mesh)
            times = []
            for run in range(repeats + 1):  # the first run compiles
                out = Path(tmp) / f"{name}{run}"
                out.mkdir()
                requests = [serve.Request(f"a shape number {i} moving", out / f"{i:03d}.mp4", i) for i in range(prompts)]
                start = time.perf_counter()
                counts = serve.run_batch(models, requests, settings, out / serve.MANIFEST, log=lambda s: None)
                times.append(time.perf_counter() - start)
                if counts["done"] != prompts:
                    raise SystemExit(f"batch run: {counts}")
            rate[name] = prompts / min(times[1:]) * 60
    result("generate_batch", prompts=prompts, frames=settings.frames, size="64x64", devices=len(jax.devices()),
           mesh=spec, videos_per_min_one_device=rate["one"], videos_per_min_mesh=rate["mesh"],
           ratio=rate["mesh"] / rate["one"])


# ----------------------------------------------------------------------------------------- accelerator

def bench_13b(repeats: int, frames: int = 81, size: tuple[int, int] = (544, 960), steps: int = 4,
              lower_only: bool = False) -> None:
    """One 4-step clip with the released 13B I2V DiT (random bf16 weights), then the VAE decode and the
    T2I stage, one model on the device at a time."""
    device = jax.devices()[0]
    cfg = preset("magic141-i2v-13b")
    noise, ref, text = random_inputs(cfg, 1, frames, size, 402)
    sigmas = sampling.schedule(steps)
    image_tokens = noise.shape[1] * noise.shape[2] * noise.shape[3] // 4
    flops = steps * dit_flops(cfg, image_tokens, 402)
    video_seconds = frames / 24
    if lower_only:
        shape = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
        start = time.perf_counter()
        sampling.denoise.lower(dit_lib.abstract_params(cfg), cfg, shape(noise), shape(sigmas), shape(ref),
                               jax.tree_util.tree_map(shape, text), None, jax.ShapeDtypeStruct((), jnp.float32), None)
        result("generate_13b_sampling", status="not_measured_here", device=device.platform,
               lowered_s=time.perf_counter() - start, pflop=flops / 1e15, floor_h100_s=flops / 989.4e12,
               paper_clip_s=PAPER_SECONDS_PER_VIDEO_SECOND * video_seconds)
        return
    first, clip_s = _time_13b_sampler(cfg, repeats, noise, text, sigmas, ref)
    per_video_second = clip_s / video_seconds
    peak = peak_tflops(device)
    floor = {"floor_s": flops / (peak * 1e12), "mfu": flops / (peak * 1e12) / clip_s} if peak else {}
    result("generate_13b_sampling", device=device.device_kind.replace(" ", "_"), frames=frames,
           size=f"{size[0]}x{size[1]}", steps=steps, clip_s=clip_s, first_call_s=first,
           per_video_second_s=per_video_second, paper_per_video_second_s=PAPER_SECONDS_PER_VIDEO_SECOND,
           ratio=per_video_second / PAPER_SECONDS_PER_VIDEO_SECOND, pflop=flops / 1e15,
           tflops_per_s=flops / clip_s / 1e12, **floor)
    _bench_13b_decode(repeats, noise)
    _bench_13b_t2i(repeats, size)
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result("generate_13b_memory", device=device.device_kind.replace(" ", "_"),
               peak_gib=stats["peak_bytes_in_use"] / 2**30)


def _time_13b_sampler(cfg, repeats: int, noise, text, sigmas, ref, embedded_guidance=None) -> tuple[float, float]:
    """(first call, best later call) seconds of the sampler with random bf16 weights made on the device;
    the weights are freed on return."""
    params = dit_lib.init_params(cfg, jax.random.PRNGKey(0))
    return best_of(lambda: sampling.sample(params, cfg, noise, text, sigmas=sigmas, ref_latents=ref,
                                           embedded_guidance=embedded_guidance), repeats)


def _bench_13b_decode(repeats: int, noise) -> None:
    from m141jax.config import VAE_PRESETS
    from m141jax.models import vae as vae_lib

    vcfg = VAE_PRESETS["hunyuan-vae"]
    vae = pipeline.Component(vcfg, vae_lib.init_params(vcfg, jax.random.PRNGKey(1)))
    first, s = best_of(lambda: pipeline.decode_frames(vae, noise), repeats)
    result("generate_13b_decode", latents="x".join(map(str, noise.shape[1:4])), decode_s=s, first_call_s=first)


def _bench_13b_t2i(repeats: int, size: tuple[int, int], steps: int = 50) -> None:
    cfg = preset("hunyuan-t2v-13b")
    noise, _, text = random_inputs(cfg, 1, 1, size, 256)
    first, s = _time_13b_sampler(cfg, repeats, noise, text, sampling.schedule(steps, 7.0), None, embedded_guidance=6.0)
    result("generate_13b_t2i", size=f"{size[0]}x{size[1]}", steps=steps, t2i_s=s, first_call_s=first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accelerator", action="store_true", help="the 13B section (lowering only without a GPU/TPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-cpu", action="store_true", help="only the accelerator section")
    p.add_argument("--start", action="store_true", help="only the cold / warm start of `generate --preset demo`")
    p.add_argument("--rss", action="store_true", help="only the peak host memory of a 1-clip and a 6-clip demo video")
    p.add_argument("--batch", action="store_true",
                   help="only videos per minute of a tiny-model JSON Lines batch, one device against data=8")
    args = p.parse_args()
    if args.batch:
        return bench_batch(repeats=args.repeats)
    if args.start:
        return bench_start()
    if args.rss:
        return bench_rss()
    if not args.skip_cpu:
        bench_start()
        bench_sampler_vs_torch(args.repeats)
        bench_pipeline_cpu(args.repeats)
    if args.accelerator:
        bench_13b(args.repeats, lower_only=jax.default_backend() == "cpu")


if __name__ == "__main__":
    main()
