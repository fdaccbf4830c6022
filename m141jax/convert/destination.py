"""Where a conversion writes: DST checked before any weight is read, and stale partial folders of
interrupted runs cleaned.

An existing DST is replaced only with `--overwrite` and only when it is an m141jax checkpoint of the
same component that does not hold SRC and holds nothing else. `checkpoint.atomic_dir` writes into a
hidden `.DST.partial-*` sibling that it locks while writing; one left by a killed run is removed by the
next run for the same DST once its writer is provably gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from m141jax.checkpoint import META


class DestinationError(ValueError):
    """DST cannot be written, or is something `--overwrite` must not replace."""


def _not_replaceable(dst: Path, component: str, src: Path) -> str | None:
    """Why `--overwrite` must not replace the existing dst, or None when it is an m141jax checkpoint of
    `component` holding nothing else."""
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


def partial_pattern(dst: Path) -> re.Pattern:
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
    pattern = partial_pattern(dst)
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
