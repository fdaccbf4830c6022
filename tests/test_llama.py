"""Llama parity against transformers' LlamaModel (fp32, random weights, our converter)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_encoders import convert, randomize, save_hf  # noqa: E402
from numerics import rel_err  # noqa: E402

from m141jax.config import LLAMA_PRESETS  # noqa: E402
from m141jax.models import llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama_hf(tmp_path_factory):
    """(torch LlamaModel, folder saved as LlamaForCausalLM would be: model.* keys + lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=512)
    model = randomize(LlamaForCausalLM(hf))
    return model.model, save_hf(model, tmp_path_factory.mktemp("llama_hf"))


@pytest.fixture(scope="module")
def llm_ckpt(tiny_llama_hf, tmp_path_factory):
    return convert("llm", tiny_llama_hf[1], tmp_path_factory.mktemp("llm") / "ckpt")


@pytest.mark.parity
def test_hidden_states_match_transformers(tiny_llama_hf, llm_ckpt, run_parity):
    """Every layer the parity command can select, under right padding, equals transformers' hidden_states."""
    model, _ = tiny_llama_hf
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for skip in (0, 2):
        got = run_parity("llm", llm_ckpt, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                         "--skip-layer", str(skip))["hidden_states"]
        assert got.shape == (2, 19, 64)
        assert rel_err(got, ref[-(skip + 1)].numpy()) <= 1e-5, skip
    bf16 = run_parity("llm", llm_ckpt, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, "--dtype", "bf16")
    assert rel_err(bf16["hidden_states"], ref[-3].numpy()) <= 3e-2  # bf16 weights and activations (~1e-2)


def test_skip_layer_out_of_range_is_refused():
    cfg = LLAMA_PRESETS["tiny-llama"]
    with pytest.raises(ValueError, match="skip_layer 3 is out of range"):
        llama.hidden_states(None, cfg, np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32), skip_layer=3)


def test_llama3_8b_preset_shapes_and_axes():
    """The real preset is constructible without allocation: 7.50B parameters (vocab 128320, no LM head)."""
    cfg = LLAMA_PRESETS["llama-3-8b"]
    shapes = llama.abstract_params(cfg)
    n = sum(int(np.prod(x.shape)) for x in __import__("jax").tree_util.tree_leaves(shapes))
    per_layer = 4096 * (4096 * 2 + 1024 * 2) + 3 * 4096 * 14336 + 2 * 4096
    assert n == 128320 * 4096 + 32 * per_layer + 4096
    assert shapes["layers"]["k_proj"]["kernel"].shape == (32, 4096, 8, 128)
    axes = llama.param_logical_axes(cfg)
    assert tuple(axes["layers"]["q_proj"]["kernel"]) == ("layers", "embed", "heads", "kv")
    assert tuple(axes["embed_tokens"]["embedding"]) == ("vocab", "embed")


def test_bin_shards_and_checked_keys(tiny_llama_hf, tmp_path, capsys):
    """A weights-only .bin folder converts to the same parameters; a missing or mis-shaped tensor is named
    before anything is written."""
    import json

    import jax

    from m141jax import checkpoint
    from m141jax.cli.convert import main as convert_main

    model, folder = tiny_llama_hf
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    config = (folder / "config.json").read_text()
    src = tmp_path / "bin"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    (src / "config.json").write_text(config)
    a = checkpoint.load_params(convert("llm", src, tmp_path / "from_bin"))
    b = checkpoint.load_params(convert("llm", folder, tmp_path / "from_st"))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool((x == y).all()), a, b))

    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(broken, bad / "pytorch_model.bin")
    (bad / "config.json").write_text(json.dumps(json.loads(config)))
    assert convert_main(["llm", "--src", str(bad), "--dst", str(tmp_path / "never"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "model.layers.0.self_attn.k_proj.weight: expected [32, 64]" in err
    assert not (tmp_path / "never").exists()
