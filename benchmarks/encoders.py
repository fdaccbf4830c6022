"""Encoder benchmarks: forwards against transformers on the same config and weights, and memory.

    PYTHONPATH=. python benchmarks/encoders.py [--size small|full] [--repeats N] [--no-forward]
                                               [--convert-memory GB]

- Forward (`encoders_forward`): the prompt encoder (Llama, hidden_states[-3], 351 tokens), CLIP-L text
  (77 tokens) and the VLM (vision tower + projector + Llama on the expanded image prompt), batch 1,
  JAX (jit, compiled beforehand) against transformers' LlamaModel / CLIPTextModel /
  LlavaForConditionalGeneration holding the same random weights (mapped by the converter's key
  plans). `ratio` = torch_s / jax_s (> 1: JAX is faster); on CPU PyTorch's time is its faster of 1 thread
  and its default thread count. `small` (default on CPU) shrinks the Llama
  and the vision tower; `full` is the release's sizes in bf16 (needs an accelerator: ~16 GB of weights
  for each framework). fp32 on CPU, bf16 on accelerators.
- Memory (`encoders_memory`): parameter bytes of the 8B encoders (LLaVA-Llama-3-8B: language model,
  vision tower, projector; CLIP-L text) from jax.eval_shape, in bf16 and in int8 weight-only form
  (every Linear kernel int8 + one bf16 scale per output channel; embeddings, norms and biases bf16).
  `encoders_workspace`: XLA's temporary buffers of the compiled 8B forwards (AOT, nothing allocated).
  On CPU they are compiled in fp32, because XLA:CPU upcasts bf16 weights to f32 copies.
- `--convert-memory GB`: peak resident memory of `tools/convert_torch_weights.py vlm` on a synthetic
  LLaVA checkpoint of about GB gigabytes (fp16 safetensors, written sparse), against the size of the
  converted bf16 parameters (`encoders_convert_memory`). The 8B model is ~16 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for the PyTorch reference

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import result  # noqa: E402

from m141jax.config import CLIP_TEXT_PRESETS, LLAVA_PRESETS, CLIPVisionConfig, LlamaConfig, LlavaConfig  # noqa: E402
from m141jax.convert.clip import VISION_ANCHOR  # noqa: E402
from m141jax.convert.clip import plan_for as clip_plan_for  # noqa: E402
from m141jax.convert.llava import plan_for as llava_plan_for  # noqa: E402
from m141jax.convert.plan import execute  # noqa: E402
from m141jax.models import clip, llama, llava  # noqa: E402

SMALL_LLAMA = LlamaConfig(vocab_size=32000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                          mlp_hidden=1536)
SMALL_VISION = CLIPVisionConfig(hidden_size=256, num_layers=4, num_heads=4, mlp_hidden=1024)


def gb(nbytes: float) -> float:
    return nbytes / 1e9


# ------------------------------------------------------------------------------------------ forward

class StateDictSource:
    """The converter's TensorSource interface over an in-memory torch state dict."""

    prefix = ""

    def __init__(self, state):
        self.state = state

    def keys(self):
        return set(self.state)

    def shape(self, key):
        return tuple(self.state[key].shape)

    def get(self, key):
        from m141jax.convert.sources import _torch_to_numpy

        return _torch_to_numpy(self.state[key].cpu())


def _timed(fn, repeats: int, sync) -> float:
    sync(fn())  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _torch_env(accelerated: bool):
    import torch

    device = "cuda" if accelerated and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if accelerated else torch.float32
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    return torch, device, dtype, sync


def _jax_params(plan, state, abstract, np_dtype):
    tree = execute(plan, StateDictSource(state), abstract, np_dtype, progress=False)
    return jax.device_put(tree)


def _compare(name: str, jax_fn, torch_fn, repeats: int, sync, **info) -> None:
    """Median times; on CPU PyTorch gets its faster of 1 thread and its default count (its OpenMP threads
    slow down badly when the machine's cores are shared)."""
    import torch

    jax_s = _timed(jax_fn, repeats, jax.block_until_ready)
    counts = sorted({1, torch.get_num_threads()}) if jax.default_backend() == "cpu" else [torch.get_num_threads()]
    default, times = torch.get_num_threads(), {}
    for n in counts:
        torch.set_num_threads(n)
        times[n] = _timed(torch_fn, repeats, sync)
    torch.set_num_threads(default)
    threads = min(times, key=times.get)
    result("encoders_forward", model=name, device=jax.default_backend(), **info, jax_s=jax_s, torch_s=times[threads],
           torch_threads=threads, ratio=times[threads] / jax_s)


def bench_forward(size: str, repeats: int) -> None:
    from transformers import CLIPTextConfig as HFClipText
    from transformers import CLIPTextModel, LlavaForConditionalGeneration
    from transformers import LlavaConfig as HFLlava

    accelerated = jax.default_backend() != "cpu"
    torch, device, tdtype, sync = _torch_env(accelerated)
    dt = "bf16" if accelerated else "fp32"
    np_dtype = ml_dtypes.bfloat16 if accelerated else np.float32
    torch.manual_seed(0)
    cfg = LLAVA_PRESETS["llava-llama-3-8b"] if size == "full" else LlavaConfig(text=SMALL_LLAMA, vision=SMALL_VISION,
                                                                                  image_token_id=31999)
    t, v = cfg.text, cfg.vision
    hf = HFLlava(text_config=dict(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                  intermediate_size=t.mlp_hidden, num_hidden_layers=t.num_layers,
                                  num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                                  rope_theta=t.rope_theta, rms_norm_eps=t.rms_eps),
                 vision_config=dict(model_type="clip_vision_model", hidden_size=v.hidden_size,
                                    intermediate_size=v.mlp_hidden, num_hidden_layers=v.num_layers,
                                    num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size),
                 image_token_index=cfg.image_token_id)
    torch.set_default_dtype(tdtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(hf).eval()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(t, param_dtype=dt, dtype=dt),
                              vision=dataclasses.replace(v, param_dtype=dt, dtype=dt))
    state = model.state_dict()
    plan, _ = llava_plan_for(cfg, state.keys())
    params = _jax_params(plan, state, llava.abstract_params(cfg), np_dtype)
    del state

    # prompt encoder: 351 tokens, right-padded, hidden_states[-3]
    g = np.random.default_rng(0)
    ids = g.integers(0, 1000, (1, 351)).astype(np.int32)
    mask = (np.arange(351) < 120).astype(np.int32)[None]
    tids, tmask = (torch.from_numpy(x).long().to(device) for x in (ids, mask))
    lm = params["language_model"]
    prompt = jax.jit(lambda p, i, m: llama.hidden_states(p, cfg.text, i, m, 2))
    with torch.no_grad():
        _compare("llm", lambda: prompt(lm, ids, mask),
                 lambda: model.model.language_model(input_ids=tids, attention_mask=tmask, output_hidden_states=True  # noqa: F821
                                                    ).hidden_states[-3], repeats, sync, size=size, batch=1, tokens=351)

    n_text = 153  # the release's VLM prompt: 153 text tokens + 576 image positions with Llama-3
    vids = np.concatenate([g.integers(0, 1000, n_text // 2), np.full(cfg.image_seq_length, cfg.image_token_id),
                           g.integers(0, 1000, n_text - n_text // 2)]).astype(np.int32)[None]
    pixels = g.normal(size=(1, v.image_size, v.image_size, 3)).astype(np.float32)
    vlm = jax.jit(lambda p, i, m, px: llava.llava_forward(p, cfg, i, m, px))
    tv, tpx = torch.from_numpy(vids).long().to(device), torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device, tdtype)
    vmask = np.ones_like(vids)
    with torch.no_grad():
        _compare("vlm", lambda: vlm(params, vids, vmask, pixels),  # noqa: F821
                 lambda: model(input_ids=tv, pixel_values=tpx, output_hidden_states=True).hidden_states[-1],  # noqa: F821
                 repeats, sync, size=size, batch=1, tokens=vids.shape[1])
    del model, params

    # CLIP-L text at its real size in both modes
    ccfg = dataclasses.replace(CLIP_TEXT_PRESETS["clip-l"], param_dtype=dt, dtype=dt, eos_token_id=49407)
    with torch.device(device):
        cmodel = CLIPTextModel(HFClipText(vocab_size=ccfg.vocab_size, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12, eos_token_id=49407)).eval()
    torch.set_default_dtype(torch.float32)
    cstate = cmodel.state_dict()
    cparams = _jax_params(clip_plan_for(ccfg, cstate.keys())[0], cstate, clip.abstract_params(ccfg), np_dtype)
    cids = np.full((1, 77), 49407, np.int32)
    cids[0, :20] = g.integers(0, 49406, 20)
    cmask = (np.arange(77) < 21).astype(np.int32)[None]
    fwd = jax.jit(lambda p, i, m: clip.text_forward(p, ccfg, i, m)[1])
    ti, tm = (torch.from_numpy(x).long().to(device) for x in (cids, cmask))
    with torch.no_grad():
        _compare("clip", lambda: fwd(cparams, cids, cmask), lambda: cmodel(input_ids=ti, attention_mask=tm).pooler_output,
                 repeats, sync, size="clip-l", batch=1, tokens=77)


# ------------------------------------------------------------------------------------------- memory

def _bytes(shapes, dtype: str) -> tuple[int, float]:
    """(parameter count, bytes) of a ShapeDtypeStruct tree stored in bf16, or with its Linear kernels in int8
    (one bf16 scale per group of 128 weights) and everything else in bf16."""
    count, nbytes = 0, 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        n = int(np.prod(leaf.shape))
        count += n
        nbytes += n + 2 * -(-n // 128) if dtype == "int8" and path[-1].key == "kernel" else 2 * n
    return count, nbytes


def bench_memory() -> None:
    trees = {"llava-llama-3-8b": llava.abstract_params(LLAVA_PRESETS["llava-llama-3-8b"]),
             "clip-l": clip.abstract_params(CLIP_TEXT_PRESETS["clip-l"])}
    for dtype in ("bf16", "int8"):
        total = [0, 0.0]
        for name, tree in trees.items():
            n, b = _bytes(tree, dtype)
            total[0] += n
            total[1] += b
            result("encoders_memory", model=name, dtype=dtype, params=n, gb=gb(b))
        result("encoders_memory", model="encoders-8b", dtype=dtype, params=total[0], gb=gb(total[1]))


def bench_workspace() -> None:
    dt = "fp32" if jax.default_backend() == "cpu" else "bf16"
    cfg = LLAVA_PRESETS["llava-llama-3-8b"]
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, param_dtype=dt, dtype=dt),
                              vision=dataclasses.replace(cfg.vision, param_dtype=dt, dtype=dt))
    shapes = llava.abstract_params(cfg)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    n_vlm = 153 + cfg.image_seq_length
    cases = {
        "llm": (lambda p, i, m: llama.hidden_states(p["language_model"], cfg.text, i, m, 2), (i32(1, 351), i32(1, 351))),
        "vlm": (lambda p, i, m, px: llava.llava_forward(p, cfg, i, m, px),
                (i32(1, n_vlm), i32(1, n_vlm), jax.ShapeDtypeStruct((1, 336, 336, 3), jnp.float32))),
    }
    for name, (fn, args) in cases.items():
        stats = jax.jit(fn).lower(shapes, *args).compile().memory_analysis()
        result("encoders_workspace", model=name, device=jax.default_backend(), dtype=dt, batch=1,
               params_gb=gb(stats.argument_size_in_bytes), temp_gb=gb(stats.temp_size_in_bytes))


# --------------------------------------------------------------------------------- convert memory

def _synthetic_llava(folder: Path, target_gb: float) -> LlavaConfig:
    """A LLaVA folder of ~target_gb (fp16, zeros written as a sparse file) shaped like the 8B model,
    with fewer Llama layers (or the full 32 at 16 GB)."""
    from m141jax.convert.plan import expected_keys

    base = LLAVA_PRESETS["llava-llama-3-8b"]
    per_layer = 2 * (4096 * 6144 + 3 * 4096 * 14336)
    fixed = 2 * (128320 * 4096 + 0.3e9)
    layers = int(min(32, max(1, (target_gb * 1e9 - fixed) // per_layer)))
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_layers=layers))
    anchors = {"language_model.model.embed_tokens.weight", f"vision_tower.vision_model.{VISION_ANCHOR}",
               "multi_modal_projector.linear_1.weight"}  # the 4.40-era names of xtuner's folder
    keys = expected_keys(llava_plan_for(cfg, anchors)[0])
    header, offset = {}, 0
    for k, s in keys.items():
        n = 2 * int(np.prod(s))
        header[k] = {"dtype": "F16", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    t, v = cfg.text, cfg.vision
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llava", "image_token_index": cfg.image_token_id, "vision_feature_layer": -2,
        "text_config": {"model_type": "llama", "vocab_size": t.vocab_size, "intermediate_size": t.mlp_hidden,
                        "num_hidden_layers": t.num_layers, "num_key_value_heads": t.num_kv_heads,
                        "rope_theta": t.rope_theta, "rms_norm_eps": t.rms_eps},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                          "intermediate_size": v.mlp_hidden, "num_hidden_layers": v.num_layers,
                          "num_attention_heads": v.num_heads, "image_size": v.image_size,
                          "patch_size": v.patch_size}}))
    return cfg


def bench_convert_memory(target_gb: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        cfg = _synthetic_llava(src, target_gb)
        _, out_bytes = _bytes(llava.abstract_params(cfg), "bf16")
        tool = Path(__file__).resolve().parents[1] / "tools" / "convert_torch_weights.py"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(tool), "vlm", "--src", str(src), "--dst", str(dst), "--quiet"], check=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        result("encoders_convert_memory", llama_layers=cfg.text.num_layers, params_gb=gb(out_bytes),
               peak_rss_gb=gb(peak), ratio=peak / out_bytes, convert_s=time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("small", "full"), default=None,
                   help="forward sizes (default: small on CPU, full on accelerators)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-forward", action="store_true", help="memory measurements only")
    p.add_argument("--convert-memory", type=float, metavar="GB", help="also measure the converter's peak memory")
    args = p.parse_args()
    if not args.no_forward:
        bench_forward(args.size or ("small" if jax.default_backend() == "cpu" else "full"), args.repeats)
    bench_memory()
    bench_workspace()
    if args.convert_memory:
        bench_convert_memory(args.convert_memory)


if __name__ == "__main__":
    main()
