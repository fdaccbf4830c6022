"""One process of the 2-process localhost test (tests/test_sharding.py::test_two_processes).

usage: multihost_worker.py COORDINATOR PROCESS_ID WORKDIR
Four CPU devices per process, gloo collectives. Restores the tiny DiT from WORKDIR/host (written from
host arrays) onto data=2 x fsdp=4 (the hosts on `data`, each feeding its own batch row), runs the
forward, saves with Orbax to WORKDIR/ckpt, restores that onto fsdp=2 x sequence=2 x tensor=2 and checks
every local shard against WORKDIR/params.npz. Writes WORKDIR/velocity.npz (process 0) and prints
'OK <process id>'.
"""

import os
import sys

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4 --xla_cpu_collective_timeout_seconds=600 "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=600")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from fixtures import MESH_I2V, mesh_dit_inputs  # noqa: E402  (tests/ is this script's sys.path[0])

from m141jax import checkpoint, parallel  # noqa: E402
from m141jax.config import to_json_dict  # noqa: E402


def main(coordinator: str, pid: int, workdir: str) -> None:
    parallel.initialize_distributed(coordinator, 2, pid)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    mesh = parallel.make_mesh("data=2,fsdp=4")
    hosts = np.vectorize(lambda d: d.process_index)(mesh.devices)
    assert (hosts[0] == 0).all() and (hosts[1] == 1).all(), hosts  # hosts on the outer axis
    shardings = parallel.dit_param_shardings(MESH_I2V, mesh)
    sharded = checkpoint.load_params(os.path.join(workdir, "host"), shardings=shardings)
    # per-host input sharding: this process feeds only its own row of the batch of 2
    rows = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(parallel.batch_sharding(mesh, x.ndim, 2), x[pid:pid + 1]),
        mesh_dit_inputs(2))
    velocity = parallel.gather(parallel.dit_forward_fn(MESH_I2V, mesh, 2, shardings)(sharded, *rows))
    if pid == 0:
        np.savez(os.path.join(workdir, "velocity.npz"), velocity=velocity)

    path = os.path.join(workdir, "ckpt")
    checkpoint.save(path, "dit", to_json_dict(MESH_I2V), sharded)
    other = parallel.make_mesh("fsdp=2,sequence=2,tensor=2")
    restored = checkpoint.load_params(path, shardings=parallel.dit_param_shardings(MESH_I2V, other))
    assert any(any(s.spec) for s in jax.tree.leaves(jax.tree.map(lambda a: a.sharding, restored)))
    params = np.load(os.path.join(workdir, "params.npz"))
    for key, got in jax.tree_util.tree_leaves_with_path(restored):
        assert got.sharding.mesh.shape == other.shape, key
        want = params[jax.tree_util.keystr(key)]
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=jax.tree_util.keystr(key))
    print("OK", pid, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
