"""PyTorch -> Orbax weight conversion: `python tools/convert_torch_weights.py COMPONENT --src --dst ...`.

Each component module exposes `convert(src, config, dtype, progress) -> (config dataclass, params)`;
this module parses the command line, checks, and writes the checkpoint atomically.

Before any weight is read, the destination is checked (an existing DST is replaced only with
`--overwrite` and only when it is an m141jax checkpoint of the same component that does not hold
SRC), hidden partial folders that interrupted runs left next to DST are removed, and a config JSON is
translated and type-checked. Bad input ends with one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import types
import typing
from pathlib import Path

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
# component name -> the function that turns its config JSON into the config dataclass (looked up in the
# component's module, else in m141jax.config)
TRANSLATORS = {"dit": "dit_config_from_dict", "vae": "vae_config_from_dict", "llm": "llama_config_from_hf",
               "clip": "clip_text_config_from_hf", "vlm": "llava_config_from_hf"}
DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32}


class DestinationError(ValueError):
    """DST cannot be written, or is something `--overwrite` must not replace."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_torch_weights.py",
                                description="Convert PyTorch weights (release or diffusers/HF names) to an m141jax Orbax checkpoint.")
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


# ------------------------------------------------------------------------------------ destination

def _not_replaceable(dst: Path, component: str, src: Path) -> str | None:
    """Why `--overwrite` must not replace the existing dst, or None when it is an m141jax checkpoint of
    `component` holding nothing else."""
    from m141jax.checkpoint import META

    if dst.is_symlink():
        return "it is a symbolic link"
    if not dst.is_dir():
        return "it is a file, not a checkpoint folder"
    real, src_real = dst.resolve(), src.resolve()
    if src_real == real or real in src_real.parents:
        return f"it holds the source {src}"
    if not (dst / META).is_file():
        return f"it is not an m141jax checkpoint (no {META})"
    try:
        meta = json.loads((dst / META).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"its {META} is unreadable ({e})"
    found = meta.get("component") if isinstance(meta, dict) else None
    if found != component:
        return f"it holds a {found!r} checkpoint, not {component!r}"
    other = sorted(p.name for p in dst.iterdir() if p.name not in (META, "params"))
    if other:
        return f"it holds other files besides the checkpoint: {', '.join(other[:5])}" + (" ..." if len(other) > 5 else "")
    return None


def check_destination(dst: str | Path, component: str, src: str | Path, overwrite: bool) -> Path:
    """The absolute DST after checking, before any weight is read, that it can be written: its nearest
    existing ancestor is a writable directory, and an existing DST is replaced only with `overwrite` and
    only when it is an m141jax checkpoint of the same component (never a folder holding SRC, a different
    component, or anything else). Raises DestinationError / FileExistsError."""
    dst = Path(dst).absolute()
    if dst.exists() or dst.is_symlink():
        why = _not_replaceable(dst, component, Path(src).absolute())
        if not overwrite:
            raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it" if not why else
                                  f"{dst} already exists and --overwrite would not replace it ({why}); "
                                  f"choose another --dst")
        if why:
            raise DestinationError(f"--overwrite refuses to replace {dst}: {why}; it replaces only an m141jax "
                                   f"checkpoint of the same component ({component!r})")
    anc = dst.parent
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise DestinationError(f"cannot create {dst}: {anc} is not a directory")
    try:  # a real probe: permissions, read-only mounts and quotas all show here
        os.rmdir(tempfile.mkdtemp(prefix=f".{dst.name}.probe-", dir=anc))
    except OSError as e:
        raise DestinationError(f"cannot create {dst}: {anc} is not writable "
                               f"({e.strerror or os.strerror(e.errno or errno.EACCES)})") from None
    return dst


def _partial_pattern(dst: Path) -> re.Pattern:
    """Names that m141jax.checkpoint.partial_dir gives dst's partial folders: `.NAME.partial-PID-HEX8`
    (one process) or `.NAME.partial-HEX16` (a token shared by the processes of a multi-process run)."""
    return re.compile(rf"\.{re.escape(dst.name)}\.partial-(?:(?P<pid>\d+)-[0-9a-f]{{8}}|[0-9a-f]{{16}})")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale_partials(dst: Path, started: float) -> tuple[list[Path], list[str]]:
    """Remove dst's partial folders whose writer is gone; (removed, notes on the ones kept).

    Only folders named exactly as `partial_dir` names dst's are considered, and one is removed only
    when it is older than this run (`started`), its writer's process (when named) is not running here,
    and its lock can be taken (a live writer holds an flock on it, see checkpoint.atomic_dir). A
    partial that holds a complete checkpoint while dst is missing (a replace interrupted between its
    two renames) is kept and reported, as is one whose lock cannot be tested."""
    import fcntl

    from m141jax.checkpoint import META

    pattern = _partial_pattern(dst)
    removed: list[Path] = []
    notes: list[str] = []
    if not dst.parent.is_dir():
        return removed, notes
    for p in sorted(dst.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        if (m["pid"] and _pid_alive(int(m["pid"]))) or p.stat().st_mtime >= started:
            continue  # possibly a live writer
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            except OSError as e:
                notes.append(f"left {p} (cannot tell whether its writer is running: {e.strerror}); "
                             f"remove it if no conversion to {dst} is running")
                continue
            if not dst.exists() and (p / META).is_file():
                notes.append(f"kept {p}: a complete checkpoint from an interrupted --overwrite, and {dst} is "
                             f"missing (rename it to {dst.name} to use it)")
                continue
            shutil.rmtree(p)
            removed.append(p)
        finally:
            os.close(fd)
    return removed, notes


# ------------------------------------------------------------------------------------------ config

def _translator(component: str):
    module = importlib.import_module(COMPONENTS[component])
    name = TRANSLATORS[component]
    return getattr(module, name, None) or getattr(importlib.import_module("m141jax.config"), name)


def _type_errors(value, hint) -> str | None:
    """The expected type's name when `value` does not match the annotation `hint`, else None (also for
    annotations this check does not understand)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_type_errors(value, a) for a in args]
        return None if any(r is None for r in results) else " or ".join(r for r in results if r)
    if origin is tuple:
        if not isinstance(value, tuple):
            return f"a list of {args[0].__name__ if args and isinstance(args[0], type) else 'values'}"
        elems = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(elems) != len(value):
            return f"a list of {len(elems)} values"
        bad = [_type_errors(v, a) for v, a in zip(value, elems)]
        return next((f"a list of {b}s" for b in bad if b), None)
    if hint is type(None):
        return None if value is None else "null"
    if hint is bool:
        return None if isinstance(value, bool) else "true/false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def _config_type_problems(cfg, prefix: str = "") -> list[tuple[str, object, str]]:
    """(field, value, expected) for every field of a config dataclass (nested ones included) whose value
    does not have the annotated type."""
    out = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += _config_type_problems(value, f"{prefix}{f.name}.")
            continue
        want = _type_errors(value, hints.get(f.name))
        if want:
            out.append((prefix + f.name, value, want))
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def check_config(component: str, d: dict, where: str):
    """Translate a config JSON (dict) as the component's converter will, and type-check the result:
    one-line ValueErrors naming the field instead of the TypeError / AttributeError a wrongly typed
    value raises deep inside, or the wrongly typed config it silently builds. Returns the config."""
    translate = _translator(component)
    try:
        cfg = translate(d)
    except ValueError as e:
        raise ValueError(f"{where}: {_one_line(e)}") from None
    except Exception as e:  # TypeError, AttributeError, KeyError, transformers' validation errors, ...
        # the field to blame: the one whose removal lets the translation succeed (else changes its error)
        def outcome(k):
            try:
                translate({j: v for j, v in d.items() if j != k})
                return None
            except Exception as other:
                return type(other), str(other)

        results = {k: outcome(k) for k in d}
        blame = [k for k, r in results.items() if r is None] or \
                [k for k, r in results.items() if r != (type(e), str(e))]
        if len(blame) == 1:
            k = blame[0]
            raise ValueError(f"{where}: field {k!r} has a wrong type or value ({json.dumps(d[k])[:80]}): "
                             f"{type(e).__name__}: {_one_line(e)}") from None
        raise ValueError(f"{where}: a field has a wrong type ({type(e).__name__}: {_one_line(e)})") from None
    problems = _config_type_problems(cfg)
    if problems:
        field, value, want = problems[0]
        same = [k for k, v in d.items() if v is value]  # the JSON key, when the value was passed through
        names = [k for k in same if k == field] or (same if len(same) == 1 else [field])
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        shown = json.dumps(value) if isinstance(value, (str, int, float, bool, list)) else repr(value)
        raise ValueError(f"{where}: field {names[0]!r} must be {want}, found {type(value).__name__} {shown}{more}")
    return cfg


def check_config_source(component: str, config: str | None, src: str | Path) -> None:
    """check_config on the JSON the converter will use: --config when it names a file, else the source
    folder's config.json. Presets need no check."""
    from m141jax.convert.sources import find_files, read_config_json

    if config is not None:
        if Path(config).is_file():
            check_config(component, read_config_json(config, "--config"), f"--config {config}")
        return
    folder = find_files(src)[1]
    if folder is not None:
        check_config(component, read_config_json(folder), str(folder))


# -------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from m141jax import checkpoint
    from m141jax.config import to_json_dict
    from m141jax.convert.plan import nonfinite_allowed

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
