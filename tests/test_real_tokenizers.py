"""The release's prompt layout (release.md E.1–E.3) with the real vocabularies: the Llama-3 tokenizer of
the LLaVA-Llama-3 folder and openai/clip-vit-large-patch14's CLIP tokenizer, built from the files PyPI
packages ship (tests/vocabularies.py). About 15 s on 2 cores, most of it converting Llama-3's 128k ranks."""

import numpy as np
import pytest
from transformers import AutoTokenizer
from vocabularies import clip_tokenizer, llama3_tokenizer

from m141jax import prompts as P
from m141jax.config import CLIP_TEXT_PRESETS
from m141jax.models.clip import eos_positions

PROMPT = "A cat walks on the grass, realistic style."


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return AutoTokenizer.from_pretrained(str(llama3_tokenizer(tmp_path_factory.mktemp("llama3"))))


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory):
    return AutoTokenizer.from_pretrained(str(clip_tokenizer(tmp_path_factory.mktemp("clip"))))


def test_llama3_crops_and_vlm_selection(llama3):
    """The template crop is the release's 95 (HunyuanVideo's image template: 36), the VLM keeps 146 tokens, and
    the 256-token window after the crop starts exactly at the prompt, closed by <|eot_id|>, then padding."""
    assert llama3("Hello world")["input_ids"] == [128000, 9906, 1917]  # BOS + Llama-3's own ids
    crop = P.template_crop(llama3)
    assert crop == 95
    assert P.template_crop(llama3, P.PROMPT_TEMPLATE_IMAGE) == 36
    assert len(P.vlm_prompt(llama3, llama3.convert_tokens_to_ids("<image>"), 576).keep) == 146
    ids, mask = P.llm_tokens(llama3, [PROMPT], crop)
    prompt = llama3(PROMPT, add_special_tokens=False)["input_ids"]
    n = len(prompt) + 1
    assert ids.shape == mask.shape == (1, crop + P.MAX_LENGTH)
    assert ids[0, crop:crop + n].tolist() == prompt + [llama3.convert_tokens_to_ids("<|eot_id|>")]
    assert (ids[0, crop + n:] == llama3.pad_token_id).all() and mask[0].sum() == crop + n


def test_clip_l_layout(clip_l):
    """77 tokens: <|startoftext|>, the lower-cased prompt, <|endoftext|>, padded with <|endoftext|> (the largest
    id, so the CLIP-L pooling position, the argmax of the ids, is the end token); long prompts keep their end."""
    assert clip_l("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_l("A Photo of a CAT")["input_ids"] == clip_l("a photo of a cat")["input_ids"]
    with pytest.warns(UserWarning, match="prompt 2 takes 102 tokens in the CLIP text encoder"):
        ids, mask = P.clip_tokens(clip_l, [P.NEGATIVE_PROMPT, PROMPT, "grass " * 100])
    lengths = mask.sum(1)
    assert ids.shape == (3, 77) and lengths.tolist() == [35, 12, 77]
    np.testing.assert_array_equal(eos_positions(CLIP_TEXT_PRESETS["clip-l"], ids), lengths - 1)
    assert (ids[:, 0] == 49406).all() and (ids[np.arange(3), lengths - 1] == 49407).all()
    assert all((row[n:] == 49407).all() for row, n in zip(ids, lengths))
