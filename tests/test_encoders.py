"""The release's conditioning assembly (release.md E) on tiny models and tiny offline tokenizers, checked against
transformers' models driven the way the release drives them (template, crop, hidden_states[-3], the
VLM's find-the-user-header and "::4" selection, CLIP pooling)."""

import json
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from fixtures import clip_tokenizer, llama3_tokenizer  # noqa: E402
from hf_encoders import convert, randomize, save_hf  # noqa: E402
from numerics import rel_err  # noqa: E402
from PIL import Image  # noqa: E402

from m141jax import prompts as P  # noqa: E402
from m141jax.encoders import Encoders, encode, encode_empty, encode_with_negative, text_conditioning  # noqa: E402
from m141jax.vision_input import ImageProcessing, preprocess  # noqa: E402

CORPUS = [P.PROMPT_TEMPLATE_VIDEO, P.VLM_TEMPLATE, P.NEGATIVE_PROMPT, "\n\n" * 20,
          "A cat walks on the grass, realistic style. A red car drives through a rainy city at night."] * 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, LlavaConfig, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("encoders")
    tok_dir = llama3_tokenizer(root / "tokenizer", CORPUS)
    (tok_dir / "preprocessor_config.json").write_text(json.dumps(  # the xtuner folder's older int form
        {"crop_size": 336, "size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "resample": 3}))
    clip_dir = clip_tokenizer(root / "clip_tokenizer", CORPUS)
    from transformers import AutoTokenizer

    tok, ctok = AutoTokenizer.from_pretrained(str(tok_dir)), AutoTokenizer.from_pretrained(str(clip_dir))
    vlm = randomize(LlavaForConditionalGeneration(LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=2048),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=336, patch_size=14),
        image_token_index=tok.convert_tokens_to_ids("<image>"))), std=0.08)
    clip = randomize(CLIPTextModel(CLIPTextConfig(vocab_size=len(ctok), hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4, eos_token_id=2)), seed=3)
    vlm_ckpt = convert("vlm", save_hf(vlm, root / "vlm_hf"), root / "vlm")
    clip_ckpt = convert("clip", save_hf(clip, root / "clip_hf"), root / "clip")
    enc = Encoders.load(vlm_ckpt, clip_ckpt, tok_dir, clip_dir, dtype="fp32")
    return enc, vlm, clip, tok, ctok, tok_dir


def _images():
    g = np.random.default_rng(0)
    return [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 480), (400, 350))]


def _release_vlm(vlm, tok, pixels):
    """The release's VLM path: one <image> token expanded to the feature count, last layer after the norm,
    the hidden states after the single user header, every 4th image position (text_encoder_vlm.py)."""
    ids = tok(P.VLM_PROMPT, return_tensors="pt")["input_ids"]
    header = tok(P.USER_HEADER, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = len(header)
    starts = [i for i in range(ids.shape[1] - n + 1) if torch.equal(ids[0, i:i + n], header)]
    assert len(starts) == 1
    image_id, seq = vlm.config.image_token_id, vlm.config.image_seq_length
    at = int((ids[0] == image_id).nonzero()[0])
    expanded = torch.cat([ids[0, :at], torch.full((seq,), image_id), ids[0, at + 1:]])[None].repeat(len(pixels), 1)
    with torch.no_grad():
        h = vlm(input_ids=expanded, pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    h = h[:, starts[0] + n:]
    keep = torch.ones(h.shape[1], dtype=torch.bool)
    image_mask = torch.zeros(seq, dtype=torch.bool)
    image_mask[::4] = True
    keep[at - starts[0] - n:at - starts[0] - n + seq] = image_mask
    return h[:, keep].numpy()


@pytest.mark.parity
def test_conditioning_matches_the_release(setup):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    enc, vlm, clip, tok, ctok, _ = setup
    prompts = ["A cat walks on the grass, realistic style.", ""]
    images = _images()
    cond = encode(enc, prompts, images)
    assert enc.text_length == 146 + 256
    assert cond.text_states.shape == (2, 402, 64) and cond.text_states.dtype == np.float32
    assert cond.text_mask.shape == (2, 402) and cond.text_mask.dtype == np.int32
    assert cond.text_states_2.shape == (2, 32)
    mask = np.asarray(cond.text_mask)
    assert mask[:, :146].all()
    # the prompt window: prompt tokens + <|eot_id|>, then padding
    n_prompt = len(tok(prompts[0], add_special_tokens=False)["input_ids"])
    np.testing.assert_array_equal(mask[:, 146:].sum(1), [n_prompt + 1, 1])

    # LLM: template, right padding to crop + 256, hidden_states[-3], crop
    texts = [P.PROMPT_TEMPLATE_VIDEO.format(p) for p in prompts]
    batch = tok(texts, max_length=enc.crop + 256, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = vlm.model.language_model(**batch, output_hidden_states=True).hidden_states[-3]
    assert rel_err(cond.text_states[:, 146:], h[:, enc.crop:].numpy()) <= 1e-5
    np.testing.assert_array_equal(mask[:, 146:], batch["attention_mask"][:, enc.crop:].numpy())

    # VLM on the processor's pixels
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pixels = torch.from_numpy(proc(images=images, return_tensors="np")["pixel_values"])
    assert rel_err(cond.text_states[:, :146], _release_vlm(vlm, tok, pixels)) <= 1e-5

    # CLIP pooled
    cb = ctok(prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        pooled = clip(**cb).pooler_output.numpy()
    assert rel_err(cond.text_states_2, pooled) <= 1e-5


def test_crop_is_the_template_prefix(setup):
    """The crop is computed from the tokenizer: the templated prompt starts with exactly the prefix tokens."""
    enc, _, _, tok, _, _ = setup
    prefix = tok(P.PROMPT_TEMPLATE_VIDEO.split("{}")[0])["input_ids"]
    assert enc.crop == len(prefix) and prefix[0] == tok.bos_token_id
    ids = tok(P.PROMPT_TEMPLATE_VIDEO.format("A red car"))["input_ids"]
    assert ids[:enc.crop] == prefix and ids[enc.crop:] != prefix[-1:]


@pytest.mark.parity
def test_image_template_for_one_frame(setup):
    """text_conditioning(template='image'): HunyuanVideo's one-frame template, cropped after its own prefix."""
    enc, vlm, _, tok, _, _ = setup
    prompts = ["A red car"]
    crop = P.template_crop(tok, P.PROMPT_TEMPLATE_IMAGE)
    assert 0 < crop < enc.crop
    c = text_conditioning(enc, prompts, template="image")
    states, mask = c.text_states, c.text_mask
    batch = tok([P.PROMPT_TEMPLATE_IMAGE.format(p) for p in prompts], max_length=crop + 256, padding="max_length",
                truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = vlm.model.language_model(**batch, output_hidden_states=True).hidden_states[-3]
    assert rel_err(states, h[:, crop:].numpy()) <= 1e-5
    np.testing.assert_array_equal(mask, batch["attention_mask"][:, crop:].numpy())
    assert not np.allclose(states, text_conditioning(enc, prompts).text_states)
    with pytest.raises(ValueError, match="unknown prompt template"):
        text_conditioning(enc, prompts, template="audio")


def test_vlm_selection(setup):
    """146 positions: the "\\n\\n" after the user header, image positions 0, 4, ..., 572, then <|eot_id|>."""
    enc, vlm, _, tok, _, _ = setup
    ids, keep = enc.vlm_prompt.input_ids, enc.vlm_prompt.keep
    image_id = vlm.config.image_token_id
    assert (ids == image_id).sum() == 576 and len(keep) == 146
    kept = ids[keep]
    assert tok.convert_ids_to_tokens(int(kept[0])) == "ĊĊ" and kept[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
    first = int(np.flatnonzero(ids == image_id)[0])
    np.testing.assert_array_equal(keep[1:-1] - first, np.arange(0, 576, 4))


def test_negative_keeps_image_tokens(setup):
    enc, *_ = setup
    images = _images()[:1]
    cond, uncond = encode_with_negative(enc, ["A red car"], images)
    neg = encode(enc, [P.NEGATIVE_PROMPT], images)
    np.testing.assert_array_equal(uncond.text_states[:, :146], cond.text_states[:, :146])
    np.testing.assert_allclose(uncond.text_states, neg.text_states, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(uncond.text_states_2, neg.text_states_2, rtol=1e-6, atol=1e-6)
    assert not np.allclose(uncond.text_states[:, 146:], cond.text_states[:, 146:])
    empty = encode_empty(enc, images)
    np.testing.assert_array_equal(empty.text_states[:, :146], cond.text_states[:, :146])
    assert np.asarray(empty.text_mask)[0, 146:].sum() == 1  # only the closing <|eot_id|>


def test_long_prompt_is_truncated_with_a_warning(setup):
    enc, _, _, tok, _, _ = setup
    long = " ".join(["cat"] * 300)
    n = len(tok(long, add_special_tokens=False)["input_ids"]) + 1  # + <|eot_id|>
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cond = encode(enc, [long], _images()[:1])
    messages = [str(w.message) for w in caught]
    assert any(re.match(f"prompt 0 takes {n} tokens in the text encoder's window .* holds 256: it is truncated", m)
               for m in messages), messages
    assert any(re.match("prompt 0 takes .* tokens in the CLIP text encoder .* holds 77: it is truncated", m)
               for m in messages), messages
    assert np.asarray(cond.text_mask).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode(enc, ["A red car"], _images()[:1])
    assert not caught, [str(w.message) for w in caught]


def test_bad_inputs_are_refused(setup, tmp_path):
    enc, *_ = setup
    png = tmp_path / "broken.png"
    _images()[0].save(png)
    png.write_bytes(png.read_bytes()[:400])  # truncated file
    with pytest.raises(ValueError, match="cannot read image 0: .*accepted: an image file PIL can decode"):
        encode(enc, ["a"], [png])
    with pytest.raises(ValueError, match="cannot read image 0"):
        encode(enc, ["a"], [tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="pass one image per prompt \\(2\\), got 1"):
        encode(enc, ["a", "b"], _images()[:1])
    with pytest.raises(ValueError, match="prompts must be a non-empty list of strings"):
        encode(enc, "a", _images()[:1])


def test_llm_checkpoint_gives_prompt_only_conditioning(setup, tmp_path):
    """`llm` on the LLaVA folder converts only its language model: the same prompt states, no image tokens."""
    enc, *_, tok_dir = setup
    root = tok_dir.parent
    llm = convert("llm", root / "vlm_hf", tmp_path / "llm")
    text_only = Encoders.load(llm, root / "clip", tok_dir, root / "clip_tokenizer", dtype="fp32")
    assert text_only.vlm is None and text_only.text_length == 256
    cond = encode(text_only, ["A red car"])
    full = encode(enc, ["A red car"], _images()[:1])
    assert cond.text_states.shape == (1, 256, 64)
    np.testing.assert_allclose(cond.text_states, full.text_states[:, 146:], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no VLM"):
        encode(text_only, ["A red car"], _images()[:1])


@pytest.mark.parity
def test_image_preprocessing_matches_transformers():
    """Resize (shortest side, bicubic), centre crop, rescale, normalise = CLIPImageProcessor (PIL backend).

    Transparent images: the release's transformers 4.47 drops the alpha channel (`convert("RGB")`), current
    transformers composites onto white; the release wins, so the reference gets the RGB-converted image."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 150, 4), dtype=np.uint8), "RGBA")
    images = _images() + [rgba]
    ref = proc(images=_images() + [rgba.convert("RGB")], return_tensors="np")["pixel_values"]
    got = preprocess(images, ImageProcessing())
    assert got.shape == (3, 336, 336, 3)
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), ref, atol=1e-5)
