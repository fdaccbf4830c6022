"""`python -m m141jax parity COMPONENT`: run one component on PyTorch-layout inputs from an .npz file.

The array names and layouts are the public contract in the README; every array is float32 unless
integer by nature, and channel-first [B, C, F, H, W] as PyTorch has it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m141jax import checkpoint, sharding
from m141jax.io import load_npz, save_npz

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


def runtime_dtypes(cfg, dtype: str):
    """The config with parameters and activations in `dtype` (fp32 | bf16)."""
    return dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)


@runner("dit")
def run_dit(args) -> dict[str, np.ndarray]:
    from m141jax.config import DiTConfig, dtype_of, from_json_dict
    from m141jax.models.dit import dit_forward

    mesh = args.device_mesh
    meta = checkpoint.read_meta(args.checkpoint, "dit")
    cfg = runtime_dtypes(from_json_dict(DiTConfig, meta["config"]), args.dtype)
    z = load_npz(args.inputs, ("latents", "timestep", "text_states", "text_mask", "text_states_2"),
                 ("ref_latents", "guidance"))
    inputs = (to_channels_last(z["latents"]), to_channels_last(z["ref_latents"]) if "ref_latents" in z else None,
              jnp.asarray(z["timestep"], jnp.float32), jnp.asarray(z["text_states"], jnp.float32),
              jnp.asarray(z["text_mask"], jnp.int32), jnp.asarray(z["text_states_2"], jnp.float32),
              jnp.asarray(z["guidance"], jnp.float32) if "guidance" in z else None)
    if mesh is None:
        params = checkpoint.load_params(args.checkpoint, dtype=dtype_of(cfg.param_dtype))
        return {"velocity": to_channels_first(jax.jit(lambda p, *a: dit_forward(p, cfg, *a))(params, *inputs))}
    cfg = dataclasses.replace(cfg, sequence_parallel=sharding.sequence_parallel_method(cfg, mesh,
                                                                                       args.sequence_parallel))
    shardings = sharding.dit_param_shardings(cfg, mesh, checkpoint.abstract_tree(args.checkpoint))
    params = checkpoint.load_params(args.checkpoint, dtype=dtype_of(cfg.param_dtype), shardings=shardings)
    batch = inputs[0].shape[0]
    fwd = sharding.dit_forward_fn(cfg, mesh, batch, shardings)
    rows = lambda x: None if x is None else sharding.put(x, sharding.batch_sharding(mesh, x.ndim, batch))
    v = fwd(params, *map(rows, inputs))
    return {"velocity": to_channels_first(sharding.gather(v))}


def add_parser(sub) -> None:
    p = sub.add_parser("parity", help="run one component on .npz inputs in PyTorch layout (parity checks)")
    p.add_argument("component", choices=sorted(RUNNERS))
    p.add_argument("--checkpoint", required=True, help="an Orbax checkpoint made by tools/convert_torch_weights.py")
    p.add_argument("--inputs", required=True, help="input .npz (array names per component: see README)")
    p.add_argument("--output", required=True, help="output .npz, written atomically")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    sharding.add_mesh_args(p)
    p.set_defaults(func=main)


def main(args) -> int:
    args.device_mesh = sharding.mesh_from_args(args)  # first: multi-host set-up precedes any JAX work
    out = RUNNERS[args.component](args)
    if jax.process_index() != 0:  # every process computes, process 0 writes
        return 0
    save_npz(args.output, out)
    print(f"wrote {args.output}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in out.items()))
    return 0
