"""Weight-only quantization (release.md G): int8 per output channel, int4 in groups of 32 inputs.

The release quantizes the DiT blocks with torchao int4 (group 32) and the text encoders with
optimum-quanto int8; activations stay bf16. Here a quantized kernel is a `QArray` held in the
parameter tree in place of the dense kernel (a `compress.box.Box`): the layer that reads it gets the kernel
dequantised to its dtype right before its matmul, inside the jitted forward, one layer at a time. The
models are unchanged; only the parameter tree differs.

- int8: codes round(w/s) in [−127, 127] with s = max|w|/127 per output channel (float32);
  |w − ŵ| ≤ s/2. One byte per weight.
- int4: codes round(w/ŝ) in [−7, 7] packed two per byte along the input; per group of 32 inputs and
  output channel s_g = max|w_g|/7, stored as a uint8 multiple of u = S/255 with S the channel's largest
  s_g, rounded up so no code clips: ŝ = ⌈s_g/u⌉·u and |w − ŵ| ≤ ŝ/2 ≤ (s_g + u)/2. 4.25 bits per weight,
  which puts the 13B DiT under 7 GB (per-group bf16 scales would need 4.5 bits: 7.2 GB).

`quantize_dit` follows the release: the transformer blocks' kernels (modulation included: a quarter of
the weights) in the chosen mode, the other kernels (embeddings, final layer) in int8. The encoders get
every kernel but the vision patch embedding (`quantize_encoders`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from m141jax.compress.bits import pack_bits, unpack_bits
from m141jax.compress.box import Box, split_boxes, static
from m141jax.compress.layout import KERNEL, Layout, as_matrix, from_matrix, map_selected, select
from m141jax.config import QUANT_EXCLUDE, DiTConfig
from m141jax.models import clip, dit, llama, llava

MODES = ("int8", "int4")
BLOCKS = r"(^|/)(double_blocks|single_blocks|blocks)/"  # the DiT's stacks of transformer blocks
GROUP = 32
_INT4_MAX = 7  # codes −7..7 (stored +8 as nibbles 1..15)


class QArray(Box):
    """A weight-only quantized kernel; `unbox()` is the dequantised kernel [*lead, *shape] in `dtype`."""

    codes: jax.Array  # int8 [*lead, K, N], or int4 codes + 8 packed two per byte: uint8 [*lead, K/2, N]
    scales: jax.Array  # int8: float32 [*lead, 1, N]; int4: uint8 multiples of channel_unit [*lead, K/group, N]
    channel_unit: jax.Array | None  # int4: float32 [*lead, 1, N], the step u of the group scales
    shape: tuple = static()  # the dense kernel's shape without leading axes
    bits: int = static()
    group: int = static()  # inputs per scale (int4), 0 for one scale per output channel
    dtype: str = static()  # dtype of the dequantised kernel

    @property
    def mode(self) -> str:
        return f"int{self.bits}"

    def effective_scales(self):
        """The float32 scale of every (group of) input and output channel: [*lead, 1 or K/group, N]."""
        return self.scales if self.bits == 8 else self.scales.astype(jnp.float32) * self.channel_unit

    def unbox(self):
        s = self.effective_scales()
        if self.bits == 8:
            w = self.codes.astype(jnp.float32) * s
        else:
            q = unpack_bits(self.codes, 4).astype(jnp.float32) - (_INT4_MAX + 1)
            lead, (k, n) = q.shape[:-2], q.shape[-2:]
            w = (q.reshape(*lead, k // self.group, self.group, n) * s[..., :, None, :]).reshape(*lead, k, n)
        return from_matrix(w.astype(self.dtype), self.shape)

    def astype(self, dtype) -> "QArray":
        return self.replace(dtype=jnp.dtype(dtype).name)


def _safe(s):
    return jnp.where(s > 0, s, 1.0)


def quantize_matrix(x, mode: str, shape: tuple, dtype, group: int = GROUP) -> QArray:
    """The QArray of a kernel given as a matrix x [*lead, K, N] (reshaped to `shape` when dequantised)."""
    x = x.astype(jnp.float32)
    lead, (k, n) = x.shape[:-2], x.shape[-2:]
    name = jnp.dtype(dtype).name
    if mode == "int8":
        s = jnp.max(jnp.abs(x), axis=-2, keepdims=True) / 127.0
        codes = jnp.clip(jnp.round(x / _safe(s)), -127, 127).astype(jnp.int8)
        return QArray(codes, s, None, shape=tuple(shape), bits=8, group=0, dtype=name)
    if mode != "int4":
        raise ValueError(f"unknown quantization mode {mode!r}; accepted: {', '.join(MODES)}")
    g = x.reshape(*lead, k // group, group, n)
    s_g = jnp.max(jnp.abs(g), axis=-2) / _INT4_MAX  # [*lead, K/group, N]
    unit = jnp.max(s_g, axis=-2, keepdims=True) / 255.0  # [*lead, 1, N]
    steps = jnp.clip(jnp.ceil(s_g / _safe(unit)), 0, 255)
    s_hat = steps * unit
    q = jnp.clip(jnp.round(g / _safe(s_hat)[..., :, None, :]), -_INT4_MAX, _INT4_MAX).reshape(*lead, k, n)
    codes = pack_bits((q + _INT4_MAX + 1).astype(jnp.uint8), 4)
    return QArray(codes, steps.astype(jnp.uint8), unit, shape=tuple(shape), bits=4, group=group, dtype=name)


@functools.partial(jax.jit, static_argnames=("lay", "mode", "group"))
def quantize_kernel(w, lay: Layout, mode: str, group: int = GROUP) -> QArray:
    """The QArray of one kernel w [*lead, *in, *out]; it dequantises to w's dtype."""
    return quantize_matrix(as_matrix(w, lay), mode, lay.shape, w.dtype, group)


def check(chosen: dict[str, Layout], mode: str, group: int = GROUP) -> None:
    """One-line errors for a mode or a kernel the format cannot take."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; accepted: {', '.join(MODES)}")
    if mode == "int4":
        if group < 2 or group % 2:
            raise ValueError(f"int4 group size must be even and at least 2, got {group}")
        for path, lay in chosen.items():
            if lay.k % group:
                raise ValueError(f"int4 needs input sizes divisible by the group {group}: {path} has {lay.k} "
                                 f"inputs; exclude it")


def quantize(params, chosen: dict[str, Layout], mode: str, group: int = GROUP, free: bool = False):
    """params with the `chosen` kernels (`select`) replaced by QArrays (one jitted call per kernel).

    free: delete each dense kernel once quantized (weights nothing else uses; not under tracing), so memory
    never exceeds the dense tree by more than one kernel's quantized copy."""
    check(chosen, mode, group)

    def one(w, lay, _):
        q = quantize_kernel(w, lay, mode, group)
        if free:
            jax.block_until_ready(q)
            w.delete()
        return q

    return map_selected(one, params, chosen)


@functools.lru_cache(maxsize=8)
def dit_layouts(cfg: DiTConfig) -> dict:
    """The DiT's dense-kernel layouts (cached: tracing the model's init takes seconds)."""
    return dit.kernel_layouts(cfg)


def quantize_dit(params, cfg: DiTConfig, mode: str, group: int = GROUP, free: bool = False):
    """The DiT as the release quantizes it (release.md G.2): the kernels of the transformer blocks (double,
    single and refiner blocks) in `mode`, every other kernel (embeddings, final layer) in int8. Kernels
    already compressed (e.g. N:M sparse boxes) are left as they are."""
    layouts = dit_layouts(cfg)
    q = quantize(params, select(params, layouts, include=(BLOCKS + ".*" + KERNEL,)), mode, group, free)
    return quantize(q, select(q, layouts, exclude=(BLOCKS,)), "int8", free=free)


def encoder_layouts(enc) -> dict:
    """The dense-kernel layouts of an `encoders.Encoders` bundle's parameters (paths as in enc.params)."""
    layouts = {f"clip/{k}": v for k, v in clip.kernel_layouts(enc.clip).items()}
    if enc.vlm is not None:
        layouts.update(llava.kernel_layouts(enc.vlm))
    else:
        layouts.update({f"language_model/{k}": v for k, v in llama.kernel_layouts(enc.llm).items()})
    return layouts


def quantize_encoders(enc, mode: str, group: int = GROUP, free: bool = False):
    """The `encoders.Encoders` bundle with the kernels of the LLM, the VLM and CLIP quantized."""
    chosen = select(enc.params, encoder_layouts(enc), exclude=QUANT_EXCLUDE)
    return dataclasses.replace(enc, params=quantize(enc.params, chosen, mode, group, free))


def quantize_component(c, mode: str):
    """A loaded DiT (`components.Component`) quantized by `quantize_dit`, its dense weights freed; on a mesh
    the codes and scales are split along their output channels."""
    q = quantize_dit(c.params, c.cfg, mode, free=True)
    return dataclasses.replace(c, params=q if c.mesh is None else split_boxes(q, c.mesh))


def quantize_one(name: str, obj, mode: str):
    """One component of the generation models as `quantize_models` quantizes it: the DiTs ('dit', 't2i') in
    `mode`, the 'encoders' in int8, the 'vae' unchanged."""
    if obj is None or name == "vae":
        return obj
    return quantize_encoders(obj, "int8", free=True) if name == "encoders" else quantize_component(obj, mode)


def quantize_models(models, mode: str):
    """The generation models (`components.Models`) as the release quantizes them (release.md G.2): both DiTs
    in `mode` (their blocks; other kernels int8), the encoders in int8; the VAE unchanged. The loaded
    dense weights are freed as they are quantized; DiTs on a mesh keep their codes split over it."""
    dit = lambda c: None if c is None else quantize_component(c, mode)  # noqa: E731
    return dataclasses.replace(models, dit=dit(models.dit), t2i=dit(models.t2i),
                               encoders=quantize_encoders(models.encoders, "int8", free=True))


def quantize_checkpoint(component: str, cfg, params, mode: str, group: int = GROUP):
    """The quantized params of a dit, llm, clip or vlm model (`cfg`: its config)."""
    if component == "dit":
        return quantize_dit(params, cfg, mode, group, free=True)
    model = {"llm": llama, "clip": clip, "vlm": llava}[component]
    chosen = select(params, model.kernel_layouts(cfg), exclude=QUANT_EXCLUDE)
    return quantize(params, chosen, mode, group, free=True)
