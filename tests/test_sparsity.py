"""N:M sparsity: exact masks, schedules, sparsity-preserving optimizer updates, compact export and load."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from fixtures import TINY_I2V, tiny_dit_params, tiny_sample
from numerics import rel_err

from m141jax import checkpoint, cli
from m141jax.compress import layout, nm, quant
from m141jax.compress.box import nbytes
from m141jax.config import SparsityConfig, preset, to_json_dict
from m141jax.models import dit
from m141jax.train import sparsity


def _groups_np(w, lay, m):
    """numpy [*lead, K/m, m, N] view of a kernel, written independently of the module's helpers."""
    lead = w.shape[:lay.lead]
    return np.asarray(w).reshape(*lead, lay.k // m, m, lay.n)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (5, 16)])
def test_masks_are_exactly_n_of_m_by_magnitude(n, m):
    lay = layout.Layout(lead=1, n_in=2, shape=(4, 8, 6))  # an output projection: K = 4·8 inputs
    w = jax.random.normal(jax.random.PRNGKey(m + n), (3, 4, 8, 6))
    w = w.at[0, 0, :4, 0].set(0.0)  # a group of ties
    mask = nm.nm_mask(w, lay, n, m)
    assert mask.shape == w.shape and mask.dtype == jnp.bool_
    g, keep = _groups_np(w, lay, m), _groups_np(mask, lay, m)
    assert (keep.sum(axis=-2) == n).all()
    kept_min = np.where(keep, np.abs(g), np.inf).min(axis=-2)
    pruned_max = np.where(keep, -np.inf, np.abs(g)).max(axis=-2)
    assert (kept_min >= pruned_max).all()


def test_default_selection_excludes_embeddings_norms_modulation_final_layer():
    chosen = nm.select_dit(tiny_dit_params(), TINY_I2V)
    assert {"double_blocks/img_attn/qkv/kernel", "double_blocks/txt_mlp/fc2/kernel", "single_blocks/linear2_attn/kernel",
            "txt_in/blocks/self_attn_proj/kernel"} <= set(chosen)
    banned = ("img_in", "time_in", "vector_in", "final_layer", "_mod/", "modulation", "norm", "input_embedder",
              "t_embedder", "c_embedder")
    assert not any(b in k for k in chosen for b in banned)
    only_mlp = nm.select_dit(tiny_dit_params(), TINY_I2V,
                                   SparsityConfig(include=(r"single_blocks/linear._mlp/kernel$",)))
    assert set(only_mlp) == {"single_blocks/linear1_mlp/kernel", "single_blocks/linear2_mlp/kernel"}
    with pytest.raises(ValueError, match="no parameter matches"):
        nm.select_dit(tiny_dit_params(), TINY_I2V, SparsityConfig(include=(r"nothing",)))
    with pytest.raises(ValueError, match="img_in/kernel has 132 inputs"):
        nm.select_dit(tiny_dit_params(), TINY_I2V, SparsityConfig(include=(r"^img_in/kernel$",), exclude=(), m=8))


def test_schedule_ramps_from_dense_to_n_of_m():
    cfg = SparsityConfig(n=2, m=8, begin_step=10, end_step=40, frequency=5)
    kept = [int(sparsity.kept_per_group(cfg, s)) for s in range(50)]
    assert kept[:11] == [8] * 11 and kept[40:] == [2] * 10
    assert all(a >= b for a, b in zip(kept, kept[1:])) and len(set(kept)) > 3
    updates = [s for s in range(50) if sparsity.is_mask_step(cfg, s)]
    assert updates == [10, 15, 20, 25, 30, 35, 40]
    once = SparsityConfig(begin_step=3, end_step=3)
    assert [int(sparsity.kept_per_group(once, s)) for s in (0, 2, 3, 9)] == [4, 4, 2, 2]
    with pytest.raises(ValueError, match="N:M sparsity 5:4"):
        SparsityConfig(n=5, m=4)


def _train(opt, params, steps):
    """`steps` updates pulling every weight towards (its initial value + 1): away from zero."""
    target = jax.tree_util.tree_map(lambda x: x + 1.0, params)

    @jax.jit
    def step(p, state):
        grads = jax.grad(lambda p: sum(jnp.sum(jnp.square(a - b)) for a, b in
                                       zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target))))(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = opt.init(params)
    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append(params)
    return params, state, history


def _kernel(p, path):
    for k in path.split("/"):
        p = p[k]
    return p


@pytest.mark.slow
def test_pruned_weights_stay_exactly_zero_through_adamw():
    params = tiny_dit_params()
    cfg = SparsityConfig()  # one-shot 2:4 at step 0
    chosen = nm.select_dit(params, TINY_I2V, cfg)
    opt = sparsity.sparse_training(optax.adamw(1e-2, weight_decay=0.1), cfg, chosen)
    final, state, history = _train(opt, params, 40)
    masks = state.masks
    for path, lay in chosen.items():
        keep = _kernel(masks, path)
        for p in history:
            assert (_kernel(p, path)[~keep] == 0).all(), path
        w = _kernel(final, path)
        assert (_groups_np(w != 0, lay, 4).sum(axis=-2) == 2).all(), path  # exactly 2:4, kept weights non-zero
        assert float(jnp.abs(w - _kernel(params, path))[keep].min()) > 0.1  # and trained
    mod = final["double_blocks"]["img_mod"]["linear"]["kernel"]  # not selected: dense and trained
    assert bool((mod != 0).all())
    np.testing.assert_array_equal(masks["double_blocks"]["img_mod"]["linear"]["kernel"], True)


def test_gradual_ramp_inside_an_optax_chain_and_masks_in_orbax(tmp_path):
    params = tiny_dit_params()
    cfg = SparsityConfig(n=2, m=4, begin_step=2, end_step=12, frequency=2)
    chosen = nm.select_dit(params, TINY_I2V, cfg)
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    opt = sparsity.sparse_training(inner, cfg, chosen)
    path = "single_blocks/linear1_mlp/kernel"
    final, state, history = _train(opt, params, 16)
    zeros = [float((_kernel(p, path) == 0).mean()) for p in history]
    assert zeros[:4] == [0.0] * 4 and zeros[4:6] == [0.25] * 2 and zeros[6:] == [0.5] * 10  # 4:4, 3:4, 2:4
    assert all(a <= b for a, b in zip(zeros, zeros[1:]))

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "opt", state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "opt", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state))
    for a, b in zip(jax.tree_util.tree_leaves(state.masks), jax.tree_util.tree_leaves(restored.masks)):
        assert a.dtype == b.dtype == jnp.bool_
        np.testing.assert_array_equal(a, b)
    assert int(restored.count) == 16


def test_update_without_params_is_refused():
    opt = sparsity.sparse_training(optax.sgd(0.1), SparsityConfig(), nm.select_dit(tiny_dit_params(), TINY_I2V))
    state = opt.init(tiny_dit_params())
    with pytest.raises(ValueError, match="needs the parameters"):
        opt.update(tiny_dit_params(), state)


def test_export_load_round_trips_exactly(tmp_path):
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tiny_dit_params())
    chosen = nm.select_dit(params, TINY_I2V)
    pruned = nm.prune(params, nm.nm_masks(params, chosen, 2, 4))
    checkpoint.save(tmp_path / "sparse", "dit", to_json_dict(TINY_I2V), nm.compress(pruned, chosen))
    info = checkpoint.read_meta(tmp_path / "sparse")
    back = checkpoint.load(tmp_path / "sparse", dtype=None, dense=True)[2]
    assert set(info["compressed"]) == set(chosen)
    for a, b in zip(jax.tree_util.tree_leaves(pruned), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    boxes = checkpoint.load(tmp_path / "sparse", dtype=None)[2]
    box = _kernel(boxes, "double_blocks/img_attn_proj/kernel")
    assert isinstance(box, nm.NMSparse) and box.indices.dtype == jnp.uint8
    assert box.values.shape == (2, 32, 64) and box.indices.shape == (2, 8, 64)  # 2 of 4 of 64 inputs, 2 bits each
    dense_bytes = sum(nbytes(_kernel(params, k)) for k in chosen)
    sparse_bytes = sum(nbytes(_kernel(boxes, k)) for k in chosen)
    assert sparse_bytes == dense_bytes * 9 // 16  # half the values + 2 bits per kept value


def test_sampler_with_sparse_weights_matches_the_pruned_dense_model():
    params = tiny_dit_params()
    chosen = nm.select_dit(params, TINY_I2V)
    pruned = nm.prune(params, nm.nm_masks(params, chosen, 2, 4))
    ref = tiny_sample(pruned)
    assert rel_err(ref, tiny_sample(params), ord=2) > 0.05  # one-shot pruning of half the weights, no fine-tuning
    # compact kernels rebuilt by each layer as it reads them: the pruned dense model's result
    assert rel_err(tiny_sample(nm.compress(params, chosen)), ref, ord=2) < 1e-5
    with_int8 = nm.compress(pruned, chosen, values="int8")
    box = _kernel(with_int8, "single_blocks/linear2_mlp/kernel")
    assert isinstance(box.values, quant.QArray) and box.values.codes.dtype == jnp.int8
    assert 0 < rel_err(tiny_sample(with_int8), ref, ord=2) < 0.02


def test_hardware_2_4_operands():
    """nm_spmm's metadata: per 16 inputs, the 8 kept positions as base-4 digits of a uint16, first lowest."""
    w = jnp.zeros((16, 1)).at[jnp.array([1, 3, 4, 6, 8, 9, 14, 15]), 0].set(jnp.arange(1.0, 9.0))
    sp = nm.compress_kernel(w, layout.Layout(0, 1, (16, 1)), 2, 4)
    values, meta = nm.nm_operands(sp)
    np.testing.assert_array_equal(values, np.arange(1.0, 9.0)[None])
    digits = [1, 3, 0, 2, 0, 1, 2, 3]
    assert meta.dtype == jnp.uint16 and int(meta[0, 0]) == sum(d * 4 ** i for i, d in enumerate(digits))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16)).astype(jnp.bfloat16)
    try:
        out = nm.nm_matmul(x, sp)
    except NotImplementedError as e:  # this jax has no N:M sparse dot (or no GPU lowering for it)
        assert "sparse" in str(e)
    else:
        np.testing.assert_allclose(out.astype(jnp.float32), (x @ w.astype(jnp.bfloat16)).astype(jnp.float32),
                                   rtol=2e-2)


def test_sparsify_command(tmp_path):
    checkpoint.save(tmp_path / "dense", "dit", to_json_dict(TINY_I2V), tiny_dit_params())
    assert cli.main(["sparsify", "--src", str(tmp_path / "dense"), "--dst", str(tmp_path / "s"), "--nm", "2:4",
                     "--values", "int8"]) == 0
    boxes = checkpoint.load(tmp_path / "s", dtype=None)[2]
    assert isinstance(_kernel(boxes, "double_blocks/img_mlp/fc1/kernel").values, quant.QArray)
    assert cli.main(["sparsify", "--src", str(tmp_path / "dense"), "--dst", str(tmp_path / "t"), "--nm", "2-4"]) == 2


def test_13b_dit_sparse_sizes():
    """2:4 halves the selected kernels' values (+2 bits each kept); with int8 values it is below int8 alone."""
    cfg = preset("magic141-i2v-13b")
    abstract = dit.abstract_params(cfg)
    chosen = nm.select_dit(abstract, cfg)
    size = lambda f: nbytes(jax.eval_shape(f, abstract))  # noqa: E731
    dense = nbytes(abstract)
    sparse = size(lambda p: nm.compress(p, chosen))
    # the kernels left dense by the sparsity (modulation) are quantized to int8 too
    sparse8 = size(lambda p: quant.quantize_dit(nm.compress(p, chosen, values="int8"), cfg, "int8"))
    int8 = size(lambda p: quant.quantize_dit(p, cfg, "int8"))
    assert sparse < 0.75 * dense and sparse8 < int8


@pytest.mark.slow
def test_train_and_distill_configs_keep_the_dit_sparse():
    """`sparsity` in TrainConfig / DistillConfig wraps the flow step's and the generator's optimizers."""
    import dataclasses

    from m141jax.train import dmd, flow
    from m141jax.train.config import DISTILL_PRESETS, TRAIN_PRESETS, load_run_config

    assert load_run_config(TRAIN_PRESETS, None, ["preset=tiny-i2v"]).sparsity is None
    cfg = load_run_config(TRAIN_PRESETS, None, ["preset=tiny-i2v", "sparsity.end_step=0", "run.steps=3"])
    assert cfg.sparsity == SparsityConfig()
    assert load_run_config(TRAIN_PRESETS, None, ["sparsity.n=1", "sparsity=null"]).sparsity is None
    model = cfg.model
    params = dit.init_params(model, jax.random.PRNGKey(0))
    chosen = nm.select_dit(params, model, cfg.sparsity)
    b, g = 2, np.random.default_rng(0)
    batch = {"latents": g.standard_normal((b, 2, 4, 4, model.out_channels)),
             "ref_latents": g.standard_normal((b, 1, 4, 4, model.out_channels)),
             "text_states": g.standard_normal((b, 6, model.text_dim)), "text_mask": np.ones((b, 6), np.int32),
             "text_states_2": g.standard_normal((b, model.pooled_dim)),
             "null_text_states": np.zeros((4, model.text_dim)), "null_text_mask": np.array([1, 0, 0, 0]),
             "null_text_states_2": np.zeros(model.pooled_dim)}
    batch = {k: jnp.asarray(v, jnp.int32 if "mask" in k else jnp.float32) for k, v in batch.items()}
    state = flow.init_train_state(cfg, params)
    step = jax.jit(flow.make_train_step(cfg))
    for i in range(2):
        state, _ = step(state, batch, jax.random.PRNGKey(i))
    for path, lay in chosen.items():
        w = _kernel(state.params, path)
        assert (_groups_np(w != 0, lay, 4).sum(axis=-2) == 2).all(), path
        np.testing.assert_array_equal(w != 0, _kernel(state.opt_state.masks, path))

    dcfg = dataclasses.replace(DISTILL_PRESETS["tiny-i2v"], sparsity=SparsityConfig())
    dstate = dmd.init_dmd_state(dcfg, params, jax.random.PRNGKey(1))
    assert isinstance(dstate.generator_opt, sparsity.SparseState)
    assert not isinstance(dstate.critic_opt, sparsity.SparseState)  # the fake score stays dense
    path = next(iter(chosen))
    assert (_groups_np(_kernel(dstate.generator_opt.masks, path), chosen[path], 4).sum(axis=-2) == 2).all()
