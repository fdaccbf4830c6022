"""Training placement: the four-axis mesh and the logical-axis rules applied to whole training states."""

import jax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from m141jax.axes import MESH_AXES
from m141jax.config import preset
from m141jax.models.dit import abstract_params
from m141jax.parallel import Strategy, path_str
from m141jax.train.config import OptimizerConfig
from m141jax.train.mesh import check_batch, make_mesh, state_shardings
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
