"""`python tools/convert_torch_weights.py COMPONENT --src SRC --dst DST ...`: PyTorch -> Orbax.

Everything that can be checked without reading weights comes first (DST, stale partial folders, the
config JSON); then the component's converter streams the weights and the checkpoint is written
atomically. Bad input ends with one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import jax

from m141jax import checkpoint
from m141jax.config import to_json_dict
from m141jax.convert import COMPONENTS, DTYPES
from m141jax.convert.configs import check_config_source
from m141jax.convert.destination import check_destination, clean_stale_partials
from m141jax.convert.plan import nonfinite_allowed


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_torch_weights.py", description="Convert PyTorch weights (release or "
                                "diffusers/HF names) to an m141jax Orbax checkpoint.")
    p.add_argument("component", choices=sorted(COMPONENTS))
    p.add_argument("--src", required=True, help="a .pt/.pth/.bin/.safetensors file or a model directory")
    p.add_argument("--dst", required=True, help="the Orbax checkpoint directory to create")
    p.add_argument("--config", help="a config JSON (release constructor arguments or diffusers/HF config.json) "
                                    "or a preset name; default: the folder's config.json, else the release preset")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored parameter dtype (default bf16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is an m141jax checkpoint of the same component (still atomically); "
                        "any other existing DST is refused")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or Inf (refused by default, naming the tensors)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    t0 = time.time()
    try:
        # everything that can be checked without reading weights, first
        dst = check_destination(args.dst, args.component, args.src, args.overwrite)
        removed, notes = clean_stale_partials(dst, started=t0)
        if removed:
            print(f"removed {len(removed)} stale partial folder(s) of {dst} left by interrupted runs: "
                  f"{', '.join(p.name for p in removed)}", flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
        check_config_source(args.component, args.config, args.src)
        module = importlib.import_module(COMPONENTS[args.component])
        with nonfinite_allowed(args.allow_nonfinite):
            cfg, params = module.convert(args.src, args.config, DTYPES[args.dtype], progress=not args.quiet)
        dst = checkpoint.save(dst, args.component, to_json_dict(cfg), params, overwrite=args.overwrite)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    leaves = jax.tree_util.tree_leaves(params)
    gb = sum(x.nbytes for x in leaves) / 1e9
    print(f"wrote {dst}: {len(leaves)} arrays, {gb:.3f} GB ({args.dtype}) in {time.time() - t0:.1f} s")
    return 0
