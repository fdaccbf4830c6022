"""The fsdp placement rule and mesh parsing."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from m141jax.train.placement import check_batch, fsdp_spec, make_mesh


def test_fsdp_spec_shards_the_largest_divisible_axis():
    assert fsdp_spec((3072, 12288), 8) == P(None, "fsdp")
    assert fsdp_spec((20, 3072, 3, 24, 128), 256) == P(None, "fsdp", None, None, None)
    assert fsdp_spec((40, 128), 256) == P()  # nothing divisible: replicated
    assert fsdp_spec((64, 64), 8) == P("fsdp", None)  # ties: the first
    assert fsdp_spec((3072,), 1) == P()


def test_make_mesh():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.shape["fsdp"] == jax.device_count()
    n = jax.device_count()
    assert make_mesh(f"data={n},fsdp=1").shape["data"] == n
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh("data=4,fsdp=4")
    assert make_mesh("data=2,fsdp=-1").shape["fsdp"] == n // 2
    with pytest.raises(ValueError, match="axes data and fsdp only"):
        make_mesh("tensor=2,fsdp=-1")
    with pytest.raises(ValueError, match="does not split over the 8 devices"):
        check_batch(2, make_mesh("data=2,fsdp=4"))
