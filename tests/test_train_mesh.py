"""Training placement: the four-axis mesh and the logical-axis rules applied to whole training states;
optimizer state in host memory."""

import dataclasses
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from train_helpers import tiny_train_config

from m141jax import parallel
from m141jax.axes import MESH_AXES
from m141jax.config import preset
from m141jax.models.dit import abstract_params, init_params
from m141jax.parallel import Strategy, path_str
from m141jax.train import flow
from m141jax.train.checkpointing import RunCheckpoints
from m141jax.train.config import OptimizerConfig
from m141jax.train.data import SyntheticSource, global_batch, make_iterator
from m141jax.train.mesh import batch_shardings, check_batch, make_mesh, state_shardings, strategy
from m141jax.train.optim import make_optimizer


def test_state_follows_the_parameters_logical_names():
    """Parameters and every AdamW moment take the DiT parameters' logical names (embed over fsdp);
    the step counter is replicated; a minimum size keeps small arrays whole."""
    cfg = preset("tiny-i2v", param_dtype="fp32")
    params = abstract_params(cfg)
    opt, _ = make_optimizer(OptimizerConfig(), 10)
    state = {"params": params, "opt": jax.eval_shape(opt.init, params)}
    mesh = AbstractMesh((1, 8, 1, 1), MESH_AXES)
    sh = state_shardings(state, cfg, mesh)
    get = lambda tree: tree["double_blocks"]["img_attn"]["qkv"]["kernel"]  # noqa: E731
    assert get(sh["params"]).spec == P(None, "fsdp", None, None, None)  # [layers, embed, 3, heads, kv]
    mus = [s for p, s in jax.tree_util.tree_flatten_with_path(sh["opt"])[0]
           if path_str(p).endswith("double_blocks/img_attn/qkv/kernel")]
    assert len(mus) == 2 and all(s.spec == P(None, "fsdp", None, None, None) for s in mus)  # mu and nu
    counts = [s for p, s in jax.tree_util.tree_flatten_with_path(sh["opt"])[0] if "count" in jax.tree_util.keystr(p)]
    assert counts and all(s.spec == P() for s in counts)
    small = state_shardings(state, cfg, mesh, Strategy(min_size=64 * 64 * 3 * 2 + 1))
    assert get(small["params"]).spec == P()  # 2·64·3·64 elements: below the minimum


def test_make_mesh():
    mesh = make_mesh()
    assert mesh.axis_names == MESH_AXES and mesh.shape["fsdp"] == jax.device_count()
    n = jax.device_count()
    assert make_mesh(f"data={n},fsdp=1").shape["data"] == n
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh("data=4,fsdp=4")
    assert make_mesh("data=2,fsdp=-1").shape["fsdp"] == n // 2
    assert dict(make_mesh("data=2,fsdp=2,tensor=2,sequence=1").shape)["tensor"] == 2  # four axes
    with pytest.raises(ValueError, match="does not split over the 8 devices"):
        check_batch(2, make_mesh("data=2,fsdp=4"))


def _host_run(cfg, mesh, steps: int, ckpt_dir=None):
    """`steps` flow steps of the tiny DiT on `mesh`, placed as `m141jax train` places them; with ckpt_dir
    the final state is saved and restored onto the same shardings. Returns (state, metrics per step)."""
    sh = state_shardings(jax.eval_shape(lambda: flow.init_train_state(cfg, abstract_params(cfg.model))), cfg.model,
                         mesh, strategy(mesh, 0, flow.host_fields(cfg)))
    state = jax.jit(lambda k: flow.init_train_state(cfg, init_params(cfg.model, k)), out_shardings=sh)(
        jax.random.PRNGKey(0))
    data = make_iterator(SyntheticSource(cfg.model, cfg.data, cfg.flow.n_image_tokens), cfg.data)
    batches = [global_batch(next(data), batch_shardings(mesh)) for _ in range(steps)]
    rep = batch_shardings(mesh)["replicated"]
    step = parallel.jit_sharded(flow.make_train_step(cfg), mesh, (sh, jax.tree.map(lambda a: a.sharding, batches[0]),
                                                                    rep), (sh, rep),
                                batch=cfg.data.batch_size, donate_argnums=0)
    metrics = []
    for i, batch in enumerate(batches):
        state, m = step(state, batch, jax.device_put(jax.random.PRNGKey(i), rep))
        metrics.append(jax.device_get(m))
    if ckpt_dir is not None:
        ckpt = RunCheckpoints(ckpt_dir, 1, 1, use_async=False)
        ckpt.save(steps, state, data)
        state = ckpt.restore(state, data)
        ckpt.close()
    return state, metrics


@pytest.mark.slow
def test_optimizer_state_in_host_memory_trains_like_on_device(tmp_path):
    """optimizer.state_memory=host: AdamW's moments live in pinned host memory between steps (and come back
    there from a checkpoint), the parameters on the devices, and three steps of the tiny DiT on fsdp=8 give
    the losses, parameters and moments of the device-resident run."""
    base = tiny_train_config()
    mesh = make_mesh("fsdp=8")
    runs = {}
    for memory in ("device", "host"):
        cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, batch_size=8),
                                  optimizer=dataclasses.replace(base.optimizer, state_memory=memory))
        runs[memory] = _host_run(cfg, mesh, 3, tmp_path / memory if memory == "host" else None)
    (dev, dev_m), (host, host_m) = runs["device"], runs["host"]
    assert {a.sharding.memory_kind for a in jax.tree.leaves(host.opt_state)} == {parallel.HOST}
    assert {a.sharding.memory_kind for a in jax.tree.leaves((host.params, dev.opt_state))} == {"device"}
    for a, b in zip(dev_m, host_m):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    for a, b in zip(jax.tree.leaves((dev.params, dev.opt_state)), jax.tree.leaves((host.params, host.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert int(host.step) == 3


def test_host_memory_is_refused_where_the_backend_has_none():
    chip = SimpleNamespace(platform="fakechip", addressable_memories=lambda: [SimpleNamespace(kind="device")])
    with pytest.raises(ValueError, match="optimizer.state_memory host needs the 'pinned_host' memory kind, which "
                                         "the fakechip backend lacks \\(it has device\\); use device"):
        strategy(SimpleNamespace(devices=np.array([chip])), 0, ("opt_state",))
    assert strategy(make_mesh(), 0, ("opt_state",)).host == ("opt_state",)  # the CPU backend has pinned_host
