"""LLaVA parity against transformers' LlavaForConditionalGeneration (fp32, random weights, our converter),
from the 4.40-era key layout of xtuner/llava-llama-3-8b-v1_1-transformers and from the current one."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_encoders import convert, randomize, save_hf  # noqa: E402
from numerics import rel_err  # noqa: E402

from m141jax.config import LLAVA_PRESETS  # noqa: E402
from m141jax.models import llava  # noqa: E402

IMAGE = 5  # image token id
XTUNER_NAMES = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
                "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector."}


@pytest.fixture(scope="module")
def tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, image_size=56, patch_size=14),
        image_token_index=IMAGE, vision_feature_layer=-2, image_seq_length=16)
    return randomize(LlavaForConditionalGeneration(cfg), std=0.08)


def _inputs():
    """Two rows, one image each (16 expanded image tokens), the second right-padded."""
    g = np.random.default_rng(0)
    ids = g.integers(6, 64, (2, 30))
    ids[0, 4:20] = IMAGE
    ids[1, 9:25] = IMAGE
    mask = np.ones_like(ids)
    mask[1, 27:] = 0
    pixels = g.normal(size=(2, 3, 56, 56)).astype(np.float32)
    return ids, mask, pixels


@pytest.mark.parity
@pytest.mark.parametrize("layout", ["xtuner", "current"])
def test_vlm_matches_transformers(tiny_llava, tmp_path, run_parity, layout):
    config = tiny_llava.config.to_dict()
    if layout == "xtuner":  # the 4.40-era config names the image token `image_token_index` and omits defaults
        config["image_token_index"] = config.pop("image_token_id", IMAGE)
    hf = save_hf(tiny_llava, tmp_path / "hf", rename=XTUNER_NAMES if layout == "xtuner" else None, config=config)
    ckpt = convert("vlm", hf, tmp_path / "ckpt")
    ids, mask, pixels = _inputs()
    with torch.no_grad():
        ref = tiny_llava(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-1]
    got = run_parity("vlm", ckpt, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})["hidden_states"]
    assert got.shape == (2, 30, 64)
    assert rel_err(got, ref.numpy()) <= 1e-5
    if layout == "current":
        bf16 = run_parity("vlm", ckpt, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, "--dtype",
                          "bf16")["hidden_states"]
        assert rel_err(bf16, ref.numpy()) <= 3e-2  # bf16 weights and activations (~1e-2)


def test_image_token_count_must_match(tiny_llava):
    cfg = LLAVA_PRESETS["tiny-llava"]
    ids = np.full((1, 600), cfg.image_token_id)
    with pytest.raises(ValueError, match="input_ids hold 600 image tokens .* 1 image\\(s\\) give 576 features"):
        llava.check_image_tokens(cfg, ids, 1)


def test_merge_follows_reading_order():
    """Image positions take feature rows in order over the whole batch (transformers' masked_scatter)."""
    embeds = np.zeros((2, 4, 1), np.float32)
    ids = np.array([[0, 9, 9, 0], [9, 0, 0, 9]])
    feats = np.arange(1, 5, dtype=np.float32).reshape(2, 2, 1)
    out = np.asarray(llava.merge_image_features(embeds, ids, feats, 9))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0], [3, 0, 0, 4]])


def test_llava_8b_preset_shapes():
    shapes = llava.abstract_params(LLAVA_PRESETS["llava-llama-3-8b"])
    assert shapes["vision_tower"]["layers"]["q_proj"]["kernel"].shape == (24, 1024, 16, 64)
    assert shapes["vision_tower"]["embeddings"]["patch_embedding"]["kernel"].shape == (14 * 14 * 3, 1024)
    assert shapes["vision_tower"]["embeddings"]["position_embedding"]["embedding"].shape == (577, 1024)
    assert shapes["projector"]["linear_1"]["kernel"].shape == (1024, 4096)
    assert LLAVA_PRESETS["llava-llama-3-8b"].vision_layers_run == 23


@pytest.mark.parity
def test_vision_tower_every_layer_matches_clip_vision_model(tmp_path):
    """The vision tower alone against transformers' CLIPVisionModel: hidden_states[n] for every n
    (0 = embeddings after pre_layrnorm), which is how LLaVA's vision_feature_layer indexes them."""
    from transformers import CLIPVisionConfig as HFVision
    from transformers import CLIPVisionModel

    from m141jax.config import CLIPVisionConfig
    from m141jax.convert.clip import VISION_ANCHOR, vision_plan
    from m141jax.convert.hf import find_prefix
    from m141jax.convert.plan import check, execute
    from m141jax.convert.sources import open_source
    from m141jax.models import clip

    model = randomize(CLIPVisionModel(HFVision(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, image_size=42, patch_size=14)), seed=2)
    source, _ = open_source(save_hf(model, tmp_path / "hf"), strip=())
    cfg = CLIPVisionConfig(image_size=42, patch_size=14, hidden_size=32, num_layers=3, num_heads=4, mlp_hidden=64,
                           param_dtype="fp32", dtype="fp32")
    plan = vision_plan(cfg, find_prefix(source.keys(), VISION_ANCHOR, "vision tower"))
    check(plan, source, ignore=lambda k: "post_layernorm" in k)
    params = execute(plan, source, clip.abstract_params(cfg), np.float32, progress=False)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 42, 42)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
    assert len(ref) == 4
    for n in range(4):
        got = clip.vision_hidden(params, cfg, np.moveaxis(pixels, 1, -1), n_layers=n)
        assert rel_err(got, ref[n].numpy()) <= 1e-5, n
