"""CLIP text parity against transformers' CLIPTextModel (fp32, random weights, our converter)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_encoders import convert, randomize, save_hf  # noqa: E402
from numerics import rel_err  # noqa: E402

from m141jax.config import CLIP_TEXT_PRESETS  # noqa: E402
from m141jax.models import clip  # noqa: E402

V = 120  # vocabulary; V-1 is the EOS id (the largest, as in CLIP's vocabulary)


def _inputs():
    """Right-padded batches: BOS, words, EOS, then EOS padding with mask 0 (CLIP's tokenizer pads with EOS)."""
    g = np.random.default_rng(0)
    ids = np.full((3, 16), V - 1, np.int64)
    mask = np.zeros((3, 16), np.int64)
    for b, n in enumerate((16, 9, 3)):
        ids[b, 0] = V - 2
        ids[b, 1:n - 1] = g.integers(0, V - 2, n - 2)
        mask[b, :n] = 1
    return ids, mask


def _check(text_model, ckpt, run_parity):
    ids, mask = _inputs()
    with torch.no_grad():
        ref = text_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = run_parity("clip", ckpt, {"input_ids": ids, "attention_mask": mask})
    assert got["pooled"].shape == (3, 32)
    assert rel_err(got["pooled"], ref.pooler_output.numpy()) <= 1e-5
    assert rel_err(got["last_hidden_state"], ref.last_hidden_state.numpy()) <= 1e-5


def _text_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=16, **kw)


@pytest.mark.parity
def test_full_clip_folder_legacy_eos(tmp_path, run_parity):
    """A full CLIPModel folder (text + vision, like openai/clip-vit-large-patch14) with the legacy eos id 2:
    only the text half is converted, and pooling takes the argmax of the ids."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=_text_config(eos_token_id=2).to_dict(),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        image_size=28, patch_size=14), projection_dim=16)
    model = randomize(CLIPModel(cfg))
    ckpt = convert("clip", save_hf(model, tmp_path / "hf"), tmp_path / "ckpt")
    _check(model.text_model, ckpt, run_parity)


@pytest.mark.parity
def test_text_model_folder_first_eos(tmp_path, run_parity):
    """A CLIPTextModel folder whose config names the real eos id: pooling takes its first occurrence."""
    from transformers import CLIPTextModel

    model = randomize(CLIPTextModel(_text_config(eos_token_id=V - 1, bos_token_id=V - 2, pad_token_id=V - 1)), seed=1)
    ckpt = convert("clip", save_hf(model, tmp_path / "hf"), tmp_path / "ckpt")
    _check(model, ckpt, run_parity)


def test_clip_l_preset_shapes():
    shapes = clip.abstract_params(CLIP_TEXT_PRESETS["clip-l"])
    n = sum(int(np.prod(x.shape)) for x in __import__("jax").tree_util.tree_leaves(shapes))
    assert n == 123_060_480  # CLIP ViT-L/14's text model without its projection
    assert shapes["layers"]["q_proj"]["kernel"].shape == (12, 768, 12, 64)


def test_too_long_input_is_refused():
    cfg = CLIP_TEXT_PRESETS["tiny-clip"]
    with pytest.raises(ValueError, match="longer than its 77 positions"):
        clip.text_forward(None, cfg, np.zeros((1, 78), np.int32))
