"""`m141jax quantize` and `m141jax sparsify`: rewrite a checkpoint with compressed kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from m141jax import checkpoint
from m141jax.compress import nm, quant
from m141jax.compress.box import nbytes


def _add_rewrite_arguments(parser, src_help: str, dst_help: str) -> None:
    parser.add_argument("--src", required=True, help=src_help)
    parser.add_argument("--dst", required=True, help=dst_help)
    parser.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")


def rewrite(src: str | Path, dst: str | Path, compress: Callable[[str, Any, Any], Any], components: Sequence[str],
            overwrite: bool = False) -> str:
    """Write compress(component, config, params) of checkpoint src (of one of `components`, read as stored)
    to dst; returns 'X GB -> Y GB'. dst is checked before any weights are read."""
    checkpoint.read_config(src, tuple(components))
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    component, cfg, params = checkpoint.load(src, tuple(components), dtype=None, dense=True)
    before = nbytes(params)
    tree = compress(component, cfg, params)
    checkpoint.save(dst, component, checkpoint.read_meta(src)["config"], tree, overwrite=overwrite)
    return f"{before / 1e9:.3f} GB -> {nbytes(tree) / 1e9:.3f} GB"


def quantize_main(args) -> int:
    summary = rewrite(args.src, args.dst, lambda *a: quant.quantize_checkpoint(*a, args.mode, args.group),
                         ("dit", "llm", "clip", "vlm"), args.overwrite)
    print(f"wrote {args.dst}: {args.mode} weights, {summary}")
    return 0


def sparsify_main(args) -> int:
    n, m = nm.parse_nm(args.nm)
    summary = rewrite(args.src, args.dst, lambda _, cfg, p: nm.sparsify_checkpoint(cfg, p, n, m, args.values),
                         ("dit",), args.overwrite)
    print(f"wrote {args.dst}: {n}:{m} sparse ({args.values} values), {summary}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantization of a dit, llm, clip or vlm checkpoint",
                       description="Quantize the dense kernels (DiT: the blocks in --mode, the other layers in int8, "
                                   "as the release; encoders: all but the vision patch embedding). The result "
                                   "loads with m141jax.checkpoint.load and runs through the same forwards.")
    _add_rewrite_arguments(p, "a checkpoint made by tools/convert_torch_weights.py", "the quantized checkpoint to write")
    p.add_argument("--mode", choices=quant.MODES, default="int8",
                   help="int8: per output channel; int4: groups of --group inputs")
    p.add_argument("--group", type=int, default=quant.GROUP, help="inputs per int4 scale (default 32, as the release)")
    p.set_defaults(func=quantize_main)

    p = sub.add_parser("sparsify", help="one-shot N:M magnitude pruning of a DiT checkpoint, exported compact",
                       description="Prune the DiT's linear layers N:M by magnitude (embeddings, norms, modulation and "
                                   "the final layer stay dense) and write the compact sparse checkpoint; "
                                   "m141jax.checkpoint.load(..., dense=True) rebuilds dense weights from it.")
    _add_rewrite_arguments(p, "a dit checkpoint made by tools/convert_torch_weights.py", "the sparse checkpoint to write")
    p.add_argument("--nm", default="2:4", help="N:M: keep N of every M consecutive inputs (default 2:4)")
    p.add_argument("--values", choices=nm.VALUE_FORMATS, default="dense",
                   help="kept values in the checkpoint's dtype, or int8 per output channel (then the dense "
                        "kernels are int8 too)")
    p.set_defaults(func=sparsify_main)
