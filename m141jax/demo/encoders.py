"""The demo's text and image encoders: word-level tokenizers over the caption vocabulary and tiny
frozen (randomly initialised, never trained) LLaVA and CLIP text models of the release's architecture.

The vocabulary is every word of the shapes captions plus the words of the release's prompt templates
and negative prompt, which always surround or replace a prompt; anything else is `<unk>`. Both
tokenizers lower-case and split on whitespace and punctuation. The Llama-side one has Llama-3's
special tokens and BOS rule and the `<image>` token; the CLIP-side one wraps the prompt in
`<|startoftext|>` ... `<|endoftext|>` and pads with `<|endoftext|>`.

The frozen encoders are only a fixed, deterministic map from (prompt, first frame) to conditioning:
the DiTs learn to read it. Their sizes: Llama 3 layers of width 64 (the prompt states are layer 1,
the release's skip of 2), a CLIP vision tower on 32 px images in 4 px patches (16 of its 64 image
positions kept, as the release keeps every 4th), CLIP text 2 layers of width 32 over 16 positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from m141jax import checkpoint
from m141jax.config import CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, to_json_dict
from m141jax.data import shapes
from m141jax.encoders import Encoders
from m141jax.models import clip, llava
from m141jax.prompts import NEGATIVE_PROMPT, PROMPT_TEMPLATE_VIDEO, VLM_TEMPLATE

LLAMA_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<image>", "<pad>", "<unk>")
CLIP_SPECIAL = ("<|startoftext|>", "<unk>")
CLIP_EOS = "<|endoftext|>"  # the last id, so the argmax of the ids is also the EOS position
IMAGE_SIZE = shapes.SIZE  # the VLM sees the 32×32 frame as it is (no resize)
TEXT_LENGTH = 16  # the demo's prompt window (the release: 256); the captions take 6 tokens


def vocabulary_note() -> str:
    """The warning for prompt words outside the vocabulary (tokenizer_config.json's `m141jax_vocabulary_note`,
    read by `m141jax.encoders`)."""
    words = sorted({w for split in shapes.SPLITS for c in shapes.combinations(split) for w in shapes.caption(*c).split()})
    return (f"the demo models only know their caption vocabulary: {' '.join(words)} "
            f"(e.g. {shapes.caption(*shapes.combinations(shapes.SPLITS[0])[0])!r})")


def add_vocabulary_note(folder: Path) -> None:
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "m141jax_vocabulary_note": vocabulary_note()},
                                 indent=2, ensure_ascii=False) + "\n")


def _pre_tokenizer():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Whitespace()


def vocabulary() -> list[str]:
    """The sorted words of the captions, the prompt templates and the negative prompt."""
    norm, pre = _pre_tokenizer()
    texts = [shapes.caption(*c) for split in shapes.SPLITS for c in shapes.combinations(split)]
    texts += [PROMPT_TEMPLATE_VIDEO, VLM_TEMPLATE, NEGATIVE_PROMPT]
    words = set()
    for text in texts:
        for token in LLAMA_SPECIAL + ("{}",):
            text = text.replace(token, " ")
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    return sorted(words)


def _word_level(specials: tuple[str, ...], last: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, models

    tokens = list(specials) + vocabulary() + list(last)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens(list(specials) + list(last))
    return tok


def write_tokenizers(root: str | Path) -> tuple[Path, Path]:
    """root/tokenizer (Llama side, with the VLM's preprocessor_config.json) and root/clip_tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    root = Path(root)
    tok = _word_level(LLAMA_SPECIAL)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(root / "tokenizer"))
    add_vocabulary_note(root / "tokenizer")
    (root / "tokenizer" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": IMAGE_SIZE, "size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True,
         "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}))
    ctok = _word_level(CLIP_SPECIAL, last=(CLIP_EOS,))
    sos = CLIP_SPECIAL[0]
    ctok.post_processor = processors.TemplateProcessing(
        single=f"{sos} $A {CLIP_EOS}", special_tokens=[(sos, ctok.token_to_id(sos)), (CLIP_EOS, ctok.token_to_id(CLIP_EOS))])
    PreTrainedTokenizerFast(tokenizer_object=ctok, bos_token=sos, eos_token=CLIP_EOS, pad_token=CLIP_EOS,
                            unk_token="<unk>").save_pretrained(str(root / "clip_tokenizer"))
    return root / "tokenizer", root / "clip_tokenizer"


def configs() -> tuple[LlavaConfig, CLIPTextConfig]:
    """The frozen encoders' configs (fp32), sized to the vocabulary."""
    n = len(LLAMA_SPECIAL) + len(vocabulary())
    f32 = dict(param_dtype="fp32", dtype="fp32")
    text = LlamaConfig(vocab_size=n, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_hidden=128, **f32)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=4, hidden_size=32, num_layers=2, num_heads=4,
                              mlp_hidden=64, **f32)
    vlm = LlavaConfig(text=text, vision=vision, image_token_id=LLAMA_SPECIAL.index("<image>"))
    clip_cfg = CLIPTextConfig(vocab_size=len(CLIP_SPECIAL) + len(vocabulary()) + 1, hidden_size=32, num_layers=2,
                              num_heads=4, mlp_hidden=64, max_positions=TEXT_LENGTH,
                              eos_token_id=len(CLIP_SPECIAL) + len(vocabulary()), **f32)
    return vlm, clip_cfg


def write_encoders(root: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """The tokenizers and the frozen encoders (root/vlm, root/clip) of the demo, from `seed`."""
    root = Path(root)
    write_tokenizers(root)
    vlm, clip_cfg = configs()
    k_vlm, k_clip = jax.random.split(jax.random.PRNGKey(seed))
    checkpoint.save(root / "vlm", "vlm", to_json_dict(vlm), llava.init_params(vlm, k_vlm), overwrite=overwrite)
    checkpoint.save(root / "clip", "clip", to_json_dict(clip_cfg), clip.init_params(clip_cfg, k_clip),
                    overwrite=overwrite)
    return root


def load(root: str | Path) -> Encoders:
    """The demo encoders of a checkpoint folder (vlm/, clip/ and the tokenizers), fp32, TEXT_LENGTH prompt tokens."""
    root = Path(root)
    return Encoders.load(root / "vlm", root / "clip", root / "tokenizer", root / "clip_tokenizer", "fp32", TEXT_LENGTH)
