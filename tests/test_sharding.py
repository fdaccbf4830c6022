"""Meshes, rules, sequence-parallel attention, sharded DiT forward, sharded Orbax, multi-host.

Runs on the eight simulated CPU devices of tests/conftest.py; every sharded result is compared with
the single-device one.
"""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import MESH_I2V, mesh_dit_inputs, tiny_dit_params
from jax.sharding import PartitionSpec as P
from numerics import assert_close

from m141jax import checkpoint, cli, parallel, sampling
from m141jax.axes import MESH_AXES
from m141jax.config import to_json_dict
from m141jax.io import save_npz
from m141jax.models.dit import dit_forward, init_params
from m141jax.models.sequence_parallel import attend

ROOT = Path(__file__).resolve().parents[1]


def test_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets --xla_force_host_platform_device_count=8"


# ------------------------------------------------------------------------------------------ meshes

def test_parse_mesh():
    assert parallel.parse_mesh("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
    assert parallel.parse_mesh({"tensor": 2, "sequence": 4}, 8) == {"data": 1, "fsdp": 1, "sequence": 4, "tensor": 2}
    for bad, msg in [("fsdp=4", "needs 4 devices"), ("model=8", "unknown mesh axes"), ("fsdp", "bad mesh entry"),
                     ("fsdp=-1,data=-1", "at most one -1"), ("fsdp=3,data=-1", "do not divide"),
                     ("fsdp=x", "bad mesh entry"), ("data=0,fsdp=-1", "must be positive")]:
        with pytest.raises(ValueError, match=msg):
            parallel.parse_mesh(bad, 8)


def test_hosts_fill_outer_axes():
    assert parallel.host_split([2, 4, 1, 1], 2) == ([2, 1, 1, 1], [1, 4, 1, 1])
    assert parallel.host_split([1, 8, 1, 1], 2) == ([1, 2, 1, 1], [1, 4, 1, 1])
    assert parallel.host_split([2, 2, 2, 2], 4) == ([2, 2, 1, 1], [1, 1, 2, 2])
    with pytest.raises(ValueError, match="cannot be split over 4 hosts"):
        parallel.host_split([1, 1, 2, 3], 4)


def test_make_mesh():
    mesh = parallel.make_mesh("fsdp=2,tensor=2,sequence=2")
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 2,
                                                                          "tensor": 2}
    assert parallel.format_mesh(mesh) == "data=1,fsdp=2,sequence=2,tensor=2"


# ------------------------------------------------------------------------------------------- rules

def test_logical_shardings_follow_the_table():
    mesh = parallel.make_mesh("fsdp=2,sequence=2,tensor=2")
    spec = lambda names, shape: parallel.logical_sharding(names, shape, mesh).spec
    assert spec(("embed", "mlp"), (64, 256)) == P(("fsdp", "sequence"), "tensor")
    assert spec(("layers", "embed", None, "heads", "kv"), (2, 64, 3, 8, 8)) == P(None, ("fsdp", "sequence"), None,
                                                                                 "tensor", None)
    assert spec(("embed", "mlp"), (6, 3)) == P("fsdp", None)  # axes that do not divide are left out
    act = ("activation_batch", "activation_length", "activation_embed")
    assert spec(act, (2, 16, 64)) == P("fsdp", "sequence", None)
    assert spec(("unknown_name", "norm"), (8, 8)) == P(None, None)
    rules = dict(parallel.rules_for_batch(parallel.make_mesh("data=2,fsdp=4"), 2))
    assert rules["activation_batch"] == "data"  # batch 2 cannot split over fsdp=4


def test_dit_param_shardings():
    mesh = parallel.make_mesh("fsdp=2,sequence=2,tensor=2")
    sh = parallel.dit_param_shardings(MESH_I2V, mesh)
    blk = sh["double_blocks"]
    assert blk["img_attn"]["qkv"]["kernel"].spec == P(None, ("fsdp", "sequence"), None, "tensor", None)
    assert blk["img_mlp"]["fc2"]["kernel"].spec == P(None, "tensor", ("fsdp", "sequence"))
    assert sh["img_in"]["kernel"].spec == P(None, ("fsdp", "sequence"))
    params = jax.eval_shape(lambda: init_params(MESH_I2V, jax.random.PRNGKey(0)))
    assert jax.tree.structure(params) == jax.tree.structure(sh)


# ------------------------------------------------------------------------ sequence-parallel attention

def _qkv(b=2, length=37, heads=8, dim=16):
    k = jax.random.split(jax.random.PRNGKey(2), 4)
    return [jax.random.normal(x, (b, length, heads, dim)) for x in k]


@pytest.mark.parametrize("method", ["ulysses", "ring"])
def test_sequence_parallel_attention_and_grads(method):
    """37 tokens over sequence=4 (padded to 40) with tensor=2: valid rows and every gradient a valid
    row's output produces equal the single-device blockwise attention; ring is exact on all rows."""
    q, k, v, w = _qkv()
    valid_len = jnp.array([30, 20])
    valid = (jnp.arange(37)[None] < valid_len[:, None])[..., None, None]
    weight = w if method == "ring" else jnp.where(valid, w, 0)  # Ulysses: padding rows are free (B.6)

    def loss(sp):
        def f(q, k, v):
            o = attend(q, k, v, valid_len=valid_len, impl="blockwise", block=8, method=sp)
            return (o * weight).sum(), o
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, want), gwant = loss("none")(q, k, v)
    with jax.set_mesh(parallel.make_mesh("sequence=4,tensor=2")):
        (_, got), ggot = loss(method)(q, k, v)
    rows = True if method == "ring" else valid
    np.testing.assert_allclose(np.asarray(jnp.where(rows, got, 0)), np.asarray(jnp.where(rows, want, 0)), atol=2e-6)
    for a, b in zip(ggot, gwant):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6)
    # padding tokens never reach valid ones: changing them leaves valid outputs unchanged
    with jax.set_mesh(parallel.make_mesh("sequence=4,tensor=2")):
        poked = jax.jit(lambda v: attend(q, k, v, valid_len=valid_len, impl="blockwise", block=8,
                                         method=method))(jnp.where(valid, v, 1e3))
    np.testing.assert_allclose(np.asarray(jnp.where(valid, poked, 0)), np.asarray(jnp.where(valid, want, 0)),
                               atol=2e-6)


def test_ulysses_needs_divisible_heads():
    q, k, v, _ = _qkv(heads=4)
    mesh = parallel.make_mesh("sequence=8")
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="use --sequence-parallel ring"):
        jax.jit(lambda q, k, v: attend(q, k, v, method="ulysses"))(q, k, v)


# ------------------------------------------------------------------------------- sharded DiT forward

@pytest.fixture(scope="module")
def dit_case():
    """Host parameters, inputs and the single-device velocity of the tiny DiT."""
    params = jax.tree.map(np.asarray, tiny_dit_params(MESH_I2V))
    args = mesh_dit_inputs(2)
    want = jax.jit(lambda p, *a: dit_forward(p, MESH_I2V, *a))(params, *args)
    return params, args, np.asarray(want)


@pytest.mark.parametrize("spec, method, batch_spec", [
    ("fsdp=8", "none", None),
    ("data=2,fsdp=4", "none", "data"),  # CFG's cond/uncond pair as data parallelism
    ("fsdp=2,tensor=2,sequence=2", "ulysses", "fsdp"),
    ("sequence=8", "ulysses", None),
    ("sequence=8", "ring", None),
])
def test_sharded_dit_forward(dit_case, spec, method, batch_spec):
    params, args, want = dit_case
    cfg = dataclasses.replace(MESH_I2V, sequence_parallel=method)
    mesh = parallel.make_mesh(spec)
    shardings = parallel.dit_param_shardings(cfg, mesh)
    sharded = jax.tree.map(parallel.put, params, shardings)
    got = parallel.dit_forward_fn(cfg, mesh, 2, shardings)(sharded, *args)
    assert got.sharding.spec == P(batch_spec, None, None, None, None)
    assert_close(got, want, 2e-5)


@pytest.mark.parametrize("spec", ["data=2,fsdp=4", "fsdp=2,tensor=2,sequence=2"])
def test_sharded_sampler_with_cfg(dit_case, spec):
    """The whole 4-step loop with CFG (one batch-4 forward per step) on a mesh equals one device."""
    params, (lat, _, text, ref, _), _ = dit_case
    neg = text.replace(text_states=text.text_states[:, ::-1], text_states_2=-text.text_states_2)
    kw = dict(sigmas=sampling.schedule(4, 5.0), ref_latents=ref, neg_text=neg, guidance_scale=3.0)
    want = sampling.sample(params, MESH_I2V, lat, text, **kw)
    mesh = parallel.make_mesh(spec)
    cfg, shardings = parallel.dit_on_mesh(MESH_I2V, mesh)
    got = sampling.sample(jax.tree.map(parallel.put, params, shardings), cfg, lat, text, mesh=mesh, **kw)
    assert_close(got, want, 2e-5)


# ----------------------------------------------------------------------------------- checkpoints

def test_checkpoint_restores_onto_another_mesh(tmp_path, dit_case):
    """Saved from fsdp=8 shards, restored onto sequence=4 x tensor=2: every shard holds the original
    values; a checkpoint written from host arrays (as the converter does) restores sharded too."""
    params = dit_case[0]
    a, b = parallel.make_mesh("fsdp=8"), parallel.make_mesh("sequence=4,tensor=2")
    checkpoint.save(tmp_path / "sharded", "dit", to_json_dict(MESH_I2V),
                    jax.tree.map(parallel.put, params, parallel.dit_param_shardings(MESH_I2V, a)))
    checkpoint.save(tmp_path / "host", "dit", to_json_dict(MESH_I2V), params)
    target = parallel.dit_param_shardings(MESH_I2V, b)
    for name in ("sharded", "host"):
        restored = checkpoint.load_params(tmp_path / name, shardings=target)
        for want, got, sh in zip(jax.tree.leaves(params), jax.tree.leaves(restored), jax.tree.leaves(target)):
            assert got.sharding == sh
            for shard in got.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])


def test_checkpoint_chunks_bound_what_a_shard_reads(tmp_path, monkeypatch):
    """Arrays are stored in chunks of at most CHUNK_BYTES, so restoring one shard reads about that shard."""
    import tensorstore as ts

    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)
    w = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
    checkpoint.save(tmp_path / "c", "test", {}, {"w": w})
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/c/params",
                                                   "path": "w"}}).result()
    assert np.prod(store.chunk_layout.read_chunk.shape) * 4 <= 4096
    mesh = parallel.make_mesh("fsdp=8")
    got = checkpoint.load_params(tmp_path / "c", shardings={"w": parallel.logical_sharding(("embed", None), w.shape,
                                                                                          mesh)})["w"]
    assert got.sharding.spec == P("fsdp", None)
    np.testing.assert_array_equal(np.asarray(got), w)


# ------------------------------------------------------------------------------------- parity CLI

def test_parity_cli_mesh(tmp_path, dit_case):
    params, args, want = dit_case
    checkpoint.save(tmp_path / "ckpt", "dit", to_json_dict(MESH_I2V), params)
    lat, t, cond, ref, _ = args
    save_npz(tmp_path / "in.npz", {"latents": np.moveaxis(lat, -1, 1), "ref_latents": np.moveaxis(ref, -1, 1),
                                   "timestep": t, **cond.to_dict()})
    rc = cli.main(["parity", "dit", "--checkpoint", str(tmp_path / "ckpt"), "--inputs", str(tmp_path / "in.npz"),
                   "--output", str(tmp_path / "out.npz"), "--mesh", "data=2,sequence=2,tensor=-1",
                   "--sequence-parallel", "ring"])
    assert rc == 0
    got = np.load(tmp_path / "out.npz")["velocity"]
    assert_close(got, np.moveaxis(want, -1, 1), 2e-5)
    assert cli.main(["parity", "dit", "--checkpoint", str(tmp_path / "ckpt"), "--inputs", str(tmp_path / "in.npz"),
                     "--output", str(tmp_path / "bad.npz"), "--mesh", "fsdp=3"]) == 2
    assert cli.main(["parity", "vae-decode", "--checkpoint", str(tmp_path / "ckpt"), "--inputs",
                     str(tmp_path / "in.npz"), "--output", str(tmp_path / "bad.npz"), "--mesh", "fsdp=8"]) == 2
    assert not (tmp_path / "bad.npz").exists()


# ------------------------------------------------------------------------------------- multi-host

@pytest.mark.slow
def test_two_processes(tmp_path, dit_case):
    """2 processes x 4 CPU devices over gloo: restore a host-written checkpoint sharded, forward (each
    host feeding its own batch row) equal to the single-device forward, Orbax save, restore onto
    another mesh with parameters identical to the originals."""
    params = dit_case[0]
    checkpoint.save(tmp_path / "host", "dit", to_json_dict(MESH_I2V), params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    np.savez(tmp_path / "params.npz", **{jax.tree_util.keystr(k): v for k, v in leaves})
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_worker.py"), f"localhost:{port}",
                               str(i), str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out, out[-3000:]
    got = np.load(tmp_path / "velocity.npz")["velocity"]
    want = dit_case[2]
    assert_close(got, want, 2e-5)
    assert (tmp_path / "ckpt" / checkpoint.META).is_file()
