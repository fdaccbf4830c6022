"""`python -m m141jax parity COMPONENT`: run one component on PyTorch-layout inputs from an .npz file.

The array names and layouts are the public contract in the README; every array is float32 unless
integer by nature, and channel-first [B, C, F, H, W] as PyTorch has it.
"""

from __future__ import annotations

import argparse
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m141jax import checkpoint, parallel, sampling
from m141jax.cli import devices
from m141jax.io import load_npz as _load_npz
from m141jax.io import save_npz
from m141jax.models.clip import text_forward
from m141jax.models.conditioning import FIELDS, Conditioning
from m141jax.models.dit import dit_forward
from m141jax.models.llama import hidden_states
from m141jax.models.llava import check_image_tokens, llava_forward
from m141jax.models.vae import decode, encode

MASKS = ("text_mask", "neg_text_mask", "attention_mask")  # masks that must keep at least one token per row


def load_npz(path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays of the inputs file, refused with one line when a floating array holds NaN / Inf or a
    mask row keeps no token (the output would be all NaN)."""
    z = _load_npz(path, required, optional)
    for name, x in z.items():
        if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
            bad = int(np.size(x) - np.isfinite(x).sum())
            raise ValueError(f"{path}: {name} holds {bad} non-finite value(s) (NaN/Inf) of {np.size(x)}")
        if name in MASKS and x.ndim == 2 and not np.asarray(x != 0).any(axis=1).all():
            rows = np.flatnonzero(~np.asarray(x != 0).any(axis=1)).tolist()
            raise ValueError(f"{path}: {name} row(s) {rows} mask out every token (all zero)")
    return z


def check_outputs(component: str, out: dict[str, np.ndarray]) -> None:
    for name, x in out.items():
        if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.isfinite(x).all():
            raise ValueError(f"parity {component} produced non-finite values (NaN/Inf) in {name}: a broken "
                             f"checkpoint or input; nothing written")


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, np.ndarray]]] = {}


def runner(name: str):
    def register(fn):
        RUNNERS[name] = fn
        return fn
    return register


def to_channels_last(x):
    """[B, C, F, H, W] -> [B, F, H, W, C]."""
    return jnp.moveaxis(jnp.asarray(x), 1, -1)


def to_channels_first(x) -> np.ndarray:
    """[B, F, H, W, C] -> [B, C, F, H, W] as float32 numpy."""
    return np.asarray(jnp.moveaxis(x, -1, 1), np.float32)


def load_checked(args, *components: str):
    """(config, params) of the checkpoint in args.checkpoint, one of `components`, in args.dtype."""
    return checkpoint.load(args.checkpoint, components, args.dtype)[1:]


def load_dit(args):
    """(config, params) of the DiT checkpoint, placed on args.device_mesh when given (with the
    --sequence-parallel method for that mesh)."""
    return checkpoint.load(args.checkpoint, ("dit",), args.dtype, mesh=args.device_mesh,
                           sequence_parallel=args.sequence_parallel)[1:]


@runner("dit")
def run_dit(args) -> dict[str, np.ndarray]:
    mesh = args.device_mesh
    z = load_npz(args.inputs, ("latents", "timestep", "text_states", "text_mask", "text_states_2"),
                 ("ref_latents", "guidance"))
    inputs = (to_channels_last(z["latents"]), jnp.asarray(z["timestep"], jnp.float32),
              Conditioning(jnp.asarray(z["text_states"], jnp.float32), jnp.asarray(z["text_mask"], jnp.int32),
                           jnp.asarray(z["text_states_2"], jnp.float32)),
              to_channels_last(z["ref_latents"]) if "ref_latents" in z else None,
              jnp.asarray(z["guidance"], jnp.float32) if "guidance" in z else None)
    cfg, params = load_dit(args)
    if mesh is None:
        return {"velocity": to_channels_first(jax.jit(lambda p, *a: dit_forward(p, cfg, *a))(params, *inputs))}
    batch = inputs[0].shape[0]
    shardings = jax.tree.map(lambda x: x.sharding, params)
    fwd = parallel.dit_forward_fn(cfg, mesh, batch, shardings)
    rows = lambda x: parallel.put(x, parallel.batch_sharding(mesh, x.ndim, batch))  # noqa: E731
    v = fwd(params, *jax.tree.map(rows, inputs))
    return {"velocity": to_channels_first(parallel.gather(v))}


@runner("sample")
def run_sample(args) -> dict[str, np.ndarray]:
    """The whole sampling loop: --steps/--shift schedule, --guidance as CFG scale (neg_* arrays needed
    when > 1) or, for a DiT with a guidance embedding, as its embedded guidance scale."""
    cfg, params = load_dit(args)
    cfg_on = not cfg.guidance_embed and sampling.uses_cfg(args.guidance)
    neg = tuple(f"neg_{k}" for k in FIELDS) if cfg_on else ()
    z = load_npz(args.inputs, ("noise", *FIELDS, *neg), ("ref_latents",))
    sigmas = sampling.schedule(args.steps, args.shift)
    latents = sampling.sample(
        params, cfg, to_channels_last(z["noise"]), Conditioning.from_batch(z), sigmas=sigmas,
        ref_latents=to_channels_last(z["ref_latents"]) if "ref_latents" in z else None,
        neg_text=Conditioning.from_batch(z, "neg_") if cfg_on else None,
        guidance_scale=1.0 if cfg.guidance_embed else args.guidance,
        embedded_guidance=args.guidance if cfg.guidance_embed else None, mesh=args.device_mesh)
    return {"latents": to_channels_first(latents), "timesteps": sampling.timesteps(sigmas), "sigmas": sigmas}


@runner("vae-encode")
def run_vae_encode(args) -> dict[str, np.ndarray]:
    cfg, params = load_checked(args, "vae")
    video = load_npz(args.inputs, ("video",))["video"]
    mean, logvar = encode(params, cfg, to_channels_last(video), tiling=args.tiling == "on")
    return {"latent_mean": to_channels_first(mean), "latent_logvar": to_channels_first(logvar)}


@runner("vae-decode")
def run_vae_decode(args) -> dict[str, np.ndarray]:
    cfg, params = load_checked(args, "vae")
    latents = load_npz(args.inputs, ("latents",))["latents"]
    return {"video": to_channels_first(decode(params, cfg, to_channels_last(latents), tiling=args.tiling == "on"))}


@runner("llm")
def run_llm(args) -> dict[str, np.ndarray]:
    """A Llama (an `llm` checkpoint, or the language model of a `vlm` one): hidden_states[-(K+1)]."""
    kind, cfg, params = checkpoint.load(args.checkpoint, ("llm", "vlm"), args.dtype)
    if kind == "vlm":
        cfg, params = cfg.text, params["language_model"]
    z = load_npz(args.inputs, ("input_ids", "attention_mask"))
    fwd = jax.jit(lambda p, ids, m: hidden_states(p, cfg, ids, m, args.skip_layer))
    return {"hidden_states": np.asarray(fwd(params, jnp.asarray(z["input_ids"], jnp.int32),
                                            jnp.asarray(z["attention_mask"], jnp.int32)), np.float32)}


@runner("clip")
def run_clip(args) -> dict[str, np.ndarray]:
    cfg, params = load_checked(args, "clip")
    z = load_npz(args.inputs, ("input_ids", "attention_mask"))
    last, pooled = jax.jit(lambda p, ids, m: text_forward(p, cfg, ids, m))(
        params, jnp.asarray(z["input_ids"], jnp.int32), jnp.asarray(z["attention_mask"], jnp.int32))
    return {"pooled": np.asarray(pooled, np.float32), "last_hidden_state": np.asarray(last, np.float32)}


@runner("vlm")
def run_vlm(args) -> dict[str, np.ndarray]:
    """LLaVA on expanded input_ids (one image token per feature position): the last layer after the norm."""
    cfg, params = load_checked(args, "vlm")
    z = load_npz(args.inputs, ("input_ids", "attention_mask", "pixel_values"))
    check_image_tokens(cfg, z["input_ids"], z["pixel_values"].shape[0])
    pixels = jnp.moveaxis(jnp.asarray(z["pixel_values"], jnp.float32), 1, -1)  # [N, 3, H, W] -> [N, H, W, 3]
    out = jax.jit(lambda p, ids, m, px: llava_forward(p, cfg, ids, m, px))(
        params, jnp.asarray(z["input_ids"], jnp.int32), jnp.asarray(z["attention_mask"], jnp.int32), pixels)
    return {"hidden_states": np.asarray(out, np.float32)}


def add_parser(sub) -> None:
    p = sub.add_parser("parity", help="run one component on .npz inputs in PyTorch layout (parity checks)")
    p.add_argument("component", choices=sorted(RUNNERS))
    p.add_argument("--checkpoint", required=True, help="an Orbax checkpoint made by tools/convert_torch_weights.py")
    p.add_argument("--inputs", required=True, help="input .npz (array names per component: see README)")
    p.add_argument("--output", required=True, help="output .npz, written atomically")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--steps", type=int, default=4, help="sample: number of Euler steps")
    p.add_argument("--shift", type=float, default=5.0, help="sample: flow-matching time shift")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="sample: CFG scale (> 1 runs the neg_* branch), or the embedded guidance scale of a DiT "
                        "with a guidance embedding")
    p.add_argument("--tiling", choices=("on", "off"), default="on",
                   help="vae-encode / vae-decode: the release's spatial and temporal tiling (default on, as released)")
    p.add_argument("--skip-layer", type=int, default=2,
                   help="llm: output hidden_states[-(K+1)] (0: last layer after the final norm; default 2, the release's)")
    devices.add_mesh_args(p)
    p.set_defaults(func=main)


SHARDED = ("dit", "sample")  # the runners that take --mesh


def main(args) -> int:
    if args.mesh is not None and args.component not in SHARDED:
        raise ValueError(f"--mesh is supported for {', '.join(SHARDED)}, not {args.component!r}")
    args.device_mesh = devices.mesh_from_args(args)  # first: multi-host set-up precedes any JAX work
    out = RUNNERS[args.component](args)
    check_outputs(args.component, out)
    if jax.process_index() != 0:  # every process computes, process 0 writes
        return 0
    save_npz(args.output, out)
    print(f"wrote {args.output}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in out.items()))
    return 0
