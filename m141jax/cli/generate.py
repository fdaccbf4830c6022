"""`m141jax generate`: prompts (+ an optional first frame) -> MP4 videos, clip by clip.

Everything that can be checked without the models (frame counts, sizes, the image, the prompts, the
checkpoint folder's components) is checked before any weights are read.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax

from m141jax import components, demo, media, pipeline, presets, serve
from m141jax.cli import devices
from m141jax.compress import quant
from m141jax.prompts import MAX_LENGTH

# defaults of the flags below per --preset: the release's full-size models, or the demo shipped in the
# package (tiny models trained on the shapes dataset by tools/train_demo.py)
PRESETS = {
    "release": dict(checkpoints="checkpoints", frames=81, clip_frames=81, fps=24, size=None, steps=4, shift=5.0,
                    t2i_steps=50, t2i_shift=7.0, t2i_guidance=6.0, t2i_cfg=1.0, t2i_cfg_sigma=0.0,
                    dtype="bf16", text_length=MAX_LENGTH),
    "demo": dict(checkpoints=str(demo.CHECKPOINTS), **demo.GENERATE),
}


def read_prompts(args) -> list[str]:
    """The --prompt, or the lines of --prompts-file (blank lines and lines starting with '#' skipped)."""
    if args.prompts_file is None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        return [args.prompt]
    try:
        lines = Path(args.prompts_file).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"prompts file {args.prompts_file} cannot be read ({e.strerror})") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {args.prompts_file} holds no prompt (one per line)")
    return prompts


def output_paths(out: str, n: int) -> list[Path]:
    """--out for one prompt; OUT_000.mp4, OUT_001.mp4, ... for a batch."""
    path = Path(out)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out} must end in .mp4")
    paths = [path] if n == 1 else [path.with_name(f"{path.stem}_{i:03d}{path.suffix}") for i in range(n)]
    return [media.check_output(p) for p in paths]


def settings_from(args) -> pipeline.Settings:
    frames = pipeline.frames_for_seconds(args.seconds, args.fps) if args.seconds is not None else args.frames
    return pipeline.Settings(
        frames=frames, clip_frames=args.clip_frames, steps=args.steps, shift=args.shift, guidance=args.guidance,
        seed=args.seed, size=media.parse_size(args.size) if args.size else None, fps=args.fps,
        reference_mean=args.reference_mean, t2i_steps=args.t2i_steps, t2i_shift=args.t2i_shift,
        t2i_guidance=args.t2i_guidance, t2i_cfg=args.t2i_cfg, t2i_cfg_sigma=args.t2i_cfg_sigma,
        t2i_template=args.t2i_template)


def apply_preset(args) -> None:
    """Fill every flag left unset from the --preset's defaults."""
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def load(args, with_t2i: bool, mesh=None) -> components.Models:
    """The models of the checkpoint folder on the --mesh, quantized by --quantize, staged by --low-memory."""
    mesh = devices.mesh_from_args(args) if mesh is None else mesh
    where = dict(dtype=args.dtype, mesh=mesh, sequence_parallel=args.sequence_parallel, max_length=args.text_length)
    if args.low_memory:
        return components.load_staged(args.checkpoints, with_t2i, quantize=args.quantize, **where)
    models = components.load_models(args.checkpoints, with_t2i=with_t2i, **where)
    return quant.quantize_models(models, args.quantize) if args.quantize else models


def main_interactive(args, settings: pipeline.Settings) -> int:
    """--interactive: load once, then one video per line of standard input until its end."""
    output_paths(args.out, 1)  # checked before loading
    if args.image is not None:
        media.open_image(args.image)  # checked before loading
    models = load(args, with_t2i=(Path(args.checkpoints) / "t2i").is_dir())
    done, errors = serve.interactive(models, settings, sys.stdin, args.out, ask=sys.stdin.isatty(),
                                     default_image=args.image)
    print(f"{done} video(s), {errors} error(s)", file=sys.stderr)
    return 0


def main_jsonl(args, settings: pipeline.Settings) -> int:
    """A JSON Lines --prompts-file: resumable batches of equal shape, recorded in manifest.jsonl."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be positive")
    entries = serve.read_jsonl(args.prompts_file, args.out)
    mesh = devices.mesh_from_args(args)
    local = mesh is None or all(d.process_index == jax.process_index() for d in mesh.devices.flat)
    index, count = (jax.process_index(), jax.process_count()) if local else (0, 1)
    entries = serve.host_share(entries, index, count)
    if args.image is not None:  # the first frame of the entries that name none
        entries = [dataclasses.replace(e, image=e.image or args.image) if isinstance(e, serve.Request) else e
                   for e in entries]
    needs_t2i = any(isinstance(e, serve.Request) and e.image is None for e in entries)
    models = load(args, with_t2i=needs_t2i, mesh=mesh)
    counts = serve.run_batch(models, entries, settings, serve.manifest_path(Path(args.out).parent, index, count),
                             batch_size=args.batch_size, progress=not args.quiet)
    print(f"{counts['done']} video(s) written, {counts['skipped']} already done, {counts['failed']} failed",
          file=sys.stderr)
    return 1 if counts["failed"] else 0


@pipeline.interruptible()
def main(args) -> int:
    apply_preset(args)
    settings = settings_from(args)
    if args.interactive:
        return main_interactive(args, settings)
    if serve.is_jsonl(args.prompts_file):
        return main_jsonl(args, settings)
    prompts = read_prompts(args)
    outputs = output_paths(args.out, len(prompts))
    images = vlm_images = None
    if args.image is not None:
        original = media.open_image(args.image)
        first = media.fit_image(original, settings.size)
        images, vlm_images = [first] * len(prompts), [original] * len(prompts)
    models = load(args, with_t2i=images is None)
    timings = pipeline.Timings()
    clips = len(settings.clips())
    print(f"{len(prompts)} prompt(s), {settings.frames} frames in {clips} clip(s) of {settings.clip_frames}, "
          f"{settings.steps} steps", file=sys.stderr)
    try:
        paths = pipeline.generate(models, prompts, outputs, images=images, vlm_images=vlm_images, settings=settings,
                                  timings=timings, progress=not args.quiet)
    except pipeline.ClipError as e:
        print(f"error: {e}", file=sys.stderr)
        print(timings.summary(), file=sys.stderr)
        return e.exit_code
    print(timings.summary(), file=sys.stderr)
    if isinstance(models, components.StagedModels):
        print(models.summary(), file=sys.stderr)
    for p in paths:
        print(f"wrote {p}: {settings.frames} frames at {settings.fps} fps")
    return 0


class _ConfigDefaults(argparse.Action):
    """--config FILE: the file's settings (`m141jax.presets`) replace the defaults of the flags not given
    on the command line: flags after --config win, and so do flags before it that differ from their default."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            settings = presets.load_generate_config(values)
        except ValueError as e:
            parser.error(str(e))
        actions = {a.dest: a for a in parser._actions}
        for dest, value in settings.items():
            action = actions[dest]
            if value is not None and action.choices is not None and value not in action.choices:
                parser.error(f"{values}: {dest}={value!r}; accepted: {', '.join(map(str, action.choices))}")
            if getattr(namespace, dest) == action.default:  # else given on the command line before --config
                setattr(namespace, dest, value)
        setattr(namespace, self.dest, values)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="text (+ first frame) -> MP4 video; long videos by a sliding window",
                       description="Generate videos with the 4-step image-to-video DiT. Without --image the first "
                                   "frame comes from the text-to-image stage.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text prompt")
    src.add_argument("--prompts-file", help="a text file with one prompt per line: one batch, one compiled program; "
                                            "or JSON Lines (*.jsonl: prompt, image, seed, frames, out per line): "
                                            "batches of equal shape, resumable, recorded in manifest.jsonl beside --out")
    src.add_argument("--interactive", action="store_true",
                     help="load the models once, then make one video per line of standard input: "
                          "'prompt [| image path [| seed]]'; end of input quits")
    p.add_argument("--batch-size", type=int, help="JSON Lines prompts file: at most this many videos per batch "
                                                  "(default: every prompt of one shape)")
    p.add_argument("--image", help="the first frame (any size: fitted to its 540p aspect bucket or --size)")
    p.add_argument("--config", action=_ConfigDefaults,
                   help="a YAML file of settings (configs/generate/*.yaml: flag names without dashes) used as the "
                        "defaults of these flags; flags on the command line win")
    p.add_argument("--preset", choices=sorted(PRESETS), default="release",
                   help="defaults of the flags marked [preset]: 'release' (the full-size models in --checkpoints) "
                        "or 'demo' (the tiny shapes models shipped in the package: 32x32, 17-frame clips, 8 fps)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--frames", type=int, help="video frames, 4k+1 [preset: release 81 = 21 latent frames]")
    n.add_argument("--seconds", type=float, help="video length in seconds (rounded up to 4k+1 frames at --fps)")
    p.add_argument("--clip-frames", type=int, help="frames per sliding-window clip, 4k+1 [preset: release 81]")
    p.add_argument("--steps", type=int, help="sampling steps of the video stage [preset: 4]")
    p.add_argument("--shift", type=float, help="flow-matching time shift of the video stage [preset: release 5.0]")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale of the video stage (> 1 runs a negative "
                                                               "branch; default 1.0, CFG is distilled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", help="HxW, multiples of 16 [preset: release: the image's 540p bucket, 544x960 "
                                  "without image]")
    p.add_argument("--fps", type=int, help="frame rate of the MP4 [preset: release 24]")
    p.add_argument("--reference-mean", action="store_true",
                   help="encode the first frame with the VAE posterior mean instead of a sample")
    p.add_argument("--t2i-steps", type=int, help="sampling steps of the text-to-image stage [preset: release 50]")
    p.add_argument("--t2i-shift", type=float, help="time shift of the text-to-image stage [preset: release 7.0]")
    p.add_argument("--t2i-guidance", type=float,
                   help="embedded guidance scale of the text-to-image stage [preset: release 6.0]")
    p.add_argument("--t2i-cfg", type=float,
                   help="CFG scale of the text-to-image stage against the empty prompt (> 1 runs that branch; for "
                        "a T2I DiT trained with CFG dropout) [preset: release 1.0 (none: guidance-distilled), demo 4.0]")
    p.add_argument("--t2i-cfg-sigma", type=float,
                   help="--t2i-cfg only on the steps from σ ≥ this, in [0, 1] (a guidance interval: CFG at low σ "
                        "sharpens noise) [preset: release 0.0 = every step]")
    p.add_argument("--t2i-template", choices=("video", "image"), default="video",
                   help="HunyuanVideo prompt template of the text-to-image stage: 'video' (as the video stage) or "
                        "'image' (what HunyuanVideo uses for one frame)")
    p.add_argument("--checkpoints", help="folder of converted checkpoints (see README) [preset: release "
                                         "'checkpoints', demo: the package's demo folder]")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="parameter and activation dtype [preset: release bf16]")
    p.add_argument("--text-length", type=int, help="prompt tokens the text encoder keeps after its template "
                                                   f"[preset: release {MAX_LENGTH}]")
    p.add_argument("--quantize", choices=quant.MODES,
                   help="weight-only quantization after loading, as the release: the DiTs' blocks in int8 or int4 "
                        "(other DiT kernels int8), the text encoders int8")
    p.add_argument("--low-memory", action="store_true",
                   help="staged residency: only the running stage's weights on the device (encoders, then the T2I "
                        "DiT, then the I2V DiT, then the VAE), the others in host memory; same videos")
    p.add_argument("--out", default="video.mp4", help="output MP4 (a batch writes OUT_000.mp4, OUT_001.mp4, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    devices.add_mesh_args(p)
    p.set_defaults(func=main)
