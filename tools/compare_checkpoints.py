"""Are two checkpoint folders the same model? Compares them component by component: an Orbax checkpoint by
its stored metadata (component and config) and every parameter array bit for bit, a tokenizer folder file by
file. Orbax's own files differ between two saves of the same arrays (random names, timestamps), so a file
diff cannot tell whether `tools/train_demo.py` rerun gives the same models; this can:

    python tools/compare_checkpoints.py A B [COMPONENT ...]   # default: the components found in both
    RESULT compare_checkpoints vae=identical dit=different …

Exit status 0 when every compared component is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from m141jax import checkpoint  # noqa: E402


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def identical(a: Path, b: Path) -> bool:
    """Whether two folders of one component hold the same model (see the module docstring)."""
    if not (a / "m141jax.json").is_file():
        return _files(a) == _files(b)
    if not (b / "m141jax.json").is_file() or checkpoint.read_meta(a) != checkpoint.read_meta(b):
        return False
    left, right = checkpoint.load_params(a), checkpoint.load_params(b)
    if jax.tree.structure(left) != jax.tree.structure(right):
        return False
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(left), jax.tree.leaves(right)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("components", nargs="*", help="subfolders to compare (default: every one in both)")
    args = p.parse_args(argv)
    names = args.components or sorted(d.name for d in args.a.iterdir() if d.is_dir() and (args.b / d.name).is_dir())
    missing = [n for n in names if not ((args.a / n).is_dir() and (args.b / n).is_dir())]
    if missing or not names:
        print(f"error: not a component folder of both: {', '.join(missing) or 'none in common'}", file=sys.stderr)
        return 2
    same = {n: identical(args.a / n, args.b / n) for n in names}
    print("RESULT compare_checkpoints " + " ".join(f"{n}={'identical' if s else 'different'}" for n, s in same.items()))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
