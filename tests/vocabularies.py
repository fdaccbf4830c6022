"""The release's two tokenizers with their real vocabularies, built offline from the files PyPI packages
ship: Llama-3's tiktoken BPE ranks from `llama-models` (llama3/tokenizer.model) and OpenAI CLIP's BPE
merges from `open_clip_torch` (bpe_simple_vocab_16e6.txt.gz). The packages are located, never imported
(open_clip would import torchvision), and a test using them is skipped where one is not installed (CI
installs both: .ci/run)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                  + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])
"""Meta-Llama-3-8B-Instruct's 256 special tokens, ids 128000 on (the LLaVA-Llama-3 LLM's)."""
LLAVA_ADDED = ["<image>", "<pad>"]  # the tokens the LLaVA-Llama-3 folder adds after them
DISTRIBUTIONS = {"llama_models": "llama-models", "open_clip": "open_clip_torch"}  # package → PyPI name


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package; skips the calling
    test when the package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"needs {relative} from PyPI's {DISTRIBUTIONS[package]}: pip install --no-deps "
                    f"{DISTRIBUTIONS[package]}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{package} no longer ships {relative}")
    return path


def llama3_tokenizer(folder: Path) -> Path:
    """The LLaVA-Llama-3 tokenizer folder: the real Llama-3 BPE (converted by transformers' TikTokenConverter,
    which reads it with tiktoken), its special tokens, the added <image> / <pad>, and BOS prepended."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pytest.importorskip("tiktoken")
    ranks = package_file("llama_models", "llama3/tokenizer.model")
    tok = TikTokenConverter(str(ranks), extra_special_tokens=LLAMA3_SPECIAL + LLAVA_ADDED).converted()
    bos = LLAMA3_SPECIAL[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return folder


def clip_tokenizer(folder: Path) -> Path:
    """The openai/clip-vit-large-patch14 tokenizer folder (vocab.json, merges.txt; what HunyuanVideo's
    text_encoder_2 holds), built the way CLIP's SimpleTokenizer builds its vocabulary from the merges."""
    from transformers import CLIPTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8").read()
    merges = lines.split("\n")[1:49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                      model_max_length=77).save_pretrained(str(folder))
    return folder
