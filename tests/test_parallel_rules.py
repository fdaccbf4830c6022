"""The rule table is complete: every logical axis name a model gives its parameters or activations has
a rule (mapped to mesh axes or explicitly replicated), so nothing is replicated by omission."""

import ast
from pathlib import Path

import jax
from jax.sharding import PartitionSpec as P

from m141jax import axes
from m141jax.config import CLIP_TEXT_PRESETS, DIT_PRESETS, LLAMA_PRESETS, LLAVA_PRESETS, VAE_PRESETS
from m141jax.models import clip, dit, llama, llava, vae
from m141jax.parallel import RULES

MODELS = [(dit, DIT_PRESETS["tiny-i2v"]), (dit, DIT_PRESETS["tiny-t2v"]), (vae, VAE_PRESETS["tiny-vae"]),
          (llama, LLAMA_PRESETS["tiny-llama"]), (clip, CLIP_TEXT_PRESETS["tiny-clip"]), (llava, LLAVA_PRESETS["tiny-llava"])]


def _parameter_names() -> set[str]:
    names = set()
    for model, cfg in MODELS:
        specs = jax.tree_util.tree_leaves(model.param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, P))
        names |= {n for spec in specs for n in spec if n is not None}
    return names


def test_every_parameter_name_has_a_rule():
    ruled = {name for name, _ in RULES}
    used = _parameter_names()
    assert used, "no logical names found"
    assert used <= ruled, f"logical names without a rule: {sorted(used - ruled)}"
    assert used <= set(axes.PARAMETERS), f"names missing from m141jax.axes: {sorted(used - set(axes.PARAMETERS))}"


def test_the_table_and_the_axes_module_name_the_same_axes():
    names = [name for name, _ in RULES]
    assert len(names) == len(set(names)), "a logical name has two rules"
    assert set(names) == set(axes.LOGICAL_NAMES)
    for _, mesh_axes in RULES:
        for a in (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ():
            assert a in axes.MESH_AXES


def test_models_name_activations_from_the_axes_module():
    """Activation constraints in models/ use axes.ACTIVATIONS, not their own string tuples."""
    for path in (Path(__file__).resolve().parents[1] / "m141jax" / "models").glob("*.py"):
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not strings & set(axes.ACTIVATIONS), path.name
