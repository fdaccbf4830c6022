"""VAE speed and memory.

CPU (always): encode and decode of the same random inputs with the same random weights in JAX (converted
by our converter) and in PyTorch (diffusers' AutoencoderKLHunyuanVideo), fp32, untiled, at a tiny and a
small size, of 9-frame videos and of batches of 4 single images (`_image`); on a CPU backend, one 3D conv's
forward + backward by XLA's native conv and by `vae.conv3d`'s CPU path, 2D convs over the time taps
(`vae_conv3d_cpu`), and the demo VAE's training steps (`vae_demo_train_step`: one on 2 whole 17-frame
clips, one on 16 single frames, as `m141jax.demo.recipe.train_vae` alternates them).
ratio = jax_s / torch_s, JAX time / PyTorch time (below 1: JAX is faster), in every line
that has one; `threads` is the fixed CPU thread count of both (`--threads`, default: every core the
process may use) and `torch_device` where PyTorch ran.

AOT (always, unless --skip-aot): XLA's memory analysis of the compiled tile functions of the released
VAE in bf16: the 17×32×32-latent decode tile (-> 65×256×256 frames) and the 65×256×256 encode tile; and
XLA's FLOP count of one 544×960 image's encode and decode, untiled (`vae_*_image_flops_aot`). A
tiled 544×960×81 decode runs one such tile at a time, so its peak is about this plus the parameters and
the finished tiles. On a CPU backend XLA upcasts bf16 convolutions to fp32 (extra fp32 copies of the
largest activations), so there the figure overstates what a GPU/TPU needs.

Accelerator (only when a GPU/TPU is present): a 544×960×81 decode (21×68×120 latents) and a 544×960
image encode with the released config, bf16 random weights and the release's tiling: seconds and peak
device memory; with a CUDA build of torch, diffusers (release tiling) on the same weights and inputs.

    python benchmarks/vae.py [--repeats 3] [--skip-aot]

Every measurement ends in one `RESULT <name> key=value ...` line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_of, fix_threads, result  # noqa: E402

from m141jax.config import VAE_PRESETS, preset  # noqa: E402
from m141jax.convert import vae as convert_vae  # noqa: E402
from m141jax.models import vae  # noqa: E402

# name -> (preset, video [B, F, H, W, 3] to encode, latents [B, f, h, w, C] to decode)
CPU_SIZES = {"tiny": ("tiny-vae", (1, 9, 64, 64, 3), (1, 3, 8, 8, 16)),
             "small": ("small-vae", (1, 9, 96, 96, 3), (1, 3, 12, 12, 16)),
             "tiny_image": ("tiny-vae", (4, 1, 64, 64, 3), (4, 1, 8, 8, 16)),
             "small_image": ("small-vae", (4, 1, 96, 96, 3), (4, 1, 12, 12, 16))}
THREADS = None  # set by main: the CPU thread count both frameworks use
REAL_LATENTS = (1, 21, 68, 120, 16)  # 544×960×81
REAL_IMAGE = (1, 1, 544, 960, 3)
REAL_IMAGE_LATENTS = (1, 1, 68, 120, 16)
DECODE_TILE, ENCODE_TILE = (1, 17, 32, 32, 16), (1, 65, 256, 256, 3)


def diffusers_vae(cfg, seed: int = 0):
    """diffusers' VAE of the same architecture, randomly initialised."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    return diffusers.AutoencoderKLHunyuanVideo(
        latent_channels=cfg.latent_channels, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor).eval()


def converted(ref, preset_name: str, dtype):
    """Our parameters from the diffusers model, through the converter (safetensors in a temp folder)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "vae.safetensors"
        save_file({k: v.detach().float().contiguous() for k, v in ref.state_dict().items()}, src)
        params = convert_vae.convert(str(src), preset_name, dtype, progress=False)[1]
    return jax.tree_util.tree_map(jnp.asarray, params)


def torch_best_of(fn, repeats: int) -> tuple[float, float]:
    import torch

    def timed():
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    out, first = timed()
    return out, first, min(timed()[1] for _ in range(repeats))


def channels_first(x):
    import torch

    return torch.from_numpy(np.moveaxis(np.asarray(x, np.float32), -1, 1).copy())


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def cpu_section(repeats: int) -> None:
    for name, (preset_name, video_shape, latent_shape) in CPU_SIZES.items():
        cfg = preset(preset_name, VAE_PRESETS, dtype="fp32", param_dtype="fp32")
        ref = diffusers_vae(cfg)
        ref.use_framewise_encoding = ref.use_framewise_decoding = False  # untiled, as vae.encode(tiling=False)
        params = converted(ref, preset_name, np.float32)
        rng = np.random.default_rng(0)
        video = rng.uniform(-1, 1, video_shape).astype(np.float32)
        z = rng.standard_normal(latent_shape).astype(np.float32)

        first, jax_s = best_of(lambda: vae.encode(params, cfg, jnp.asarray(video), tiling=False)[0], repeats)
        want, torch_first, torch_s = torch_best_of(lambda: ref.encode(channels_first(video)).latent_dist.mean, repeats)
        err = rel_err(vae.encode(params, cfg, jnp.asarray(video), tiling=False)[0], np.moveaxis(want.numpy(), 1, -1))
        result(f"vae_encode_{name}", preset=preset_name, video="x".join(map(str, video_shape[1:4])), jax_s=jax_s,
               jax_first_s=first, torch_s=torch_s, torch_first_s=torch_first, ratio=jax_s / torch_s, rel_err=err,
               threads=THREADS, torch_device="cpu")

        first, jax_s = best_of(lambda: vae.decode(params, cfg, jnp.asarray(z), tiling=False), repeats)
        want, torch_first, torch_s = torch_best_of(lambda: ref.decode(channels_first(z)).sample, repeats)
        err = rel_err(vae.decode(params, cfg, jnp.asarray(z), tiling=False), np.moveaxis(want.numpy(), 1, -1))
        result(f"vae_decode_{name}", preset=preset_name, latents="x".join(map(str, latent_shape[1:4])), jax_s=jax_s,
               jax_first_s=first, torch_s=torch_s, torch_first_s=torch_first, ratio=jax_s / torch_s, rel_err=err,
               threads=THREADS, torch_device="cpu")


def conv_section(repeats: int) -> None:
    """Why the CPU backend runs 3D convs frame by frame (`vae.conv3d`): forward + backward of one conv of
    the demo VAE's first block (2 clips of 17×32×32 frames, causally padded, 8 -> 8 channels) by XLA's
    native 3D conv and by 2D convs over the time taps, at stride 1 and at the downsamplers' stride 2."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 19, 34, 34, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 8, 8)), jnp.float32)
    for stride in ((1, 1, 1), (2, 2, 2)):
        times = {}
        for name, conv in (("xla", vae._conv3d_xla), ("by_frames", vae._conv3d_by_frames)):
            grad = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w, stride, None) ** 2), (0, 1)))
            times[name] = best_of(lambda grad=grad: grad(x, w), repeats)[1]
        result("vae_conv3d_cpu", input="2x19x34x34x8", stride="x".join(map(str, stride)),
               xla_ms=times["xla"] * 1e3, by_frames_ms=times["by_frames"] * 1e3,
               speedup=times["xla"] / times["by_frames"], threads=THREADS)


def demo_train_section(repeats: int) -> None:
    """Milliseconds of the demo VAE's two training steps: `recipe.train_vae`'s loss and weights under plain Adam
    (the recipe adds gradient clipping and a schedule, elementwise work beside the convs)."""
    import optax

    from m141jax.demo import recipe
    from m141jax.train import vae as vae_train

    cfg, tx = recipe.VAE, optax.adam(1e-3)
    step = jax.jit(vae_train.make_vae_step(cfg, tx, recipe.KL_WEIGHT, recipe.FOREGROUND_WEIGHT, recipe.EDGE_WEIGHT,
                                           recipe.LATENT_NOISE, recipe.FOREGROUND_MARGIN))
    state = vae_train.init_vae_state(vae.init_params(cfg, jax.random.PRNGKey(0)), tx)
    rng, times = np.random.default_rng(0), {}
    for name, shape in (("clip", (2, 17, 32, 32, 3)), ("image", (recipe.IMAGE_BATCH, 1, 32, 32, 3))):
        x = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
        times[name] = best_of(lambda x=x: step(state, x, jax.random.PRNGKey(1))[1], repeats)[1]
    result("vae_demo_train_step", clip_ms=times["clip"] * 1e3, image_ms=times["image"] * 1e3,
           pair_ms=(times["clip"] + times["image"]) * 1e3, threads=THREADS)


def aot_section() -> None:
    """Memory analysis of the compiled bf16 tile functions of the released VAE (nothing is run)."""
    cfg = preset("hunyuan-vae", VAE_PRESETS)
    params = vae.abstract_params(cfg)
    param_gb = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)) / 1e9
    for name, fn, shape in (("decode", vae.decode_tile, DECODE_TILE), ("encode", vae.encode_tile, ENCODE_TILE)):
        start = time.perf_counter()
        compiled = fn.lower(params, cfg, jax.ShapeDtypeStruct(shape, jnp.bfloat16)).compile()
        m = compiled.memory_analysis()
        total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 1e9
        result(f"vae_{name}_tile_memory_aot", backend=jax.default_backend(), tile="x".join(map(str, shape[1:4])),
               temp_gb=m.temp_size_in_bytes / 1e9, args_gb=m.argument_size_in_bytes / 1e9,
               output_gb=m.output_size_in_bytes / 1e9, total_gb=total, params_gb=param_gb,
               compile_s=time.perf_counter() - start)
    for name, fn, shape in (("encode", vae.encode_tile, REAL_IMAGE), ("decode", vae.decode_tile, REAL_IMAGE_LATENTS)):
        cost = fn.lower(params, cfg, jax.ShapeDtypeStruct(shape, jnp.bfloat16)).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        result(f"vae_{name}_image_flops_aot", backend=jax.default_backend(), shape="x".join(map(str, shape[1:4])),
               tflop=cost["flops"] / 1e12)


def accelerator_section(repeats: int) -> None:
    """544×960×81 decode and 544×960 encode, released config, bf16, release tiling."""
    import torch

    device = jax.devices()[0]
    cfg = preset("hunyuan-vae", VAE_PRESETS)
    ref = diffusers_vae(cfg)
    params = converted(ref, "hunyuan-vae", jnp.bfloat16)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal(REAL_LATENTS), jnp.bfloat16)
    image = jnp.asarray(rng.uniform(-1, 1, REAL_IMAGE), jnp.bfloat16)

    first, jax_s = best_of(lambda: vae.decode(params, cfg, z), repeats)
    peak = device.memory_stats().get("peak_bytes_in_use", 0) / 1e9 if device.memory_stats() else float("nan")
    extra = dict(torch_device="none")  # a CPU PyTorch at this size would take hours: not measured
    if torch.cuda.is_available():
        tiled = release_tiled(ref.to("cuda", torch.bfloat16), cfg)
        zt = channels_first(np.asarray(z, np.float32)).to("cuda", torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
        _, _, torch_s = torch_best_of(lambda: tiled.decode(zt).sample, repeats)
        extra = dict(torch_s=torch_s, torch_peak_gb=torch.cuda.max_memory_allocated() / 1e9, ratio=jax_s / torch_s,
                     torch_device="cuda")
    result("vae_decode_544x960x81", device=device.device_kind.replace(" ", "_"), jax_s=jax_s, jax_first_s=first,
           peak_gb=peak, **extra)

    first, jax_s = best_of(lambda: vae.encode(params, cfg, image)[0], repeats)
    extra = dict(torch_device="none")
    if torch.cuda.is_available():
        xt = channels_first(np.asarray(image, np.float32)).to("cuda", torch.bfloat16)
        _, _, torch_s = torch_best_of(lambda: tiled.encode(xt).latent_dist.mean, repeats)
        extra = dict(torch_s=torch_s, ratio=jax_s / torch_s, torch_device="cuda")
    result("vae_encode_544x960_image", device=device.device_kind.replace(" ", "_"), jax_s=jax_s, jax_first_s=first,
           **extra)


def release_tiled(ref, cfg):
    """diffusers with the release's tiling (release.md D.5b): tiles and strides passed explicitly."""
    s, t = cfg.sample_size, cfg.sample_tsize
    ref.enable_tiling(s, s, t, int(s * 0.75), int(s * 0.75), int(t * 0.75))
    return ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-aot", action="store_true", help="skip compiling the full-size tile functions")
    p.add_argument("--threads", type=int, help="CPU threads of JAX and PyTorch (default: every core the process may use)")
    args = p.parse_args()
    global THREADS
    THREADS = fix_threads(args.threads)
    cpu_section(args.repeats)
    if jax.default_backend() == "cpu":
        conv_section(max(args.repeats, 10))
        demo_train_section(max(args.repeats, 10))
    if not args.skip_aot:
        aot_section()
    if jax.default_backend() in ("gpu", "tpu"):
        accelerator_section(max(1, args.repeats // 3))
    else:
        result("vae_decode_544x960x81", device="none", status="not_measured_here")


if __name__ == "__main__":
    main()
