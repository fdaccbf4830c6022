"""Orbax checkpoints of one component (parameters + the config that built them), written atomically,
and the one checked loader every command uses.

Layout of a checkpoint directory:
    m141jax.json   {"format": 1, "component": "dit", "config": {...}, "compressed": {...}}
    params/        an Orbax (OCDBT) pytree checkpoint, restorable onto any device mesh

`save` writes into a hidden sibling directory and renames it into place, so the destination is
complete or absent; in a multi-process run every process writes its own shards. Compressed kernels
(`m141jax.compress`) are stored as their arrays, their formats under "compressed".

`load` is the checked loader: the stored config is read and checked to be of an accepted component,
every stored array is checked against the shapes and kinds (floating point or not) the config's model
expects before any weights are read, compressed kernels are rebuilt as boxes (or densified), and the
parameters are restored in the requested dtype, placed on a mesh by the logical-axis rules when asked.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from m141jax import config as config_lib
from m141jax import parallel
from m141jax.compress import box, io
from m141jax.models import clip, dit, llama, llava, vae
from m141jax.parallel import shared_token, sync

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


def save(dst: str | Path, component: str, config: dict[str, Any], params, overwrite: bool = False) -> Path:
    """Write params (a pytree of numpy or jax arrays, compressed kernels included) and config to dst
    atomically.

    numpy leaves are moved to the host CPU device first: Orbax saves jax arrays without another
    full copy, which keeps the converter's peak memory near the checkpoint size. Arrays are stored
    in chunks of at most CHUNK_BYTES, so a host restoring onto a mesh reads about its own shards,
    never a whole tensor. Sharded (global) arrays are saved by every process of a multi-process run.
    """
    params, formats = io.pack(params)
    extra = {"compressed": formats} if formats else {}
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
            meta = {"format": FORMAT, "component": component, "config": config, **extra}
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
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / META} cannot be read: {e}") from None
    if not isinstance(meta, dict) or not {"component", "config"} <= set(meta):
        raise CheckpointError(f"{path / META} is not m141jax checkpoint metadata (no component and config)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not supported (expected {FORMAT})")
    if component is not None and meta["component"] != component:
        raise CheckpointError(f"{path} holds a {meta['component']!r} checkpoint, not {component!r}")
    return meta


# component -> (config class, model module)
COMPONENTS = {"dit": (config_lib.DiTConfig, dit), "vae": (config_lib.VAEConfig, vae),
              "llm": (config_lib.LlamaConfig, llama), "clip": (config_lib.CLIPTextConfig, clip),
              "vlm": (config_lib.LlavaConfig, llava)}


def read_config(path: str | Path, components: tuple[str, ...] | None = None, dtype: str | None = None):
    """(component, config dataclass) stored in a checkpoint, checked to be one of `components` when
    given, with runtime dtypes set to `dtype` when given."""
    meta = read_meta(path)
    if components is not None and meta["component"] not in components:
        raise CheckpointError(f"{path} holds a {meta['component']!r} checkpoint; accepted: {', '.join(components)}")
    try:
        cfg = config_lib.from_json_dict(COMPONENTS[meta["component"]][0], meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{META}: its {meta.get('component')!r} config cannot be read ({e})") from None
    return meta["component"], (cfg if dtype is None else config_lib.runtime_dtypes(cfg, dtype))


def load(path: str | Path, components: tuple[str, ...] | None = None, dtype: str | None = "bf16", *, mesh=None,
         sequence_parallel: str = "auto", dense: bool = False, architecture=None, what: str | None = None):
    """(component, config, params) of a checkpoint, checked, in `dtype` (parameters and activations;
    None: as stored).

    - `components`: the accepted components (None: any); `architecture`: a config whose architecture
      the stored one must equal (a training run's model), named field by field when it does not.
    - The stored arrays are checked against the shapes and kinds the config's model expects before any
      weights are read (compressed kernels by the dense kernels they rebuild).
    - `mesh`: parameters restored straight onto it by the logical-axis rules (each process reads its own
      shards); a DiT's config then gets the `sequence_parallel` method for that mesh; the arrays of
      compressed kernels are split along their output channels.
    - Compressed kernels stay compressed (boxes each layer rebuilds as it runs) unless `dense`.
    - `what`: how errors name the checkpoint (default: its component).
    """
    path = Path(path)
    component, cfg = read_config(path, components, dtype)
    if architecture is not None and cfg.architecture() != architecture.architecture():
        want, have = architecture.architecture(), cfg.architecture()
        diff = sorted(k for k in want if want[k] != have.get(k))
        raise CheckpointError(f"{path} holds a {component} whose {', '.join(diff)} differ from the configured model")
    formats = read_meta(path).get("compressed", {})
    model = COMPONENTS[component][1]
    expected = model.abstract_params(cfg)
    stored = abstract_tree(path)
    rebuilt = jax.eval_shape(lambda t: box.densify_traced(io.unpack(t, formats)), stored)
    _check_arrays(path, what or component, expected, rebuilt)
    shardings = None
    if mesh is not None:
        if component == "dit":
            cfg, dense_shardings = parallel.dit_on_mesh(cfg, mesh, sequence_parallel)
        else:
            dense_shardings = parallel.tree_shardings(model.param_logical_axes(cfg), expected, mesh)
        by_path = {parallel.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(dense_shardings)}
        boxed = io.boxed_paths(formats)
        shardings = jax.tree_util.tree_map_with_path(
            lambda p, a: parallel.storage_sharding(a.shape, mesh) if boxed(k := parallel.path_str(p))
            else by_path[k], stored)
    dt = None if dtype is None else config_lib.dtype_of(dtype)
    params = load_params(path, dtype=None if formats else dt, shardings=shardings)
    if formats:
        params = io.unpack(params, formats, dt)
        params = box.densify(params) if dense else params
    return component, cfg, params


def _check_arrays(path: Path, what: str, expected, stored) -> None:
    """One-line error naming the first stored array whose shape or kind differs from the config's."""
    def table(tree):
        return {parallel.path_str(p): a for p, a in jax.tree_util.tree_leaves_with_path(tree)}

    want, have = table(expected), table(stored)
    bad = sorted(k for k in want.keys() | have.keys()
                 if k not in want or k not in have or want[k].shape != have[k].shape
                 or jnp.issubdtype(want[k].dtype, jnp.floating) != jnp.issubdtype(have[k].dtype, jnp.floating))
    if bad:
        k = bad[0]
        show = lambda t: "absent" if k not in t else f"{tuple(t[k].shape)} {t[k].dtype}"  # noqa: E731
        raise CheckpointError(f"{path} ({what}): its parameters do not match its config at {len(bad)} "
                              f"entries, e.g. {k}: stored {show(have)}, config {show(want)}")


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
