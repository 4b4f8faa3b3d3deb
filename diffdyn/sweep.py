"""Replicates in one program: seeds and numeric variants of a config, vmapped, scanned, sharded.

A sweep is the grid of `config.sweep`'s seeds and its non-empty variant tuples
(`minsnr_gamma`, `learning_rate`, `ema_decay`, `loss_weighting`). Its R replicates share one
jitted program: the train state carries a leading run axis, the step is `jax.vmap`-ed over it,
and what differs between replicates enters as arrays, never as constants:

  * the per-timestep loss weights, (R, T): a weighting or a gamma is just another row;
  * the EMA coefficients, (R,);
  * the learning rate, inside the optimizer state (`optax.inject_hyperparams`).

Each replicate is a run of its own: `workdir/<name>_seed<seed>/` holds its config.json (a
single run's config, with its seed and variant values), metrics.jsonl, samples and FID, so the
analysis commands read it like any other run. The sweep itself keeps its config.json and one
checkpoint of the stacked state in `workdir`; running the same command again resumes.

Replicate i follows the single run with its config to float tolerance: its step keys are
fold_in(train_key(seed_i), step) as in `train.py`. Batched convolutions may round differently
from unbatched ones, so losses agree to ~1e-6 relative, not bitwise.

Devices: the replicates are split over all devices (a 1-D Mesh, NamedSharding on the run
axis) when R divides evenly; otherwise each replicate's batch is split (data parallel), or,
when neither divides, everything is replicated. With several processes (multi-host),
`jax.distributed.initialize()` runs first when the environment says so, and process 0 writes
every file except the checkpoints, which orbax writes from all of them.

  python launch.py --config experiments/e6.py --workdir runs/e6x8 --config.sweep.seeds=8
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
import types
from typing import Any, Callable, Sequence

import flax
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax

from diffdyn import config as config_lib
from diffdyn import data as data_lib
from diffdyn import io
from diffdyn import models
from diffdyn import train as train_lib
from diffdyn.errors import RunFailed, UserError

log = logging.getLogger("diffdyn")

# Sweep key -> (the config key each value sets, the tag naming the value in run names).
VARIANTS = {
    "loss_weighting": ("loss.weighting", ""),
    "minsnr_gamma": ("loss.minsnr_gamma", "gamma"),
    "learning_rate": ("train.learning_rate", "lr"),
    "ema_decay": ("train.ema_decay", "ema"),
}
MESH_AXIS = "devices"
SPLITS = ("auto", "replicas", "batch", "none")


def is_sweep(config) -> bool:
  """Whether `config` asks for replicates rather than one run (validation comes later)."""
  s = config.sweep
  try:
    return s.seeds > 1 or bool(s.seed_list) or any(s[key] for key in VARIANTS)
  except TypeError:  # a malformed value: the run's validation names it
    return False


# ----------------------------------------------------------------------------------------------
# The replicates of a sweep.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Replicate:
  name: str                                 # its run directory under the sweep's workdir
  config: ml_collections.FrozenConfigDict   # a single run's config: own seed and variant values


def sweep_seeds(config) -> list[int]:
  s = config.sweep
  if s.seed_list:
    if s.seeds not in (1, len(s.seed_list)):
      raise UserError(f"config sweep.seeds ({s.seeds}) must be 1 or the number of "
                      f"sweep.seed_list ({len(s.seed_list)}) when a seed list is given")
    return list(s.seed_list)
  if config.seed + s.seeds > 2**32:
    raise UserError(f"config seed + sweep.seeds ({config.seed} + {s.seeds}) must be <= 2**32")
  return [config.seed + i for i in range(s.seeds)]


def _format_value(value) -> str:
  return value if isinstance(value, str) else f"{value:g}"


def replicates(config) -> list[Replicate]:
  """The sweep's runs, variant by variant and seed by seed within a variant.

  A replicate's config is the sweep's with the variant values set, its seed, and `sweep` back
  to a single run; a variant's values also extend `name` (e.g. "e6_gamma1"), so analysis
  groups each variant's seeds as one experiment.
  """
  axes = [(key, tuple(config.sweep[key])) for key in VARIANTS if config.sweep[key]]
  seeds = sweep_seeds(config)
  out = []
  for values in itertools.product(*(v for _, v in axes)):
    for seed in seeds:
      cfg = ml_collections.ConfigDict(train_lib.config_to_dict(config))
      suffix = ""
      for (key, _), value in zip(axes, values):
        target, tag = VARIANTS[key]
        section, field = target.split(".")
        cfg[section][field] = type(cfg[section][field])(value)
        suffix += f"_{tag}{_format_value(value)}"
      cfg.name = config.name + suffix
      cfg.seed = seed
      cfg.sweep.seeds = 1
      for key in ("seed_list", *VARIANTS):
        cfg.sweep[key] = ()
      out.append(Replicate(f"{cfg.name}_seed{seed}", config_lib.validate(cfg)))
  return out


@flax.struct.dataclass
class Hyperparams:
  """What differs between replicates beyond the seed and the learning rate; leaves (R, ...)."""
  loss_weights: jax.Array   # (T,) per-timestep loss weights
  ema_new: jax.Array        # () the weight of the new params in the EMA: 1 - decay
  ema_old: jax.Array        # () the weight of the old average: 1 - (1 - decay)


def stacked_hyperparams(configs: Sequence[Any], schedule) -> Hyperparams:
  """Host arrays with a leading run axis, computed in float64 and rounded as train.py rounds."""
  rows = []
  for cfg in configs:
    step_size = 1.0 - cfg.train.ema_decay
    rows.append(Hyperparams(
        loss_weights=np.asarray(train_lib.loss_weights(cfg, schedule), np.float32),
        ema_new=np.float32(step_size), ema_old=np.float32(1.0 - step_size)))
  return jax.tree.map(lambda *xs: np.stack(xs), *rows)


# ----------------------------------------------------------------------------------------------
# The program: optimizer, initial states, step and scan.
# ----------------------------------------------------------------------------------------------


def make_sweep_optimizer(train_config) -> optax.GradientTransformation:
  """train.make_optimizer with the learning rate held in the optimizer state, per replicate."""
  fields = ml_collections.ConfigDict(train_config).to_dict()

  def optimizer(learning_rate):
    return train_lib.make_optimizer(
        types.SimpleNamespace(**dict(fields, learning_rate=learning_rate)))

  return optax.inject_hyperparams(optimizer)(learning_rate=train_config.learning_rate)


class _WithSeed:
  """`config` read through, but with `seed` a traced value (a ConfigDict holds Python values)."""

  def __init__(self, config, seed):
    self._config = config
    self.seed = seed

  def __getattr__(self, name):
    return getattr(self._config, name)


def init_states(configs: Sequence[Any], model, tx, sharding) -> train_lib.TrainState:
  """train.create_train_state of every replicate in one program; leaves gain the run axis."""
  template = configs[0]

  def init(seed, learning_rate):
    state = train_lib.create_train_state(_WithSeed(template, seed), model, tx)
    hyperparams = dict(state.opt_state.hyperparams, learning_rate=learning_rate)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))

  seeds = np.asarray([c.seed for c in configs], np.uint32)
  rates = np.asarray([c.train.learning_rate for c in configs], np.float32)
  return jax.jit(jax.vmap(init), out_shardings=sharding)(seeds, rates)


def get_replicate_step_fn(config, model, schedule, tx,
                          batch_sharding: NamedSharding | None = None) -> Callable:
  """(state, images, hyperparams) -> state after one step of one replicate; vmap it over R.

  The step of `train.get_step_fn`, with the loss weights and the EMA coefficients read from
  `hyperparams` instead of the config.
  """
  step = train_lib.get_step_fn(config, model, schedule, tx, batch_sharding)

  def replicate_step(state, images, hp: Hyperparams):
    return step(state, images, hp.loss_weights, hp.ema_new, hp.ema_old)

  return replicate_step


def get_sweep_scan_fn(replicate_step: Callable, state_sharding) -> Callable:
  """(state, (images, hyperparams), num_steps) -> state after num_steps steps of every replicate.

  Jitted with the state donated and kept on `state_sharding`, so chunk after chunk runs on
  arrays that stay where they are.
  """
  step = jax.vmap(replicate_step, in_axes=(0, None, 0))

  def sweep_scan(state, inputs, num_steps):
    images, hyperparams = inputs
    return jax.lax.scan(lambda s, _: (step(s, images, hyperparams), None), state, None,
                        length=num_steps)[0]

  return jax.jit(sweep_scan, static_argnums=2, donate_argnums=0, out_shardings=state_sharding)


# ----------------------------------------------------------------------------------------------
# Devices and processes.
# ----------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> bool:
  """Starts JAX's multi-process runtime when the environment describes a multi-process job.

  JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID set by hand, or a
  SLURM / Open MPI job of several tasks (JAX reads those itself). Call it before any JAX
  computation; returns whether it initialized.
  """
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
                               process_id=int(env.get("JAX_PROCESS_ID", "0")))
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


@dataclasses.dataclass(frozen=True)
class Placement:
  """A 1-D mesh over the devices, and what the sweep splits over it."""
  mesh: Mesh
  split: str   # "replicas" (the run axis), "batch" (each replicate's batch) or "none"

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def per_replicate(self) -> NamedSharding:
    """Arrays with a leading run axis: the state and the hyperparameters."""
    spec = PartitionSpec(MESH_AXIS) if self.split == "replicas" else PartitionSpec()
    return NamedSharding(self.mesh, spec)

  @property
  def batch(self) -> NamedSharding | None:
    """One replicate's batch, split on its leading axis, when the batch is what is split."""
    return NamedSharding(self.mesh, PartitionSpec(MESH_AXIS)) if self.split == "batch" else None


def plan_placement(num_replicas: int, batch_size: int, devices=None,
                   split: str = "auto") -> Placement:
  """Splits the replicates over the devices if they divide evenly, else the batch, else nothing."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if split == "auto":
    split = ("none" if n == 1 else "replicas" if num_replicas % n == 0
             else "batch" if batch_size % n == 0 else "none")
  if split == "replicas" and num_replicas % n or split == "batch" and batch_size % n:
    raise UserError(f"cannot split {split} over {n} devices: {num_replicas} replicates, batch "
                    f"{batch_size}; use a multiple of {n}")
  if n > 1 and split == "none":
    log.warning("%d replicates of batch %d do not divide over %d devices: every device runs "
                "everything", num_replicas, batch_size, n)
  return Placement(Mesh(np.asarray(devices), (MESH_AXIS,)), split)


def put(tree, sharding: NamedSharding):
  """Host arrays -> global arrays on `sharding` (every process passes the same values)."""
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree)


def fetch(tree):
  """Global arrays -> host numpy, whichever process holds which shard."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _take_replicate_fn(sharding: NamedSharding) -> Callable:
  """A jitted (state, i) -> replicate i's state on `sharding`; compiled once for every i."""
  return jax.jit(lambda state, i: jax.tree.map(lambda a: a[i], state), out_shardings=sharding)


def _zero_sums(num_replicas: int, sharding: NamedSharding) -> train_lib.MetricSums:
  zeros = jax.tree.map(np.asarray, train_lib.MetricSums.zeros())
  return put(jax.tree.map(lambda z: np.broadcast_to(z, (num_replicas,) + z.shape), zeros),
             sharding)


class _SilentWriter:
  """The metric writer of a process that does not write (multi-host: all but process 0)."""

  def __init__(self, wall_time_offset: float):
    self._start, self._offset = time.monotonic(), wall_time_offset

  @property
  def wall_time(self) -> float:
    return self._offset + time.monotonic() - self._start

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images

  def flush(self):
    pass

  def close(self):
    pass


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def _bind_evaluators(templates: dict, ctx: train_lib.RunContext, first: bool) -> dict:
  """The evaluators of one replicate: the started templates' copies, sharing their programs."""
  if first:
    for handler in templates.values():
      handler.start(ctx)
    return dict(templates)
  return {name: handler.for_run(ctx) for name, handler in templates.items()}


def train_and_evaluate_sweep(config, workdir: str, *, allow_config_change: bool = False,
                             split: str = "auto", devices=None) -> dict[str, float]:
  """Trains (or resumes) every replicate of the sweep in `workdir`; returns final metrics.

  Args:
    config: a config whose `sweep` asks for several replicates (see `replicates`).
    workdir: the sweep's directory; replicate runs go to `workdir/<replicate name>/`.
    allow_config_change: resume a sweep whose config differs.
    split: what to split over the devices: "auto", "replicas", "batch" or "none".
    devices: the devices to use (default: all of them, over every process).

  Returns:
    {"<metric>[<replicate name>]": value} of the last values, and "step".
  """
  maybe_initialize_distributed()
  config = config_lib.validate(config)
  reps = replicates(config)
  train_lib.check_resume_config(workdir, config, allow_config_change)
  if not jax.config.jax_compilation_cache_dir:
    io.enable_compilation_cache()
  run_dirs = [os.path.join(workdir, r.name) for r in reps]
  templates = train_lib.default_evaluators(reps[0].config)
  for handler in templates.values():
    handler.prepare(reps[0].config, run_dirs[0])
  images_host = data_lib.load_images(config.data)
  writes = jax.process_index() == 0
  if writes:
    io.check_writable(workdir)

  num = len(reps)
  placement = plan_placement(num, config.train.batch_size, devices, split)
  log.info("sweep of %d replicates on %d devices (split: %s)", num, placement.mesh.size,
           placement.split)
  images = put(images_host, placement.replicated)
  model = models.get_model(config.model, train_lib.compute_dtype(config))
  schedule = train_lib.make_schedule(config)
  tx = make_sweep_optimizer(config.train)
  configs = [r.config for r in reps]
  state = init_states(configs, model, tx, placement.per_replicate)
  hyperparams = put(stacked_hyperparams(configs, schedule), placement.per_replicate)

  if writes:
    io.write_config_json(workdir, train_lib.config_to_dict(config))
    for r, run_dir in zip(reps, run_dirs):
      os.makedirs(run_dir, exist_ok=True)
      io.write_config_json(run_dir, train_lib.config_to_dict(r.config))
  ckpts = io.Checkpoints(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
  restored = ckpts.restore_latest(state)
  meta = {"wall_time": 0.0}
  if restored is not None:
    state, meta, _ = restored
  step = int(fetch(state.step)[0])
  if restored is not None:
    log.info("resumed the sweep in %s at step %d", workdir, step)
  writers = [io.MetricWriter(d, resume_step=step, wall_time_offset=meta["wall_time"],
                             tensorboard=config.train.tensorboard) if writes
             else _SilentWriter(meta["wall_time"]) for d in run_dirs]
  handlers = []
  for i, (r, run_dir, writer) in enumerate(zip(reps, run_dirs, writers)):
    ctx = train_lib.RunContext(config=r.config, workdir=run_dir, model=model, schedule=schedule,
                               images=images, writer=writer)
    handlers.append(_bind_evaluators(templates, ctx, first=i == 0))

  step_fn = get_replicate_step_fn(config, model, schedule, tx, placement.batch)
  scans = train_lib.CompiledScans(get_sweep_scan_fn(step_fn, placement.per_replicate))
  take_replicate = _take_replicate_fn(placement.replicated)
  progress = io.Progress(config.train.total_steps, use_clu=config.train.tensorboard)
  preempt = train_lib.PreemptionFlag()
  preempt.install()
  final = [{} for _ in reps]
  run_steps, run_seconds = 0, 0.0
  try:
    while step < config.train.total_steps:
      target = train_lib.next_event_step(config, step)
      chunk_start = time.monotonic()
      compile_before = scans.compile_seconds
      state = scans(state, (images, hyperparams), target - step)
      sums = fetch(state.sums)
      run_seconds += time.monotonic() - chunk_start - (scans.compile_seconds - compile_before)
      run_steps += target - step
      step = target
      steps_per_sec = run_steps / run_seconds if run_seconds > 0 else float("nan")
      progress(step, steps_per_sec)
      for i, r in enumerate(reps):
        try:
          train_lib.check_finite(jax.tree.map(lambda a, i=i: a[i], sums))
        except RunFailed as e:
          raise RunFailed(f"replicate {r.name}: {e}") from None
      events = train_lib.due_events(config, step)
      if "log" in events:
        for i, writer in enumerate(writers):
          scalars = train_lib.train_metrics(jax.tree.map(lambda a, i=i: a[i], sums))
          scalars[io.TIMING_PREFIX + "steps_per_sec"] = steps_per_sec
          scalars[io.TIMING_PREFIX + "compile_seconds"] = scans.compile_seconds
          scalars[io.TIMING_PREFIX + "replicates"] = num
          writer.write_scalars(step, scalars)
          final[i].update(scalars)
        state = state.replace(sums=_zero_sums(num, placement.per_replicate))
      if any(h.due(events) for h in handlers[0].values()):
        for i in range(num):
          replicate_state = take_replicate(state, i)
          for handler in handlers[i].values():
            if handler.due(events):
              final[i].update(handler(replicate_state, step, events))
      if "checkpoint" in events or preempt.requested:
        for writer in writers:
          writer.flush()
        ckpts.save(step, state, {"wall_time": writers[0].wall_time})
      if preempt.requested:
        log.warning("SIGTERM: saved a checkpoint at step %d; run the same command to resume", step)
        break
  finally:
    preempt.uninstall()
    for writer in writers:
      writer.flush()
      writer.close()
    ckpts.close()
  log.info("sweep done at step %d: %.1f s compiling, %.1f s running (%.1f steps/s x %d "
           "replicates)", step, scans.compile_seconds, run_seconds,
           run_steps / run_seconds if run_seconds else float("nan"), num)
  out = {f"{key}[{r.name}]": value for r, metrics in zip(reps, final)
         for key, value in metrics.items()}
  out["step"] = step
  return out
