"""Orbax checkpoints of one component (parameters + the config that built them), written atomically.

Layout of a checkpoint directory:
    m141jax.json   {"format": 1, "component": "dit", "config": {...}}
    params/        an Orbax (OCDBT) pytree checkpoint, restorable onto any device mesh

`save` writes into a hidden sibling directory and renames it into place, so the destination is
complete or absent; in a multi-process run every process writes its own shards. `load_params`
restores onto given shardings (default: the first device) in a given dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from m141jax.sharding import shared_token, sync

FORMAT = 1
META = "m141jax.json"
CHUNK_BYTES = 32 << 20  # storage chunk size: restoring a shard reads little beyond it


class CheckpointError(ValueError):
    """A checkpoint that is missing, of the wrong component, or unreadable."""


def partial_dir(dst: Path, token: str | None = None) -> Path:
    """A fresh hidden sibling of dst to write into before the atomic rename (`token`: the same name on
    every process of a multi-process run). The converter recognises these names to remove the ones an
    interrupted run left behind (m141jax.convert.clean_stale_partials): `.NAME.partial-PID-HEX8` or
    `.NAME.partial-TOKEN` with a 16-hex-digit token."""
    return dst.parent / f".{dst.name}.partial-{token or f'{os.getpid()}-{uuid.uuid4().hex[:8]}'}"


def atomic_dir(dst: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run write(tmp) on a fresh sibling directory, then rename it to dst: dst is complete or absent.

    In a multi-process run every process calls this: process 0 makes and renames the directory and
    `write` runs on all of them (Orbax writes each process's shards), with barriers in between.
    Process 0 holds an flock on the directory while it is being written, so a later run can tell a
    partial folder whose writer was killed from one still being written (best effort: where the file
    system does not support the lock, it is written unlocked)."""
    import fcntl

    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    primary = jax.process_index() == 0
    tmp = partial_dir(dst, shared_token() if jax.process_count() > 1 else None)
    lock = None
    try:
        if primary:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            try:
                lock = os.open(tmp, os.O_RDONLY)
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass
        sync(f"m141jax mkdir {tmp.name}")
        write(tmp)
        sync(f"m141jax written {tmp.name}")
        if primary and dst.exists():
            old = partial_dir(dst)
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        elif primary:
            tmp.rename(dst)
        sync(f"m141jax renamed {tmp.name}")
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    return dst


def save(dst: str | Path, component: str, config: dict[str, Any], params, overwrite: bool = False,
         extra: dict[str, Any] | None = None) -> Path:
    """Write params (a pytree of numpy or jax arrays) and config to dst atomically; `extra`: more
    metadata entries (e.g. the formats of compressed kernels, `m141jax.kernels`).

    numpy leaves are moved to the host CPU device first: Orbax saves jax arrays without another
    full copy, which keeps the converter's peak memory near the checkpoint size. Arrays are stored
    in chunks of at most CHUNK_BYTES, so a host restoring onto a mesh reads about its own shards,
    never a whole tensor. Sharded (global) arrays are saved by every process of a multi-process run.
    """
    cpu = jax.devices("cpu")[0]
    params = jax.tree_util.tree_map(lambda a: jax.device_put(a, cpu) if isinstance(a, np.ndarray) else a, params)
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)

    def write(tmp: Path):
        # Uncompressed: compressing bf16 weights saves ~25% of disk but keeps compressed copies of the
        # arrays in memory until the save ends. At most one largest leaf in flight: serialisation buffers
        # then add one leaf, not the whole tree, to peak memory.
        in_flight = 1.01 * max(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 1e9 + 1e-3
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=in_flight))
        ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(params, save_args=save_args))
        if jax.process_index() == 0:
            meta = {"format": FORMAT, "component": component, "config": config, **(extra or {})}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            # Orbax's commit marker names the temporary directory it was written in, stale after the rename
            (tmp / "params" / "commit_success.txt").write_text("Checkpoint commit was successful\n")

    return atomic_dir(dst, write, overwrite)


def read_meta(path: str | Path, component: str | None = None) -> dict[str, Any]:
    """The metadata of a checkpoint, checked to be of `component` when given."""
    path = Path(path)
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is not an m141jax checkpoint (no {META}); "
                              f"make one with tools/convert_torch_weights.py")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not supported (expected {FORMAT})")
    if component is not None and meta["component"] != component:
        raise CheckpointError(f"{path} holds a {meta['component']!r} checkpoint, not {component!r}")
    return meta


def _config_classes() -> dict[str, type]:
    from m141jax import config

    return {"dit": config.DiTConfig, "vae": config.VAEConfig, "llm": config.LlamaConfig,
            "clip": config.CLIPTextConfig, "vlm": config.LlavaConfig}


def read_config(path: str | Path, components: tuple[str, ...] | None = None, dtype: str | None = None):
    """(component, config dataclass) stored in a checkpoint, checked to be one of `components` when
    given, with runtime dtypes set to `dtype` when given."""
    from m141jax.config import from_json_dict, runtime_dtypes

    meta = read_meta(path)
    if components is not None and meta["component"] not in components:
        raise CheckpointError(f"{path} holds a {meta['component']!r} checkpoint; accepted: {', '.join(components)}")
    cfg = from_json_dict(_config_classes()[meta["component"]], meta["config"])
    return meta["component"], (cfg if dtype is None else runtime_dtypes(cfg, dtype))


def load(path: str | Path, components: tuple[str, ...] | None = None, dtype: str = "bf16", shardings=None):
    """(component, config, params) of a checkpoint: parameters and activations in `dtype`."""
    from m141jax.config import dtype_of

    component, cfg = read_config(path, components, dtype)
    return component, cfg, load_params(path, dtype=dtype_of(dtype), shardings=shardings)


def abstract_tree(path: str | Path):
    """The stored parameter tree as jax.ShapeDtypeStruct leaves (no data read)."""
    meta = ocp.Checkpointer(ocp.StandardCheckpointHandler()).metadata(Path(path).absolute() / "params")
    tree = meta.item_metadata.tree
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                                  is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_params(path: str | Path, dtype=None, shardings=None):
    """Restore the parameters, cast to `dtype` if given, placed by `shardings` (a matching pytree of
    jax.sharding.Sharding, or None for the first device)."""
    path = Path(path).absolute()
    target = abstract_tree(path)
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: dev, target)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), target, shardings)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    return ckptr.restore(path / "params", args=ocp.args.StandardRestore(target))
