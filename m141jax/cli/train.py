"""`m141jax prepare-data`, `m141jax train` (flow matching) and `m141jax distill` (DMD2) from a config file.

    m141jax train   --config CFG.yaml --output RUN [--mesh data=1,fsdp=8] [--quiet] [field.sub=value ...]
    m141jax distill --config CFG.yaml --output RUN [--mesh ...] [--quiet] [field.sub=value ...]

On several hosts every host runs the same command with --coordinator HOST:PORT --num-processes N
--process-id I (or 'auto', or the JAX_* variables): each reads only its rows of every batch, Orbax
checkpoints are written by all of them together, and process 0 writes config.json, metrics and events.

Starting points are configs/train/*.yaml and configs/distill/*.yaml; --mesh wins over the file's `mesh`.

RUN receives config.json, checkpoints/ (Orbax, resumed from automatically), metrics.csv, TensorBoard event
files (`tensorboard --logdir RUN`), profile/ (a jax.profiler trace when run.profile_steps > 0) and, at the
end, the trained DiT as an m141jax checkpoint: RUN/dit (the EMA when enabled) or RUN/generator.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m141jax import checkpoint, media, parallel
from m141jax.cli import devices
from m141jax.config import DiTConfig, to_json_dict
from m141jax.models.dit import init_params
from m141jax.train import data as data_lib
from m141jax.train import dmd, flow, observe, prepare
from m141jax.train.checkpointing import RunCheckpoints
from m141jax.train.config import DISTILL_PRESETS, TRAIN_PRESETS, load_run_config
from m141jax.train.dmd import generator_turn, init_dmd_state, make_dmd_step
from m141jax.train.flow import init_train_state, make_train_step
from m141jax.train.loop import MetricsLog, run_loop
from m141jax.train.mesh import batch_shardings, check_batch, dit_config, make_mesh, state_shardings, strategy


def _record_config(out: Path, cfg) -> None:
    """Write RUN/config.json; when resuming with a changed config, say which fields changed."""
    new = to_json_dict(cfg)
    path = out / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            print(f"note: config fields changed since the run started: {', '.join(changed)}")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(new, indent=1))
    tmp.replace(path)


def _load_dit(path: str, model: DiTConfig, dtype: str, mesh):
    """A DiT checkpoint's parameters in `dtype` on `mesh`, checked to match the model's architecture."""
    return checkpoint.load(path, ("dit",), dtype, mesh=mesh, architecture=model)[2]


class _Run:
    """What both commands share: output dir, mesh, data iterator, checkpoints, metrics, the loop."""

    def __init__(self, args, cfg, n_image_tokens: int, host: tuple[str, ...] = ()):
        self.out = Path(args.output)
        self.lead = jax.process_index() == 0  # the process that writes config, metrics and events
        if self.lead:
            self.out.mkdir(parents=True, exist_ok=True)
            _record_config(self.out, cfg)
        parallel.sync("m141jax run directory")
        self.mesh = make_mesh(args.mesh or cfg.mesh or None)  # --mesh, else the config file's `mesh`
        check_batch(cfg.data.batch_size, self.mesh)
        # the DiT attends over the mesh's sequence axis (Ulysses or ring) when it has one
        self.cfg = cfg = dataclasses.replace(cfg, model=dit_config(cfg.model, self.mesh))
        self.strategy = strategy(self.mesh, cfg.run.shard_min_size, host)  # host: state fields in host memory
        self.batch_sharding = batch_shardings(self.mesh)
        source = data_lib.open_source(cfg.data, cfg.model, n_image_tokens)
        self.data_iter = data_lib.make_iterator(
            source, cfg.data, data_lib.process_rows(self.batch_sharding["batch"], cfg.data.batch_size))
        self.ckpt = RunCheckpoints(self.out / "checkpoints", cfg.run.checkpoint_every, cfg.run.keep_checkpoints,
                                   cfg.run.async_checkpoints)
        self.console = not args.quiet

    def shardings(self, state):
        """The shardings of a state (arrays or shapes) by the logical-axis rules and the run's strategy."""
        return state_shardings(state, self.cfg.model, self.mesh, self.strategy)

    def place(self, make_state, *inputs):
        """make_state(*inputs) evaluated under jit straight into its shardings."""
        shapes = jax.eval_shape(make_state, *inputs)
        return jax.jit(make_state, out_shardings=self.shardings(shapes))(*inputs)

    def put(self, tree):
        """A parameter tree moved to its shardings."""
        return jax.device_put(tree, self.shardings(tree))

    def step_fn(self, fn, state, *consts):
        """fn(state, *consts, batch, rng) -> (state, metrics) as step(state, batch, rng), jitted on the mesh and
        traced under the rule table for a micro-batch (`parallel.jit_sharded`); the state is donated.
        Batch shardings are those of the first batch (split over data × fsdp by `global_batch`)."""
        state_sh = self.shardings(state)
        const_sh = tuple(self.shardings(c) for c in consts)
        replicated = NamedSharding(self.mesh, P())
        cache = {}

        def step(s, batch, rng):
            if "f" not in cache:
                batch_sh = jax.tree.map(lambda a: a.sharding, batch)
                cache["f"] = parallel.jit_sharded(
                    lambda s_, cs, b, r: fn(s_, *cs, b, r), self.mesh, (state_sh, const_sh, batch_sh, replicated),
                    (state_sh, replicated), batch=self.cfg.data.batch_size // self.cfg.accumulate,
                    donate_argnums=0)
            return cache["f"](s, consts, batch, rng)

        return step

    def resume(self, state):
        """(state, first step): the newest checkpoint that restores, when there is one; damaged newer ones are
        skipped with a line saying which and why."""
        restored = self.ckpt.restore_newest(state, self.data_iter)
        if restored is None:
            return state, 0
        state, start = restored
        print(f"resuming from step {start} ({self.ckpt.manager.directory})")
        return state, start

    def loop(self, step_fn, state, start: int, desc: str, flops=None):
        """Run the steps; flops(state, batch, rng, step): the step's model FLOPs (throughput and MFU)."""
        to_device = functools.partial(data_lib.global_batch, sharding=self.batch_sharding,
                                      batch_size=self.cfg.data.batch_size)
        run = self.cfg.run
        events = observe.EventWriter(self.out, start) if self.lead else None
        log = MetricsLog(self.out / "metrics.csv", start) if self.lead else None
        profile = observe.ProfileWindow(self.out / "profile", run.profile_start, run.profile_steps)
        try:
            return run_loop(step_fn, state, self.data_iter, to_device, run, self.ckpt,
                            log, start, self.cfg.data.batch_size, desc,
                            self.console, flops=flops if run.count_flops else None, events=events, profile=profile)
        finally:
            self.ckpt.close()
            if events is not None:
                events.close()

    def export(self, name: str, params) -> None:
        dst = checkpoint.save(self.out / name, "dit", to_json_dict(self.cfg.model), params, overwrite=True)
        print(f"wrote {dst}")


def train_main(args) -> int:
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)  # before any JAX work
    cfg = load_run_config(TRAIN_PRESETS, args.config, args.overrides)
    run = _Run(args, cfg, cfg.flow.n_image_tokens, flow.host_fields(cfg))
    cfg = run.cfg
    if cfg.init:
        params = _load_dit(cfg.init, cfg.model, cfg.model.param_dtype, run.mesh)
        state = run.place(functools.partial(init_train_state, cfg), params)
    else:
        state = run.place(lambda key: init_train_state(cfg, init_params(cfg.model, key)),
                          jax.random.PRNGKey(cfg.run.seed))
    state, start = run.resume(state)
    step = run.step_fn(make_train_step(cfg), state)
    count = make_train_step(observe.model_flops_config(cfg))
    flops = observe.FlopCounter(lambda s, b, r, i: observe.step_flops(count, s, b, r))
    state = run.loop(lambda s, b, r, i: step(s, b, r), state, start, "train", flops)
    run.export("dit", state.params if state.ema is None else state.ema)
    return 0


def distill_main(args) -> int:
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = load_run_config(DISTILL_PRESETS, args.config, args.overrides)
    run = _Run(args, cfg, cfg.n_image_tokens, dmd.host_fields(cfg))
    cfg = run.cfg
    if cfg.teacher:
        teacher = run.put(_load_dit(cfg.teacher, cfg.model, cfg.teacher_dtype, run.mesh))
    else:
        print("note: no teacher checkpoint given; distilling a randomly initialised teacher")
        model = dataclasses.replace(cfg.model, param_dtype=cfg.teacher_dtype)
        teacher = run.place(functools.partial(init_params, model), jax.random.PRNGKey(cfg.run.seed))
    state = run.place(functools.partial(init_dmd_state, cfg), teacher, jax.random.PRNGKey(cfg.run.seed + 1))
    state, start = run.resume(state)
    dmd_step = make_dmd_step(cfg)
    steps = {turn_: run.step_fn(lambda s, t, b, r, turn_=turn_: dmd_step(s, t, b, r, turn_), state, teacher)
             for turn_ in (True, False)}  # the generator turn and the critic-only turn
    count = make_dmd_step(observe.model_flops_config(cfg))
    turn = functools.partial(generator_turn, dmd=cfg.dmd)
    flops = observe.FlopCounter(lambda s, b, r, i: observe.step_flops(count, s, teacher, b, r, turn(i), static_argnums=4),
                                turn)
    state = run.loop(lambda s, b, r, i: steps[turn(i)](s, b, r), state, start, "distill", flops)
    run.export("generator", state.generator)
    return 0


def _add(sub, name: str, help_: str, func, presets) -> None:
    p = sub.add_parser(name, help=help_)
    p.add_argument("--config", help=f"a JSON/YAML file: 'preset' ({', '.join(presets)}) plus fields to override")
    p.add_argument("--output", required=True, help="run directory (resumed from its latest checkpoint)")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (default: the config's `mesh`, else every "
                                  "device on fsdp)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or console metrics")
    devices.add_host_args(p.add_argument_group("multi-host (the same command on every host)"))
    p.add_argument("overrides", nargs="*", help="config overrides field.sub=value, e.g. optimizer.learning_rate=1e-4")
    p.set_defaults(func=func)


def prepare_main(args) -> int:
    out = prepare.prepare(args.checkpoints, args.input, args.output, args.frames, media.parse_size(args.size),
                          args.dtype, args.overwrite, not args.quiet)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("prepare-data", help="captioned videos/images -> latents + conditioning for training")
    p.add_argument("--checkpoints", required=True, help="checkpoint folder (vae/, vlm/, clip/, tokenizers)")
    p.add_argument("--input", required=True, help="folder of videos or images, each with a NAME.txt caption")
    p.add_argument("--output", required=True, help="prepared-data directory to write")
    p.add_argument("--frames", type=int, default=81, help="frames per sample, 4k+1 (1 for images; default 81)")
    p.add_argument("--size", default="544x960", help="HxW every sample is fitted to (default 544x960)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="VAE and encoder compute dtype")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=prepare_main)
    _add(sub, "train", "flow-matching training of the DiT", train_main, TRAIN_PRESETS)
    _add(sub, "distill", "DMD2 step distillation of a teacher DiT into a few-step generator", distill_main,
         DISTILL_PRESETS)
