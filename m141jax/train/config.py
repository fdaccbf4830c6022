"""Training and distillation configs (release.md C.2-C.3, F): frozen dataclasses, their named presets, and
how a run's config is made from a preset, a JSON/YAML file (`configs/train/`, `configs/distill/`) and
command-line overrides (`load_run_config`)."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from m141jax.config import DiTConfig, SparsityConfig, preset


def _finite(cfg, *names: str) -> None:
    """One-line error for a NaN or infinite float field (caught before anything compiles)."""
    for name in names:
        if not math.isfinite(getattr(cfg, name)):
            raise ValueError(f"{type(cfg).__name__}.{name} {getattr(cfg, name)} must be a finite number")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW after global-norm clipping, with a linear warm-up then a constant / cosine / linear decay; its
    state (the moments) on the device or, to free device memory, in host memory between updates."""

    learning_rate: float = 1e-5
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine | linear (down to final_lr_ratio·learning_rate at the last step)
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # 0 disables clipping
    state_memory: str = "device"  # device | host (pinned host memory, moved to the device for each update)

    def __post_init__(self):
        if self.decay not in ("constant", "cosine", "linear"):
            raise ValueError(f"unknown decay {self.decay!r}; accepted: constant, cosine, linear")
        if self.state_memory not in ("device", "host"):
            raise ValueError(f"unknown optimizer state_memory {self.state_memory!r}; accepted: device, host")
        _finite(self, "learning_rate", "final_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm")
        if self.learning_rate < 0 or self.warmup_steps < 0 or self.clip_norm < 0 or self.eps <= 0:
            raise ValueError(f"optimizer learning_rate {self.learning_rate}, warmup_steps {self.warmup_steps}, clip_norm "
                             f"{self.clip_norm} must be ≥ 0 and eps {self.eps} > 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"optimizer b1 {self.b1} and b2 {self.b2} must lie in [0, 1)")


SIGMA_SAMPLINGS = ("logit_normal", "uniform", "mode")  # the densities `FlowConfig.sigma_sampling` accepts


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """The flow-matching objective: x_σ = (1−σ)x₀ + σε, target ε − x₀ (release.md C.2), σ sampling and loss
    weighting as the release's helpers (C.3), CFG dropout as the release prepares it (F)."""

    sigma_sampling: str = "logit_normal"  # logit_normal | uniform | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0  # SD3 time shift s·σ/(1+(s−1)·σ) applied to the sampled σ; 1 = none (unknown for the release)
    weighting: str = "none"  # none | sigma_sqrt (σ⁻²) | cosmap
    cfg_dropout: float = 0.1  # probability that a sample's text is replaced by the empty prompt
    n_image_tokens: int = 146  # leading VLM image tokens of the text sequence; the dropout keeps them
    ref_frame_loss: bool = True  # include the conditioned frame 0 in the loss (unknown for the release)

    def __post_init__(self):
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"unknown sigma_sampling {self.sigma_sampling!r}; accepted: {', '.join(SIGMA_SAMPLINGS)}")
        if self.weighting not in ("none", "sigma_sqrt", "cosmap"):
            raise ValueError(f"unknown weighting {self.weighting!r}; accepted: none, sigma_sqrt, cosmap")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout {self.cfg_dropout} must lie in [0, 1]")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from: 'synthetic' (random latents + conditioning, shapes below) or a directory
    written by `m141jax prepare-data`."""

    source: str = "synthetic"
    batch_size: int = 1  # global batch; each process reads the rows its devices hold
    seed: int = 0  # shuffling seed
    read_threads: int = 4  # grain reader threads
    prefetch: int = 8  # batches read ahead
    num_samples: int = 64  # synthetic only
    frames: int = 2  # synthetic latent frames / height / width / text tokens
    height: int = 8
    width: int = 8
    text_len: int = 8


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length, randomness, logging and checkpointing of a training run."""

    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    profile_start: int = 5  # first step (0-based) of the jax.profiler trace written to RUN/profile ...
    profile_steps: int = 0  # ... and how many steps it covers; 0 = no trace
    count_flops: bool = True  # count each step's model FLOPs on its jaxpr (throughput, MFU in the metrics)
    shard_min_size: int = 0  # state arrays with fewer elements stay replicated (parallel.Strategy.min_size)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"run.steps {self.steps} must be ≥ 0 (0 sets up, checkpoints and exports only)")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError(f"run.checkpoint_every {self.checkpoint_every} and run.keep_checkpoints "
                             f"{self.keep_checkpoints} must be ≥ 1")
        if self.profile_start < 0 or self.profile_steps < 0:
            raise ValueError(f"run.profile_start {self.profile_start} and run.profile_steps {self.profile_steps} "
                             f"must be ≥ 0")
        if self.log_every < 1:
            raise ValueError(f"run.log_every {self.log_every} must be ≥ 1")
        if self.shard_min_size < 0:
            raise ValueError(f"run.shard_min_size {self.shard_min_size} must be ≥ 0")


def _check_accumulate(cfg) -> None:
    if cfg.accumulate < 1 or cfg.data.batch_size % cfg.accumulate:
        raise ValueError(f"accumulate {cfg.accumulate} must be ≥ 1 and divide data.batch_size {cfg.data.batch_size}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Flow-matching training of the DiT (`m141jax train`)."""

    model: DiTConfig = DiTConfig(param_dtype="fp32", remat="full")
    init: str = ""  # a DiT checkpoint to start from; '' = random initialisation
    flow: FlowConfig = FlowConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    ema_decay: float = 0.0  # 0 disables the EMA of the parameters
    sparsity: SparsityConfig | None = None  # N:M-sparse fine-tuning of the DiT (schedule in optimizer updates)
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()
    mesh: str = ""  # the mesh the run is meant for, e.g. 'data=8,fsdp=8' ('' = every device on fsdp); --mesh wins
    accumulate: int = 1  # gradient accumulation: each step's batch is run as this many micro-batches

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:  # 1 would export the initialisation unchanged
            raise ValueError(f"ema_decay {self.ema_decay} must lie in [0, 1) (0 disables the EMA)")
        _check_accumulate(self)


@dataclasses.dataclass(frozen=True)
class DMDConfig:
    """DMD2 adversarial step distillation. Magic141's values were not published (release.md F); the defaults are
    DMD2's (SDXL) where one exists and marked otherwise."""

    student_steps: int = 4  # the generator's σ's are the inference σ's (release.md C.1) ...
    shift: float = 5.0  # ... with this shift
    real_guidance: float = 6.0  # CFG scale of the teacher's (real) score: distils CFG (not published; 6 assumed)
    critic_steps: int = 5  # two time-scale rule: critic updates per generator update
    dm_weight: float = 1.0
    gen_gan_weight: float = 5e-3  # generator's non-saturating GAN loss
    critic_gan_weight: float = 1e-2  # discriminator loss added to the fake score's flow loss
    dm_sigma_min: float = 0.02  # σ range of the distribution-matching gradient (DMD2: timesteps 20..980)
    dm_sigma_max: float = 0.98
    dm_shift: float = 1.0  # time shift on the distribution-matching σ's
    gan_sigma_max: float = 1.0  # discriminator inputs are noised to σ ~ U[0, gan_sigma_max) (0: clean)
    head_hidden: int = 0  # discriminator head width; 0 = the DiT's hidden size
    fake_flow: FlowConfig = FlowConfig(sigma_sampling="uniform", cfg_dropout=0.0)  # the fake score's loss

    def __post_init__(self):
        if self.student_steps < 1 or self.critic_steps < 1:
            raise ValueError(f"student_steps {self.student_steps} and critic_steps {self.critic_steps} must be ≥ 1")
        if not 0.0 <= self.dm_sigma_min < self.dm_sigma_max <= 1.0:
            raise ValueError(f"dm_sigma_min {self.dm_sigma_min} / dm_sigma_max {self.dm_sigma_max} must satisfy "
                             f"0 ≤ min < max ≤ 1")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """DMD2 distillation of a teacher DiT into a few-step generator (`m141jax distill`)."""

    model: DiTConfig = DiTConfig(param_dtype="fp32", remat="full")
    teacher: str = ""  # the teacher DiT checkpoint; '' = random initialisation (tests only)
    teacher_dtype: str = "bf16"  # the frozen teacher is held in this dtype
    dmd: DMDConfig = DMDConfig()
    generator_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=5e-7, clip_norm=10.0)
    critic_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=5e-7, clip_norm=10.0)
    sparsity: SparsityConfig | None = None  # keeps the generator N:M sparse (schedule in generator updates)
    n_image_tokens: int = 146  # leading VLM image tokens kept by the real score's unconditional branch
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()
    mesh: str = ""  # the device mesh the run is meant for, e.g. 'fsdp=64' ('' = every device on fsdp); --mesh wins
    accumulate: int = 1  # gradient accumulation: each turn's batch is run as this many micro-batches

    def __post_init__(self):
        _check_accumulate(self)


_TINY = dict(param_dtype="fp32", dtype="fp32")
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "magic141-i2v-13b": TrainConfig(),
    "tiny-i2v": TrainConfig(model=preset("tiny-i2v", **_TINY), flow=FlowConfig(n_image_tokens=2),
                            optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=10),
                            data=DataConfig(batch_size=2), run=RunConfig(steps=20, checkpoint_every=10)),
}
DISTILL_PRESETS: dict[str, DistillConfig] = {
    "magic141-i2v-13b": DistillConfig(),
    "tiny-i2v": DistillConfig(model=preset("tiny-i2v", **_TINY), teacher_dtype="fp32", n_image_tokens=2,
                              dmd=DMDConfig(critic_steps=2, real_guidance=3.0),
                              generator_optimizer=OptimizerConfig(learning_rate=1e-4),
                              critic_optimizer=OptimizerConfig(learning_rate=1e-4),
                              data=DataConfig(batch_size=2), run=RunConfig(steps=20, checkpoint_every=10)),
}


def _coerce(hint, value, where: str):
    """value converted to the field type `hint` (a type or a nested config dataclass)."""
    if dataclasses.is_dataclass(hint):
        return value
    origin = getattr(hint, "__origin__", hint)
    if origin is tuple:
        return tuple(value)
    if origin is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r} must be true or false")
        return value
    if origin in (int, float):
        if isinstance(value, bool):  # YAML's true/false are not numbers
            raise ValueError(f"{where}={value!r} must be a number ({origin.__name__}), not a boolean")
        try:
            out = origin(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r} must be a number ({origin.__name__})") from None
        if origin is int and out != float(value):
            raise ValueError(f"{where}={value!r} must be an integer")
        return out
    if origin is str:
        return str(value)
    return value


def merge_config(cfg, updates: dict[str, Any], where: str = ""):
    """cfg (a config dataclass) with the fields of a nested dict replaced. A `model` given as a string is
    a DiT preset name; a dict with a 'preset' key starts from that preset. An optional nested config
    (`sparsity`) set while None starts from its defaults; null switches it off."""
    hints = typing.get_type_hints(type(cfg))
    kw = {}
    for key, value in updates.items():
        name = f"{where}{key}"
        if key not in hints:
            raise ValueError(f"unknown config field {name!r}; accepted: {sorted(hints)}")
        current = getattr(cfg, key)
        if current is None and isinstance(value, dict):  # an optional nested config, off so far: its defaults
            current = next(t for t in typing.get_args(hints[key]) if dataclasses.is_dataclass(t))()
        if value is None and type(None) in typing.get_args(hints[key]):
            kw[key] = None
            continue
        if isinstance(current, DiTConfig) and isinstance(value, str):
            value = {"preset": value}
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a mapping of fields, got {value!r}")
            value = dict(value)
            if isinstance(current, DiTConfig) and "preset" in value:
                current = preset(value.pop("preset"))
            kw[key] = merge_config(current, value, f"{name}.")
        else:
            kw[key] = _coerce(hints[key], value, name)
    return dataclasses.replace(cfg, **kw)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are JSON when they parse as JSON, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like field.sub=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override of {p!r}")
        node[leaf] = value
    return out


def load_run_config(presets: dict[str, Any], path: str | Path | None = None, overrides: list[str] = ()):
    """A training/distillation config: a preset chosen by `preset` (an override, else the file's key, else
    the first preset), the file's other keys and then `overrides` (['optimizer.learning_rate=1e-4', ...])
    merged over it. Files are JSON or YAML."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"config file {path} cannot be read ({e.strerror or e})") from None
        try:
            if str(path).endswith((".yaml", ".yml")):
                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            reason = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config file {path} is not valid {'YAML' if str(path).endswith(('.yaml', '.yml')) else 'JSON'}"
                             f"{at}: {reason}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of config fields")
    extra = parse_overrides(list(overrides))
    name = extra.pop("preset", data.pop("preset", next(iter(presets))))
    data.pop("preset", None)
    return merge_config(merge_config(preset(name, presets), data), extra)
