"""Training: the train state, the pure step, chunk runners and the run loop for 1..R runs.

Every number a run produces is a pure function of (config, seed, step): the step key is
`fold_in(train_key, step)` and the whole data set lives on the device, so a run resumed from a
checkpoint replays exactly the random numbers of an uninterrupted one.

`train_and_evaluate(config, workdir)` runs one run, or the R replicates of a sweep
(`config.sweep`, see sweep.py) as one vmapped program: the same loop, the same step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffdyn import config as config_lib
from diffdyn import data as data_lib
from diffdyn import diffusion
from diffdyn import evaluate
from diffdyn import io
from diffdyn import models
from diffdyn import objective
from diffdyn import sweep
from diffdyn.errors import RunFailed, UserError

log = logging.getLogger("diffdyn")

NUM_LOSS_BINS = objective.NUM_LOSS_BINS
CHUNK_RUNNERS = ("scan", "loop")


# ----------------------------------------------------------------------------------------------
# The state and the step.
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class MetricSums:
  """Train metrics accumulated on the device between two log steps (part of the checkpoint)."""
  loss: jax.Array
  count: jax.Array
  tbin_loss: jax.Array
  tbin_count: jax.Array
  skipped: jax.Array
  first_bad_step: jax.Array   # -1, or the first step with a non-finite loss or gradient
  bad_quantity: jax.Array     # 1: loss, 2: gradient

  @classmethod
  def zeros(cls) -> "MetricSums":
    return cls(loss=np.zeros((), np.float32), count=np.zeros((), np.int32),
               tbin_loss=np.zeros(NUM_LOSS_BINS, np.float32),
               tbin_count=np.zeros(NUM_LOSS_BINS, np.int32), skipped=np.zeros((), np.int32),
               first_bad_step=np.full((), -1, np.int32), bad_quantity=np.zeros((), np.int32))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array          # the train stream's key; step keys are fold_in(rng, step)
  sums: MetricSums


@flax.struct.dataclass
class Hyperparams:
  """What may differ between the runs of one program, as arrays (a leading run axis if stacked)."""
  loss_weights: jax.Array   # (T,) per-timestep loss weights
  ema_decay: jax.Array      # () the EMA decay


def hyperparams_of(config, schedule: diffusion.Schedule) -> Hyperparams:
  """A run's `Hyperparams` as host float32 arrays (computed in float64, then rounded)."""
  weights = diffusion.loss_weight(schedule, config.loss.weighting, config.loss.minsnr_gamma,
                                  config.diffusion.prediction)
  return Hyperparams(loss_weights=np.asarray(weights, np.float32),
                     ema_decay=np.float32(config.train.ema_decay))


def optimizer_of(train_config) -> optax.GradientTransformation:
  """`objective.make_optimizer` with a config's train settings."""
  t = train_config
  return objective.make_optimizer(t.learning_rate, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                                  warmup_steps=t.warmup_steps, grad_clip_norm=t.grad_clip_norm)


def compute_dtype(precision: str) -> jnp.dtype:
  return jnp.bfloat16 if precision == "bf16" else jnp.float32


def make_schedule(diffusion_config) -> diffusion.Schedule:
  d = diffusion_config
  return diffusion.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def create_train_state(seed, learning_rate, *, model, tx, image_shape) -> TrainState:
  """The step-0 state of the run `seed` (a Python int or a traced uint32, as under vmap)."""
  keys = objective.stream_keys(seed)
  params = models.init_params(model, keys["init"], image_shape[0], image_shape[2])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=objective.with_learning_rate(tx.init(params), learning_rate),
                    ema_params=jax.tree.map(jnp.copy, params), rng=keys["train"],
                    sums=jax.tree.map(jnp.asarray, MetricSums.zeros()))


def _accumulate(sums: MetricSums, loss, per_example, t, num_timesteps, step, bad_loss,
                bad_grad, skipped) -> MetricSums:
  bins = diffusion.timestep_bins(t, num_timesteps, NUM_LOSS_BINS)
  first_bad = jnp.logical_and(sums.first_bad_step < 0, bad_loss | bad_grad)
  kept = 1 - skipped.astype(jnp.int32)   # a skipped step adds to no mean
  return MetricSums(
      loss=sums.loss + loss, count=sums.count + kept,
      tbin_loss=sums.tbin_loss.at[bins].add(per_example),
      tbin_count=sums.tbin_count.at[bins].add(kept),
      skipped=sums.skipped + skipped.astype(jnp.int32),
      first_bad_step=jnp.where(first_bad, step, sums.first_bad_step),
      bad_quantity=jnp.where(first_bad, jnp.where(bad_loss, 1, 2), sums.bad_quantity))


def get_step_fn(model, schedule: diffusion.Schedule, tx: optax.GradientTransformation, *,
                prediction: str, batch_size: int, random_flip: bool, ema_warmup: bool,
                skip_nonfinite: bool, batch_sharding=None) -> Callable:
  """(state, images, hyperparams) -> state after one optimizer step. Pure; the caller jits it.

  The step of a run and of each replicate of a sweep (which vmaps it): what differs between
  replicates (loss weights, EMA decay, and the learning rate inside the optimizer state) are
  arrays. `batch_sharding` splits the batch over devices.
  """
  per_example_loss = objective.get_per_example_loss_fn(model, schedule, prediction)
  num_timesteps = schedule.num_timesteps

  def loss_fn(params, batch, dropout_rng, weights):
    per_example = per_example_loss(params, batch.x0, batch.t, batch.noise, dropout_rng)
    return objective.weighted_loss(per_example, batch.t, weights), per_example

  def step(state: TrainState, images: jax.Array, hp: Hyperparams) -> TrainState:
    keys = objective.step_keys(state.rng, state.step)
    batch = objective.draw_batch(keys, images, batch_size, num_timesteps, random_flip)
    if batch_sharding is not None:
      split = functools.partial(jax.lax.with_sharding_constraint, shardings=batch_sharding)
      batch = objective.Batch(split(batch.x0), split(batch.t), split(batch.noise))
    (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, keys.dropout, hp.loss_weights)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = objective.ema_decay_at(state.step, hp.ema_decay, ema_warmup)
    ema_params = objective.update_ema(state.ema_params, params, decay)
    bad_loss = ~jnp.isfinite(loss)
    bad_grad = ~jnp.isfinite(optax.tree.norm(grads))
    if skip_nonfinite:   # a Python branch: a step that never skips traces no per-leaf select
      skip = bad_loss | bad_grad
      keep_old = functools.partial(jax.tree.map, lambda old, new: jnp.where(skip, old, new))
      params, opt_state, ema_params = (keep_old(state.params, params),
                                       keep_old(state.opt_state, opt_state),
                                       keep_old(state.ema_params, ema_params))
    else:
      skip = jnp.zeros((), bool)
    sums = _accumulate(state.sums, jnp.where(skip, 0.0, loss),
                       jnp.where(skip, 0.0, per_example), batch.t, num_timesteps, state.step,
                       bad_loss & ~skip, bad_grad & ~skip, skip)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_params, sums=sums)

  return step


def resolve_chunk_runner(name: str, backend: str | None = None) -> str:
  """"scan" or "loop" for a `train.chunk_runner` setting ("auto": loop on the CPU, else scan).

  XLA:CPU runs the convolutions inside a loop body several times slower than the same
  convolutions in a jitted step (2x at width 8 batch 4, 19x at width 16 batch 64 on two cores:
  bench/chunk_runner.py); on a GPU one dispatch per chunk is what wins.
  """
  if name != "auto":
    return name
  return "loop" if (backend or jax.default_backend()) == "cpu" else "scan"


class ChunkRunner:
  """Runs K steps of the jitted step: one `lax.scan` (one dispatch) or K dispatches in a loop.

  Both donate the state, keep it on `state_sharding`, compile ahead of their first call (once
  per chunk length for the scan, once for the loop) and count the seconds it took. Each is
  deterministic, so a resumed run replays an uninterrupted one exactly under either; the two
  may round differently from each other.
  """

  def __init__(self, step: Callable, kind: str, state_sharding=None):
    if kind not in CHUNK_RUNNERS:
      raise ValueError(f"unknown chunk runner {kind!r}; expected one of {CHUNK_RUNNERS}")
    self.kind = kind
    self.step = step   # the pure step, (state, images, hyperparams) -> state
    # (state, images, hyperparams) -> state, and the same with a static num_steps last.
    self.jitted_step = jax.jit(step, donate_argnums=0, out_shardings=state_sharding)

    def scan(state, images, hp, num_steps):
      return jax.lax.scan(lambda s, _: (step(s, images, hp), None), state, None,
                          length=num_steps)[0]

    self.jitted_scan = jax.jit(scan, static_argnums=3, donate_argnums=0,
                               out_shardings=state_sharding)
    self._compiled = {}
    self.compile_seconds = 0.0

  def _key(self, num_steps: int):
    return num_steps if self.kind == "scan" else "step"

  def is_compiled(self, num_steps: int) -> bool:
    return self._key(num_steps) in self._compiled

  def compiled(self, state, images, hp, num_steps: int):
    """The executable a chunk of `num_steps` runs (compiling it now if it is new)."""
    key = self._key(num_steps)
    if key not in self._compiled:
      start = time.monotonic()
      if self.kind == "scan":
        self._compiled[key] = self.jitted_scan.lower(state, images, hp, num_steps).compile()
        what = f"the train scan of {num_steps} steps"
      else:
        self._compiled[key] = self.jitted_step.lower(state, images, hp).compile()
        what = "the train step"
      took = time.monotonic() - start
      self.compile_seconds += took
      log.info("compiled %s in %.1f s", what, took)
    return self._compiled[key]

  def __call__(self, state, images, hp, num_steps: int):
    run = self.compiled(state, images, hp, num_steps)
    if self.kind == "scan":
      return run(state, images, hp)
    for _ in range(num_steps):
      state = run(state, images, hp)
    return state


def train_metrics(sums: MetricSums) -> dict[str, float]:
  """Host-side means of the sums: `train/loss` and the per-timestep-bin losses."""
  count = int(sums.count)
  out = {"train/loss": float(sums.loss / count) if count else float("nan")}
  for b in range(NUM_LOSS_BINS):
    n = int(sums.tbin_count[b])
    out[f"train/loss_tbin/{b}"] = float(sums.tbin_loss[b] / n) if n else float("nan")
  if int(sums.skipped):
    out["train/nonfinite_skipped"] = int(sums.skipped)
  return out


def check_finite(sums: MetricSums, run_name: str | None = None) -> None:
  bad_step = int(sums.first_bad_step)
  if bad_step >= 0:
    what = "loss" if int(sums.bad_quantity) == 1 else "gradient"
    where = f"replicate {run_name}: " if run_name else ""
    raise RunFailed(f"{where}non-finite {what} at step {bad_step + 1}; the last good checkpoint "
                    "is kept as the latest (set train.skip_nonfinite_updates=True to skip such "
                    "updates)")


# ----------------------------------------------------------------------------------------------
# The program: what a run (or R replicates) executes.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
  """The model, schedule, optimizer, per-run arrays and chunk runner of 1..R runs."""
  replicas: sweep.Replicas
  model: Any
  schedule: diffusion.Schedule
  tx: optax.GradientTransformation
  hyperparams: Hyperparams     # on the device, stacked like the state
  runner: ChunkRunner
  _init: Callable
  _init_args: tuple
  init_compile_seconds: float = 0.0

  def init_state(self) -> TrainState:
    """Every run's step-0 state, in one compiled program (found in the compilation cache).

    One program rather than the hundreds of small dispatches of an eager init; the seconds
    its compile took are in `init_compile_seconds`.
    """
    start = time.monotonic()
    compiled = self._init.lower(*self._init_args).compile()
    self.init_compile_seconds = time.monotonic() - start
    return compiled(*self._init_args)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state: all a restore needs."""
    shapes = jax.eval_shape(self._init, *self._init_args)
    sharding = self.replicas.state_sharding
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes)

  def zero_sums(self) -> MetricSums:
    return self.replicas.stack([MetricSums.zeros()] * self.replicas.size)

  def with_config_learning_rates(self, state: TrainState) -> TrainState:
    """`state` with each run's learning rate from its config (a resumed run may change it)."""
    rates = self.replicas.stack([np.float32(r.config.train.learning_rate)
                                 for r in self.replicas.runs])
    return state.replace(opt_state=objective.with_learning_rate(state.opt_state, rates))


def build_program(config, replicas: sweep.Replicas) -> Program:
  """The program of a validated config's runs (`sweep.get_replicas`)."""
  tc = config.train
  model = models.get_model(config.model, compute_dtype(tc.precision))
  schedule = make_schedule(config.diffusion)
  tx = optimizer_of(tc)
  step = get_step_fn(model, schedule, tx, prediction=config.diffusion.prediction,
                     batch_size=tc.batch_size, random_flip=config.data.random_flip,
                     ema_warmup=tc.ema_warmup, skip_nonfinite=tc.skip_nonfinite_updates,
                     batch_sharding=replicas.placement.batch)
  runner = ChunkRunner(replicas.vmap(step, in_axes=(0, None, 0)),
                       resolve_chunk_runner(tc.chunk_runner), replicas.state_sharding)
  runs = [r.config for r in replicas.runs]
  hyperparams = replicas.stack([hyperparams_of(c, schedule) for c in runs])
  m = config.model
  init = functools.partial(create_train_state, model=model, tx=tx,
                           image_shape=(m.image_size, m.image_size, m.channels))
  init_args = (replicas.stack([np.uint32(c.seed) for c in runs]),
               replicas.stack([np.float32(c.train.learning_rate) for c in runs]))
  jitted_init = jax.jit(replicas.vmap(init, in_axes=(0, 0)),
                        out_shardings=replicas.state_sharding)
  return Program(replicas, model, schedule, tx, hyperparams, runner, jitted_init, init_args)


# ----------------------------------------------------------------------------------------------
# Events: which steps log, measure curvature, evaluate or checkpoint.
# ----------------------------------------------------------------------------------------------


def _every(config) -> dict[str, int]:
  ev = {"log": config.train.log_every_steps,
        "checkpoint": config.train.checkpoint_every_steps,
        "samples": config.eval.fid_every_steps}
  if config.curvature.enabled:
    ev["curvature"] = config.curvature.every_steps
  return ev


def due_events(config, step: int) -> set[str]:
  events = {name for name, every in _every(config).items() if step % every == 0}
  if step == config.train.total_steps:
    events |= {"log", "checkpoint", "final"}
  return events


def next_event_step(config, step: int) -> int:
  candidates = [(step // every + 1) * every for every in _every(config).values()]
  return min(min(candidates), config.train.total_steps)


# ----------------------------------------------------------------------------------------------
# Stopping on request.
# ----------------------------------------------------------------------------------------------


class StopRequest:
  """Set by SIGTERM (preemption) or a first Ctrl-C: the loop checkpoints where it is and returns.

  A second Ctrl-C restores Python's default and interrupts at once (KeyboardInterrupt).
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      log.warning("Ctrl-C: stopping after the current chunk with a checkpoint (Ctrl-C again "
                  "to stop at once, losing the steps since the last checkpoint)")

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False,
                       keep_damaged_metrics: bool = False, evaluators: dict | None = None,
                       devices=None, split: str = "auto") -> dict:
  """Trains (or resumes) the run, or every replicate of the sweep, in `workdir`.

  Args:
    config: an experiment config; `config.sweep` may ask for replicates (see sweep.py).
    workdir: the run's directory; a sweep's replicates go to `workdir/<replicate name>/`.
    allow_config_change: resume a run whose config differs in ways that keep the state's
      structure (a learning rate, the steps, evaluation settings); the change is logged and
      kept in `config_history.jsonl`.
    keep_damaged_metrics: resume past a damaged metrics.jsonl, keeping a copy of it aside.
    evaluators: {name: evaluator} replacing the default curvature/samples evaluators.
    devices, split: where a sweep runs and what it splits over them (see sweep.plan_placement).

  Returns:
    The last value of every metric and "step"; a sweep's keys are "<metric>[<replicate>]".
    After SIGTERM or Ctrl-C the run stops at the end of the current chunk with a checkpoint
    there; "step" is then short of `total_steps` and "interrupted" names the signal.
  """
  sweep.maybe_initialize_distributed()
  io.ensure_logging()
  io.send_orbax_failures_to_debug()
  config = config_lib.validate(config)
  clock = io.Clock()
  stop = StopRequest()
  stop.install()   # from here on, a SIGTERM or Ctrl-C during setup also ends the run cleanly
  try:
    with contextlib.ExitStack() as closing:
      # Progress lines from the start: a cold setup compiles for tens of seconds.
      progress = closing.enter_context(io.Progress(config.train.total_steps))
      run = _set_up(config, workdir, allow_config_change, keep_damaged_metrics, evaluators,
                    devices, split, clock, progress, closing)
      return _event_loop(config, run, stop, clock, progress)
  finally:
    stop.uninstall()


@dataclasses.dataclass
class _Run:
  """Everything the event loop needs, set up and checked."""
  program: Program
  state: TrainState
  images: jax.Array
  evaluators: dict
  infos: list            # evaluate.RunInfo per run
  writers: list          # io.MetricWriter per run
  checkpoints: io.Checkpoints


def _set_up(config, workdir, allow_config_change, keep_damaged_metrics, evaluators, devices,
            split, clock: io.Clock, progress: io.Progress,
            closing: contextlib.ExitStack) -> _Run:
  """Checks every input, restores or creates the state, then opens the run's files.

  Nothing is written into `workdir` until every check has passed: a bad input, a checkpoint
  of another structure or damaged metrics leave an existing run byte for byte as it was.
  """
  with clock.phase("setup"):
    if not jax.config.jax_compilation_cache_dir:
      io.enable_compilation_cache()
    progress.set_phase("setting up")
    replicas = sweep.get_replicas(config, workdir, devices, split)
    progress.replicates = replicas.size
    if replicas.stacked:
      log.info("sweep of %d replicates on %d devices (split: %s)", replicas.size,
               replicas.placement.mesh.size, replicas.placement.split)
    writes = jax.process_index() == 0
    handlers = evaluate.get_evaluators(config) if evaluators is None else evaluators
    for handler in handlers.values():
      handler.check(config)
    cc = config.curvature
    progress.set_phase("loading the data")
    images_host = data_lib.load_images(
        config.data, batch_size=config.train.batch_size,
        probe_batch_size=cc.batch_size if cc.enabled and cc.batch == "fixed" else 0)
    if writes:   # one writer per workdir: the lock creates it, and leaves nothing behind
      for directory in dict.fromkeys((workdir, *replicas.run_dirs)):
        closing.enter_context(io.lock_workdir(directory))
    changes = check_resume_config(workdir, config, allow_config_change)
    program = build_program(config, replicas)
    images = sweep.put(images_host, replicas.placement.replicated)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    progress.set_phase("restoring the latest checkpoint, or compiling the initial state")
    state, meta, resumed_at, damaged = _restore(program, ckpt_dir, config, workdir)
    clock.compiled("init", program.init_compile_seconds, phase="setup")
    step = int(sweep.fetch(state.step).reshape(-1)[0])
    if writes:
      for run_dir in replicas.run_dirs:
        io.check_metrics(os.path.join(run_dir, io.METRICS_FILE), step,
                         keep_damaged=keep_damaged_metrics)

    # Every check has passed: from here on the run writes.
    if writes:
      if changes:
        log.warning("config changed at step %d: %s", step,
                    config_lib.describe_differences(changes))
      for directory, run_config in ((workdir, config), *(
          zip(replicas.run_dirs, [r.config for r in replicas.runs]) if replicas.stacked else ())):
        io.write_config_json(directory, config_lib.to_dict(run_config))
        io.append_config_history(directory, config_lib.to_dict(run_config), step)
    progress.set_phase("opening the checkpoints and the metric writers")
    checkpoints = io.Checkpoints(ckpt_dir, config.train.keep_checkpoints)
    closing.callback(checkpoints.close)
    for bad_step, why in damaged:
      kept_at = checkpoints.move_aside(bad_step)
      log.warning("checkpoint at step %d in %s does not restore (%s); moved it to %s and "
                  "falling back to the one before it", bad_step, ckpt_dir, why, kept_at)
    if resumed_at is not None:
      log.info("resumed %s at step %d", workdir, step)
    writers = [io.MetricWriter(run_dir, resume_step=step, wall_time_offset=meta["wall_time"],
                               tensorboard=config.train.tensorboard, enabled=writes)
               for run_dir in replicas.run_dirs]
    for writer in writers:
      closing.callback(writer.close)
      closing.callback(writer.flush)   # callbacks run last-in first-out: flush, then close
    setup = evaluate.Setup(program.model, program.schedule, images)
    progress.set_phase("setting up the evaluators")
    for handler in handlers.values():
      handler.setup(setup)
  infos = [evaluate.RunInfo.of(r.name if replicas.stacked else r.config.name, r.config)
           for r in replicas.runs]
  return _Run(program, state, images, handlers, infos, writers, checkpoints)


def check_resume_config(workdir: str, config, allow_config_change: bool) -> list:
  """The differences from the config `workdir` last ran with; refused unless allowed.

  Changes of `config_lib.RESUMABLE_CHANGES` keys need no permission but are returned too.
  """
  old = io.read_config_json(workdir)
  if old is None:
    return []
  diffs = config_lib.differences(old, config_lib.to_dict(config))
  refused = [d for d in diffs if d[0] not in config_lib.RESUMABLE_CHANGES]
  if refused and not allow_config_change:
    raise UserError(f"{workdir} holds a run with a different config "
                    f"({config_lib.describe_differences(refused)}); use another --workdir, or "
                    "pass --allow_config_change to resume it anyway")
  return diffs


def _restore(program: Program, ckpt_dir: str, config, workdir: str):
  """(state, meta, restored step or None, [(damaged step, why)]) without writing anything."""
  if not os.path.isdir(ckpt_dir):
    return program.init_state(), {"wall_time": 0.0}, None, []
  reader = io.Checkpoints(ckpt_dir, read_only=True)
  try:
    found = reader.restore_latest(program.abstract_state())
  except io.StructureMismatch as e:
    old = io.read_config_json(workdir) or {}
    changed = config_lib.differences(old, config_lib.to_dict(config))
    keys = f" (config changes: {config_lib.describe_differences(changed)})" if changed else ""
    raise UserError(f"the checkpoints in {ckpt_dir} hold a train state of another structure "
                    f"than this config builds: {e}{keys}; such a run cannot be resumed, even "
                    "with --allow_config_change: start it in a new --workdir") from None
  finally:
    reader.close()
  damaged = [(step, why) for step, why in reader.restore_failures]
  if found is None:
    if damaged:
      listing = "; ".join(f"step {s}: {why}" for s, why in damaged)
      raise RunFailed(f"no checkpoint in {ckpt_dir} restores ({listing}); nothing was changed: "
                      "restore the checkpoints from a copy, or start the run in a new --workdir")
    return program.init_state(), {"wall_time": 0.0}, None, []
  state, meta, step = found
  state = program.with_config_learning_rates(state)
  return state, meta, step, damaged


def _event_loop(config, run: _Run, stop: StopRequest, clock: io.Clock,
                progress: io.Progress) -> dict:
  """Runs to each event step, writes all of that step's metrics, then checkpoints it.

  Writes come before the checkpoint, so a run killed between the two resumes from an earlier
  checkpoint: the writer drops the step's partial lines and every evaluation is redone.
  """
  program, replicas = run.program, run.program.replicas
  state = run.state
  step = int(sweep.fetch(state.step).reshape(-1)[0])
  total = config.train.total_steps
  take = replicas.take_fn()
  final = [{} for _ in replicas.runs]
  run_steps, train_seconds = 0, 0.0
  while step < total and not stop.requested:
    target = next_event_step(config, step)
    log.debug("training steps %d to %d", step, target)
    compiled_before = program.runner.compile_seconds
    with clock.phase("train") as phase:
      progress.set_phase("training" if program.runner.is_compiled(target - step)
                         else "compiling the train program")
      state = program.runner(state, run.images, program.hyperparams, target - step)
      sums = replicas.unstack(sweep.fetch(state.sums))   # waits for the chunk
    compiled = program.runner.compile_seconds - compiled_before
    clock.compiled("train", compiled)
    for r, s in zip(replicas.runs, sums):
      check_finite(s, r.name if replicas.stacked else None)
    train_seconds += phase.seconds - compiled
    run_steps += target - step
    step = target
    steps_per_sec = run_steps / train_seconds if train_seconds > 0 else float("nan")
    progress.report(step, steps_per_sec)
    events = due_events(config, step)
    if "log" in events:
      with clock.phase("writes"):
        for i, writer in enumerate(run.writers):
          scalars = train_metrics(sums[i])
          scalars["time/steps_per_sec"] = steps_per_sec
          scalars["time/compile_seconds"] = clock.total_compile()
          if replicas.stacked:
            scalars["time/replicates"] = replicas.size
          writer.write_scalars(step, scalars)
          final[i].update(scalars)
      state = state.replace(sums=program.zero_sums())
    due = [(name, h) for name, h in run.evaluators.items() if h.due(events)]
    for i in range(replicas.size if due else 0):
      view = take(state, i)
      for name, handler in due:
        log.debug("running %s at step %d", name, step)
        progress.set_phase(f"{name} at step {step}")
        with clock.phase(name):
          result = handler(view, step, events, run.infos[i])
        for program_name, seconds in result.compile_seconds.items():
          clock.compiled(program_name, seconds, phase=name)
        if train_seconds > 0:
          _add_costs_in_train_steps(result.scalars, train_seconds / run_steps, name, step)
        with clock.phase("writes"):
          _write_result(run.writers[i], replicas.run_dirs[i], step, result)
        final[i].update(result.scalars)
    if "checkpoint" in events or stop.requested:
      progress.set_phase(f"saving the checkpoint of step {step}")
      with clock.phase("checkpoints"):
        for writer in run.writers:
          writer.flush()
        run.checkpoints.save(step, state, {"wall_time": run.writers[0].wall_time})
  if stop.requested:
    log.warning("%s: stopped at step %d with a checkpoint; run the same command to resume",
                stop.signal_name, step)
  log.info("done at step %d: %s", step, clock.summary())
  return _final_metrics(replicas, final, step, stop)


def _add_costs_in_train_steps(scalars: dict, step_seconds: float, name: str, step: int) -> None:
  """time/X_seconds -> also time/X_train_steps: what a measurement costs in train steps."""
  costs = {}
  for key, seconds in list(scalars.items()):
    if key.startswith("time/") and key.endswith("_seconds"):
      costs[key[len("time/"):-len("_seconds")]] = seconds / step_seconds
      scalars[key[:-len("_seconds")] + "_train_steps"] = seconds / step_seconds
  if costs:
    log.info("%s at step %d cost, in train steps of %.1f ms: %s", name, step, 1e3 * step_seconds,
             ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))


def _write_result(writer: io.MetricWriter, run_dir: str, step: int,
                  result: evaluate.Result) -> None:
  if result.scalars:
    writer.write_scalars(step, result.scalars)
  for folder, image in result.images.items():
    io.save_png(os.path.join(run_dir, folder, f"step_{step:06d}.png"), image)
    writer.write_images(step, {f"{folder}/grid": image[None]})
  for folder, arrays in result.arrays.items():
    io.save_npz(os.path.join(run_dir, folder, f"step_{step:06d}.npz"), arrays)


def _final_metrics(replicas: sweep.Replicas, final: list, step: int, stop: StopRequest) -> dict:
  if replicas.stacked:
    out = {f"{key}[{r.name}]": value for r, metrics in zip(replicas.runs, final)
           for key, value in metrics.items()}
  else:
    out = dict(final[0])
  out["step"] = step
  if stop.requested:
    out["interrupted"] = stop.signal_name
  return out
