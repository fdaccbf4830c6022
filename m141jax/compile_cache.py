"""Warm starts: JAX's persistent compilation cache, on by default for every `m141jax` command.

Compiled programs are written to a folder under the user's cache directory
(`$XDG_CACHE_HOME/m141jax/jax`, else `~/.cache/m141jax/jax`; `$M141JAX_COMPILATION_CACHE` or
`--compilation-cache DIR|off` choose another or none), with no minimum compile time or entry size, so
the tiny programs of the demo are cached as well as the 13B sampler. A second run with the same shapes
reads every program from the cache instead of compiling it.

`stats()` counts what happened since the process started: programs compiled by XLA and programs read
from the persistent cache (from `jax.monitoring` events).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

ENV = "M141JAX_COMPILATION_CACHE"
OFF = "off"

# jax.monitoring event names (jax._src.dispatch.BACKEND_COMPILE_EVENT covers a compile and a cache read alike)
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_dir() -> Path:
    """$XDG_CACHE_HOME/m141jax/jax, else ~/.cache/m141jax/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "m141jax" / "jax"


def resolve(where: str | None) -> Path | None:
    """The cache folder of `--compilation-cache` (None: $M141JAX_COMPILATION_CACHE, else default_dir());
    None when it is 'off'."""
    where = where if where is not None else os.environ.get(ENV) or None
    if where is None:
        return default_dir()
    if where.strip().lower() == OFF:
        return None
    return Path(where).expanduser()


def enable(where: str | None = None) -> Path | None:
    """Turn the persistent compilation cache on in folder `resolve(where)` (made if missing), or off;
    returns the folder (None: off). Takes effect for the programs compiled after it, also when an
    earlier call chose another folder."""
    _listen()
    path = resolve(where)
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--compilation-cache {path} cannot be made ({e.strerror}); pass another folder "
                             f"or 'off'") from None
    cc.reset_cache()
    jax.config.update("jax_enable_compilation_cache", path is not None)
    jax.config.update("jax_compilation_cache_dir", str(path) if path is not None else None)
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


@dataclasses.dataclass
class Stats:
    """Programs XLA compiled and programs read from the persistent cache."""

    compiled: int = 0
    cached: int = 0

    def __sub__(self, other: "Stats") -> "Stats":
        return Stats(self.compiled - other.compiled, self.cached - other.cached)

    def line(self) -> str:
        return f"compilation: {self.compiled} program(s) compiled, {self.cached} read from the cache"


_lock = threading.Lock()
_requests = 0  # backend compile events: compiles and cache reads
_hits = 0
_listening = False


def _on_duration(event: str, _secs: float, **_kw) -> None:
    global _requests
    if event == _COMPILE_EVENT:
        with _lock:
            _requests += 1


def _on_event(event: str, **_kw) -> None:
    global _hits
    if event == _HIT_EVENT:
        with _lock:
            _hits += 1


def _listen() -> None:
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


def stats() -> Stats:
    """Counts since the first `enable` (or `stats`) call of this process."""
    _listen()
    with _lock:
        return Stats(compiled=_requests - _hits, cached=_hits)
