"""PyTorch -> Orbax weight conversion: `python tools/convert_torch_weights.py COMPONENT --src --dst ...`.

Each component module exposes `convert(src, config, dtype, progress) -> (config dataclass, params)`;
this module parses the command line, checks, and writes the checkpoint atomically.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import jax
import ml_dtypes
import numpy as np

# component name -> module holding its `convert`
COMPONENTS = {
    "dit": "m141jax.convert.dit",
    "vae": "m141jax.convert.vae",
    "llm": "m141jax.convert.llama",
    "clip": "m141jax.convert.clip",
    "vlm": "m141jax.convert.llava",
}
DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_torch_weights.py",
                                description="Convert PyTorch weights (release or diffusers/HF names) to an m141jax Orbax checkpoint.")
    p.add_argument("component", choices=sorted(COMPONENTS))
    p.add_argument("--src", required=True, help="a .pt/.pth/.bin/.safetensors file or a model directory")
    p.add_argument("--dst", required=True, help="the Orbax checkpoint directory to create")
    p.add_argument("--config", help="a config JSON (release constructor arguments or diffusers/HF config.json) "
                                    "or a preset name; default: the folder's config.json, else the release preset")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored parameter dtype (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (still atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from m141jax import checkpoint
    from m141jax.config import to_json_dict

    t0 = time.time()
    try:
        module = importlib.import_module(COMPONENTS[args.component])
        cfg, params = module.convert(args.src, args.config, DTYPES[args.dtype], progress=not args.quiet)
        dst = checkpoint.save(args.dst, args.component, to_json_dict(cfg), params, overwrite=args.overwrite)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    leaves = jax.tree_util.tree_leaves(params)
    gb = sum(x.nbytes for x in leaves) / 1e9
    print(f"wrote {dst}: {len(leaves)} arrays, {gb:.3f} GB ({args.dtype}) in {time.time() - t0:.1f} s")
    return 0
