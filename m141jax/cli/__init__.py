"""The `m141jax` command: `m141jax <command> ...` (also `python -m m141jax`)."""

from __future__ import annotations

import argparse
import sys

from m141jax import compile_cache, pipeline
from m141jax.cli import compress, generate, init_i2v, parity, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m141jax", description="Magic 1-For-1 in JAX: generation, parity checks, training.")
    sub = p.add_subparsers(dest="command", required=True)
    parity.add_parser(sub)
    generate.add_parser(sub)
    compress.add_parsers(sub)
    train.add_parsers(sub)
    init_i2v.add_parser(sub)
    for command in sub.choices.values():
        command.add_argument("--compilation-cache", metavar="DIR|off",
                             help="persistent compilation cache: compiled programs are kept there and reused by the "
                                  f"next run with the same shapes (default: ${compile_cache.ENV}, else "
                                  f"{compile_cache.default_dir()}); 'off' compiles everything anew")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cache = compile_cache.enable(args.compilation_cache)
        before = compile_cache.stats()
        code = args.func(args)
        if cache is not None or args.compilation_cache is not None:
            print(f"{(compile_cache.stats() - before).line()} ({cache or 'cache off'})", file=sys.stderr)
        return code
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except pipeline.Interrupted as e:  # outside a clip (a clip's interruption is reported by generate)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
