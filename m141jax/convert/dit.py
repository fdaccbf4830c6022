"""DiT key maps: the release's names (release.md B.8) and diffusers' `HunyuanVideoTransformer3DModel` names,
each mapped onto the JAX parameter tree of `m141jax.models.dit`.

PyTorch Linear weights are [out, in]; JAX kernels are [in, out...]. The fused qkv output axis is laid
out (3, heads, head_dim); patch-embedding inputs and final-layer outputs are permuted from PyTorch's
(c, pt, ph, pw) to the channels-last (pt, ph, pw, c). diffusers stores the final layer's modulation as
(scale, shift); the release (and this model) uses (shift, scale), so the halves are swapped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from m141jax.config import DIT_PRESETS, DiTConfig, load_json, preset
from m141jax.convert.plan import Recipe, check, execute, recipe
from m141jax.convert.sources import open_source
from m141jax.models.dit import abstract_params

# ---- the release's constructor arguments and diffusers' config.json -> DiTConfig

# release constructor argument -> DiTConfig field
_RELEASE_DIT_FIELDS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "hidden_size": "hidden_size",
    "heads_num": "num_heads", "mlp_width_ratio": "mlp_ratio", "mm_double_blocks_depth": "double_blocks",
    "mm_single_blocks_depth": "single_blocks", "patch_size": "patch_size", "rope_dim_list": "rope_axes",
    "rope_theta": "rope_theta", "qkv_bias": "qkv_bias", "qk_norm": "qk_norm", "guidance_embed": "guidance_embed",
    "text_states_dim": "text_dim", "text_states_dim_2": "pooled_dim",
}
# accepted release arguments that must hold the value the model implements
_RELEASE_DIT_FIXED = {"mlp_act_type": "gelu_tanh", "qk_norm_type": "rms", "text_projection": "single_refiner",
                      "use_attention_mask": True}
# diffusers HunyuanVideoTransformer3DModel config -> DiTConfig field
_DIFFUSERS_DIT_FIELDS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "num_layers": "double_blocks",
    "num_single_layers": "single_blocks", "num_refiner_layers": "refiner_blocks", "mlp_ratio": "mlp_ratio",
    "guidance_embeds": "guidance_embed", "text_embed_dim": "text_dim", "pooled_projection_dim": "pooled_dim",
    "rope_theta": "rope_theta", "rope_axes_dim": "rope_axes",
}


def _tuple3(v) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (1, v, v)
    if len(v) != 3:
        raise ValueError(f"patch_size {v!r} must be an int or a list of three ints (t, h, w)")
    return tuple(int(x) for x in v)


def dit_config_from_dict(d: dict[str, Any], base: DiTConfig | None = None) -> DiTConfig:
    """A DiTConfig from a release-style JSON of constructor arguments or a diffusers config.json."""
    base = base or DiTConfig()
    if "_class_name" in d or "num_attention_heads" in d:  # diffusers
        known = set(_DIFFUSERS_DIT_FIELDS) | {"num_attention_heads", "attention_head_dim", "patch_size",
                                              "patch_size_t", "qk_norm", "image_condition_type"}
        kw = {_DIFFUSERS_DIT_FIELDS[k]: v for k, v in d.items() if k in _DIFFUSERS_DIT_FIELDS}
        heads = d.get("num_attention_heads", 24)
        kw["num_heads"] = heads
        kw["hidden_size"] = heads * d.get("attention_head_dim", 128)
        kw["patch_size"] = (d.get("patch_size_t", 1), d.get("patch_size", 2), d.get("patch_size", 2))
        if d.get("qk_norm", "rms_norm") not in ("rms_norm", None):
            raise ValueError(f"qk_norm {d['qk_norm']!r} is not supported; accepted: 'rms_norm'")
        kw["qk_norm"] = d.get("qk_norm", "rms_norm") is not None
        if d.get("image_condition_type") == "token_replace":
            raise ValueError("image_condition_type 'token_replace' (HunyuanVideo-I2V 16ch) is not the Magic141 "
                             "architecture; accepted: None or 'latent_concat'")
        unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
    else:  # release constructor arguments
        kw = {_RELEASE_DIT_FIELDS[k]: v for k, v in d.items() if k in _RELEASE_DIT_FIELDS}
        for k, want in _RELEASE_DIT_FIXED.items():
            if k in d and d[k] != want:
                raise ValueError(f"{k}={d[k]!r} is not supported; accepted: {want!r}")
        ignored = {"dtype", "device", "text_states_dim_2", "model_type", "args", "text_len"}
        unknown = sorted(k for k in d if k not in _RELEASE_DIT_FIELDS and k not in _RELEASE_DIT_FIXED
                         and k not in ignored)
    if unknown:
        raise ValueError(f"unknown DiT config fields {unknown}")
    if "patch_size" in kw:
        kw["patch_size"] = _tuple3(kw["patch_size"])
    if "rope_axes" in kw:
        kw["rope_axes"] = tuple(int(x) for x in kw["rope_axes"])
    return dataclasses.replace(base, **kw)



def _cat(*xs):
    return np.concatenate(xs, axis=0)


class _Dims:
    def __init__(self, c: DiTConfig):
        self.c, self.D, self.H, self.hd, self.M = c, c.hidden_size, c.num_heads, c.head_dim, c.mlp_hidden
        self.P = math.prod(c.patch_size)


# ---- transforms from PyTorch tensors to JAX leaves (w: [out, in])
def _lin(w):
    return w.T


def _ident(b):
    return b


def _qkv_w(d: _Dims):
    return lambda *w: _cat(*w).T.reshape(-1, 3, d.H, d.hd)


def _qkv_b(d: _Dims):
    return lambda *b: _cat(*b).reshape(3, d.H, d.hd)


def _proj_w(d: _Dims):
    return lambda w: w.T.reshape(d.H, d.hd, d.D)


def _mod_w(d: _Dims, n: int, swap: bool = False):
    return lambda w: (_cat(w[d.D:], w[:d.D]) if swap else w).T.reshape(d.D, n, d.D)


def _mod_b(d: _Dims, n: int, swap: bool = False):
    return lambda b: (_cat(b[d.D:], b[:d.D]) if swap else b).reshape(n, d.D)


def _patch_in(w):  # conv [D, C, pt, ph, pw] -> [(pt, ph, pw, C), D]
    return w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])


def _patch_out_w(d: _Dims):  # [(C, pt, ph, pw), D] -> [D, (pt, ph, pw, C)]
    pt, ph, pw = d.c.patch_size
    return lambda w: w.reshape(d.c.out_channels, pt, ph, pw, d.D).transpose(1, 2, 3, 0, 4).reshape(-1, d.D).T


def _patch_out_b(d: _Dims):
    pt, ph, pw = d.c.patch_size
    return lambda b: b.reshape(d.c.out_channels, pt, ph, pw).transpose(1, 2, 3, 0).reshape(-1)


class _Plan:
    """Collects recipes with helpers shared by both naming schemes."""

    def __init__(self, c: DiTConfig):
        self.d = _Dims(c)
        self.out: list[Recipe] = []

    def add(self, target, layer, fn, *sources):
        self.out.append(recipe(target, layer, fn, *sources))

    def linear(self, target, layer, key, n_in, n_out, bias=True):
        self.add((*target, "kernel"), layer, _lin, (f"{key}.weight", (n_out, n_in)))
        if bias:
            self.add((*target, "bias"), layer, _ident, (f"{key}.bias", (n_out,)))

    def qkv(self, target, layer, keys, n_in):
        """keys: one fused key or three (q, k, v) keys."""
        D = self.d.D
        n = 3 * D // len(keys)
        self.add((*target, "kernel"), layer, _qkv_w(self.d), *((f"{k}.weight", (n, n_in)) for k in keys))
        if self.d.c.qkv_bias:
            self.add((*target, "bias"), layer, _qkv_b(self.d), *((f"{k}.bias", (n,)) for k in keys))

    def proj(self, target, layer, key):
        D = self.d.D
        self.add((*target, "kernel"), layer, _proj_w(self.d), (f"{key}.weight", (D, D)))
        self.add((*target, "bias"), layer, _ident, (f"{key}.bias", (D,)))

    def mod(self, target, layer, key, n, swap=False):
        D = self.d.D
        self.add((*target, "linear", "kernel"), layer, _mod_w(self.d, n, swap), (f"{key}.weight", (n * D, D)))
        self.add((*target, "linear", "bias"), layer, _mod_b(self.d, n, swap), (f"{key}.bias", (n * D,)))

    def mlp(self, target, layer, fc1, fc2):
        self.linear((*target, "fc1"), layer, fc1, self.d.D, self.d.M)
        self.linear((*target, "fc2"), layer, fc2, self.d.M, self.d.D)

    def rms(self, target, layer, key):
        if self.d.c.qk_norm:
            self.add((*target, "scale"), layer, _ident, (f"{key}.weight", (self.d.hd,)))

    def layer_norm(self, target, layer, key):
        self.add((*target, "scale"), layer, _ident, (f"{key}.weight", (self.d.D,)))
        self.add((*target, "bias"), layer, _ident, (f"{key}.bias", (self.d.D,)))

    def double_stream(self, layer, s, mod, qkv, q_norm, k_norm, proj, fc1, fc2):
        """One stream ('img' or 'txt') of a double block, from its PyTorch key names."""
        t = ("double_blocks",)
        self.mod((*t, f"{s}_mod"), layer, mod, 6)
        self.qkv((*t, f"{s}_attn", "qkv"), layer, qkv, self.d.D)
        self.rms((*t, f"{s}_attn", "q_norm"), layer, q_norm)
        self.rms((*t, f"{s}_attn", "k_norm"), layer, k_norm)
        self.proj((*t, f"{s}_attn_proj"), layer, proj)
        self.mlp((*t, f"{s}_mlp"), layer, fc1, fc2)

    def single_out(self, layer, key):
        """A single block's linear2 [D, D + M]: attention-output columns, then MLP columns (+ the bias)."""
        d, t = self.d, ("single_blocks",)
        w = (f"{key}.weight", (d.D, d.D + d.M))
        self.add((*t, "linear2_attn", "kernel"), layer, lambda w: w[:, :d.D].T.reshape(d.H, d.hd, d.D), w)
        self.add((*t, "linear2_mlp", "kernel"), layer, lambda w: w[:, d.D:].T, w)
        self.add((*t, "linear2_mlp", "bias"), layer, _ident, (f"{key}.bias", (d.D,)))

    def stems(self, c: DiTConfig, names: dict[str, str]):
        """The embedders and the final projection (everything outside the block stacks)."""
        D, pt, ph, pw = self.d.D, *c.patch_size
        self.add(("img_in", "kernel"), None, _patch_in, (f"{names['img_in']}.weight", (D, c.in_channels, pt, ph, pw)))
        self.add(("img_in", "bias"), None, _ident, (f"{names['img_in']}.bias", (D,)))
        embedders = [("time_in",), ("txt_in", "t_embedder")] + ([("guidance_in",)] if c.guidance_embed else [])
        for path in embedders:
            key = names[".".join(path)]
            self.linear((*path, "mlp_0"), None, key[0], 256, D)
            self.linear((*path, "mlp_2"), None, key[1], D, D)
        self.linear(("vector_in", "in_layer"), None, names["vector_in"][0], c.pooled_dim, D)
        self.linear(("vector_in", "out_layer"), None, names["vector_in"][1], D, D)
        self.linear(("txt_in", "input_embedder"), None, names["input_embedder"], c.text_dim, D)
        self.linear(("txt_in", "c_embedder", "linear_1"), None, names["c_embedder"][0], c.text_dim, D)
        self.linear(("txt_in", "c_embedder", "linear_2"), None, names["c_embedder"][1], D, D)
        n_out = c.out_channels * self.d.P
        self.add(("final_layer", "linear", "kernel"), None, _patch_out_w(self.d), (f"{names['final']}.weight", (n_out, D)))
        self.add(("final_layer", "linear", "bias"), None, _patch_out_b(self.d), (f"{names['final']}.bias", (n_out,)))


def release_plan(c: DiTConfig) -> list[Recipe]:
    """Recipes from the release's state-dict names (release.md B.8)."""
    p, d = _Plan(c), _Dims(c)
    D, M = d.D, d.M
    p.stems(c, {"img_in": "img_in.proj", "time_in": ("time_in.mlp.0", "time_in.mlp.2"),
                "txt_in.t_embedder": ("txt_in.t_embedder.mlp.0", "txt_in.t_embedder.mlp.2"),
                "guidance_in": ("guidance_in.mlp.0", "guidance_in.mlp.2"),
                "vector_in": ("vector_in.in_layer", "vector_in.out_layer"), "input_embedder": "txt_in.input_embedder",
                "c_embedder": ("txt_in.c_embedder.linear_1", "txt_in.c_embedder.linear_2"), "final": "final_layer.linear"})
    p.mod(("final_layer", "adaLN_modulation"), None, "final_layer.adaLN_modulation.1", 2)
    for i in range(c.refiner_blocks):
        k, t = f"txt_in.individual_token_refiner.blocks.{i}", ("txt_in", "blocks")
        p.layer_norm((*t, "norm1"), i, f"{k}.norm1")
        p.layer_norm((*t, "norm2"), i, f"{k}.norm2")
        p.qkv((*t, "self_attn", "qkv"), i, [f"{k}.self_attn_qkv"], D)
        p.proj((*t, "self_attn_proj"), i, f"{k}.self_attn_proj")
        p.mlp((*t, "mlp"), i, f"{k}.mlp.fc1", f"{k}.mlp.fc2")
        p.mod((*t, "adaLN_modulation"), i, f"{k}.adaLN_modulation.1", 2)
    for i in range(c.double_blocks):
        k = f"double_blocks.{i}"
        for s in ("img", "txt"):
            p.double_stream(i, s, f"{k}.{s}_mod.linear", [f"{k}.{s}_attn_qkv"], f"{k}.{s}_attn_q_norm",
                            f"{k}.{s}_attn_k_norm", f"{k}.{s}_attn_proj", f"{k}.{s}_mlp.fc1", f"{k}.{s}_mlp.fc2")
    for i in range(c.single_blocks):
        k, t = f"single_blocks.{i}", ("single_blocks",)
        p.mod((*t, "modulation"), i, f"{k}.modulation.linear", 3)
        w1, b1 = (f"{k}.linear1.weight", (3 * D + M, D)), (f"{k}.linear1.bias", (3 * D + M,))
        p.add((*t, "linear1", "qkv", "kernel"), i, lambda w: _qkv_w(d)(w[:3 * D]), w1)
        p.add((*t, "linear1", "qkv", "bias"), i, lambda b: _qkv_b(d)(b[:3 * D]), b1)
        p.add((*t, "linear1_mlp", "kernel"), i, lambda w: w[3 * D:].T, w1)
        p.add((*t, "linear1_mlp", "bias"), i, lambda b: b[3 * D:], b1)
        p.single_out(i, f"{k}.linear2")
        p.rms((*t, "linear1", "q_norm"), i, f"{k}.q_norm")
        p.rms((*t, "linear1", "k_norm"), i, f"{k}.k_norm")
    return p.out


def diffusers_plan(c: DiTConfig) -> list[Recipe]:
    """Recipes from diffusers' HunyuanVideoTransformer3DModel names (latent_concat / plain T2V)."""
    p, d = _Plan(c), _Dims(c)
    D = d.D
    te = "context_embedder.time_text_embed"
    p.stems(c, {"img_in": "x_embedder.proj",
                "time_in": ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"),
                "txt_in.t_embedder": (f"{te}.timestep_embedder.linear_1", f"{te}.timestep_embedder.linear_2"),
                "guidance_in": ("time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2"),
                "vector_in": ("time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2"),
                "input_embedder": "context_embedder.proj_in",
                "c_embedder": (f"{te}.text_embedder.linear_1", f"{te}.text_embedder.linear_2"), "final": "proj_out"})
    p.mod(("final_layer", "adaLN_modulation"), None, "norm_out.linear", 2, swap=True)
    for i in range(c.refiner_blocks):
        k, t = f"context_embedder.token_refiner.refiner_blocks.{i}", ("txt_in", "blocks")
        p.layer_norm((*t, "norm1"), i, f"{k}.norm1")
        p.layer_norm((*t, "norm2"), i, f"{k}.norm2")
        p.qkv((*t, "self_attn", "qkv"), i, [f"{k}.attn.to_q", f"{k}.attn.to_k", f"{k}.attn.to_v"], D)
        p.proj((*t, "self_attn_proj"), i, f"{k}.attn.to_out.0")
        p.mlp((*t, "mlp"), i, f"{k}.ff.net.0.proj", f"{k}.ff.net.2")
        p.mod((*t, "adaLN_modulation"), i, f"{k}.norm_out.linear", 2)
    for i in range(c.double_blocks):
        k = f"transformer_blocks.{i}"
        for s, mod, qkv, qn, kn, proj, ff in (
                ("img", "norm1", ("to_q", "to_k", "to_v"), "norm_q", "norm_k", "to_out.0", "ff"),
                ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "norm_added_q", "norm_added_k",
                 "to_add_out", "ff_context")):
            p.double_stream(i, s, f"{k}.{mod}.linear", [f"{k}.attn.{n}" for n in qkv], f"{k}.attn.{qn}",
                            f"{k}.attn.{kn}", f"{k}.attn.{proj}", f"{k}.{ff}.net.0.proj", f"{k}.{ff}.net.2")
    for i in range(c.single_blocks):
        k, t = f"single_transformer_blocks.{i}", ("single_blocks",)
        p.mod((*t, "modulation"), i, f"{k}.norm.linear", 3)
        p.qkv((*t, "linear1", "qkv"), i, [f"{k}.attn.to_q", f"{k}.attn.to_k", f"{k}.attn.to_v"], D)
        p.linear((*t, "linear1_mlp"), i, f"{k}.proj_mlp", D, d.M)
        p.single_out(i, f"{k}.proj_out")
        p.rms((*t, "linear1", "q_norm"), i, f"{k}.attn.norm_q")
        p.rms((*t, "linear1", "k_norm"), i, f"{k}.attn.norm_k")
    return p.out


def ignored(key: str) -> bool:
    """Keys the release defines but never uses in its forward pass (`text_guidance_in`, release.md K.2 item 16)."""
    return key.startswith("text_guidance_in.")


def detect_naming(keys) -> str:
    """'diffusers' or 'release' from the key set."""
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("double_blocks.", "single_blocks.", "img_in.")) for k in keys):
        return "release"
    raise ValueError("cannot tell the naming scheme: no double_blocks.* / transformer_blocks.* keys")


def plan_for(c: DiTConfig, keys) -> tuple[str, list[Recipe]]:
    naming = detect_naming(keys)
    return naming, (diffusers_plan(c) if naming == "diffusers" else release_plan(c))


def resolve_config(config: str | None, folder_config: dict | None) -> DiTConfig:
    """--config as a JSON file (release arguments or diffusers config.json) or a preset name; else the
    source folder's config.json; else the released 13B I2V preset."""
    from pathlib import Path

    if config is not None:
        if Path(config).is_file():
            return dit_config_from_dict(load_json(config))
        if config in DIT_PRESETS:
            return preset(config)
        raise ValueError(f"--config {config!r} is neither a JSON file nor a preset; presets: {sorted(DIT_PRESETS)}")
    if folder_config is not None:
        return dit_config_from_dict(folder_config)
    return preset("magic141-i2v-13b")


def convert(src: str, config: str | None, dtype, progress: bool = True):
    """(DiTConfig, numpy parameter tree) from a PyTorch DiT checkpoint."""
    import dataclasses

    source, folder_config = open_source(src, strip=("model.", "module.", "hydit_unimodel.guidance_model.feedforward_model."))
    cfg = resolve_config(config, folder_config)
    naming, plan = plan_for(cfg, source.keys())
    print(f"dit: {naming} names, {len(source.keys())} tensors"
          + (f", prefix {source.prefix!r} stripped" if source.prefix else ""), flush=True)
    check(plan, source, ignore=ignored, what=f"{naming}-named DiT checkpoint")
    params = execute(plan, source, abstract_params(cfg), dtype, progress)
    return dataclasses.replace(cfg, param_dtype="bf16" if dtype != np.float32 else "fp32"), params
