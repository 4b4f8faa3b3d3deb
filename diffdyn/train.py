"""Training: the train state, the pure train step, the K-step scan and `train_and_evaluate`.

Every number a run produces is a pure function of (config, seed, step): the step key is
`fold_in(train_key, step)` and the whole data set lives on the device, so a run resumed from a
checkpoint replays exactly the random numbers of an uninterrupted one.
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
import ml_collections
import numpy as np
import optax

from diffdyn import config as config_lib
from diffdyn import data as data_lib
from diffdyn import diffusion
from diffdyn import io
from diffdyn import models
from diffdyn.errors import RunFailed, UserError

log = logging.getLogger("diffdyn")

NUM_LOSS_BINS = 10
# Independent random streams, all derived from config.seed.
_STREAMS = ("init", "train", "curvature", "probe_batch", "sample", "grid")


def stream_keys(seed: int) -> dict[str, jax.Array]:
  root = jax.random.PRNGKey(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(_STREAMS)}


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
    return cls(loss=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32),
               tbin_loss=jnp.zeros(NUM_LOSS_BINS, jnp.float32),
               tbin_count=jnp.zeros(NUM_LOSS_BINS, jnp.int32), skipped=jnp.zeros((), jnp.int32),
               first_bad_step=jnp.full((), -1, jnp.int32), bad_quantity=jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array          # the train stream's key; step keys are fold_in(rng, step)
  sums: MetricSums


@dataclasses.dataclass(frozen=True)
class Batch:
  x0: jax.Array
  t: jax.Array
  noise: jax.Array


def make_optimizer(train_config) -> optax.GradientTransformation:
  lr = train_config.learning_rate
  if train_config.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, lr, train_config.warmup_steps)
  adam = optax.adam(lr, b1=train_config.adam_b1, b2=train_config.adam_b2,
                    eps=train_config.adam_eps)
  if train_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), adam)
  return adam


def compute_dtype(config) -> jnp.dtype:
  return jnp.bfloat16 if config.train.precision == "bf16" else jnp.float32


def create_train_state(config, model, tx) -> TrainState:
  keys = stream_keys(config.seed)
  params = models.init_params(model, keys["init"], config.model.image_size,
                              config.model.channels)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=keys["train"],
                    sums=MetricSums.zeros())


def draw_train_batch(rng: jax.Array, step: jax.Array, images: jax.Array, batch_size: int,
                     num_timesteps: int, random_flip: bool) -> Batch:
  """The batch of step `step`: images, timesteps and noise from fold_in(rng, step)."""
  k_x, k_t, k_noise = jax.random.split(jax.random.fold_in(rng, step), 3)
  x0 = data_lib.sample_batch(images, k_x, batch_size, random_flip)
  t = jax.random.randint(k_t, (batch_size,), 0, num_timesteps)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  return Batch(x0, t, noise)


def get_per_example_loss_fn(config, model, schedule) -> Callable:
  """(params, x0, t, noise, dropout_rng or None) -> unweighted per-example MSE of the target."""
  prediction = config.diffusion.prediction

  def per_example_loss(params, x0, t, noise, dropout_rng=None):
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    train = dropout_rng is not None
    rngs = {"dropout": dropout_rng} if train else {}
    out = model.apply({"params": params}, x_t, t, train=train, rngs=rngs)
    target = diffusion.prediction_target(schedule, x0, t, noise, prediction)
    return diffusion.per_example_mse(out, target)

  return per_example_loss


def loss_weights(config, schedule) -> np.ndarray:
  return diffusion.loss_weight(schedule, config.loss.weighting, config.loss.minsnr_gamma,
                               config.diffusion.prediction)


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


def get_step_fn(config, model, schedule, tx, batch_sharding=None) -> Callable:
  """(state, images, loss_weights, ema_new, ema_old) -> state after one optimizer step.

  The step of a run and of each replicate of a sweep, which passes its own per-timestep loss
  weights (T,) and EMA coefficients (ema = ema_new * params + ema_old * ema) as arrays.
  `batch_sharding` splits the batch over devices. Pure; the caller jits and scans it.
  """
  per_example_loss = get_per_example_loss_fn(config, model, schedule)
  t_count = config.diffusion.num_timesteps
  tc = config.train

  def weighted_loss(params, batch, dropout_rng, weights):
    per_example = per_example_loss(params, batch.x0, batch.t, batch.noise, dropout_rng)
    return jnp.mean(weights[batch.t] * per_example), per_example

  def step(state: TrainState, images: jax.Array, weights, ema_new, ema_old) -> TrainState:
    batch = draw_train_batch(state.rng, state.step, images, tc.batch_size, t_count,
                             config.data.random_flip)
    if batch_sharding is not None:
      split = functools.partial(jax.lax.with_sharding_constraint, shardings=batch_sharding)
      batch = Batch(split(batch.x0), split(batch.t), split(batch.noise))
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    (loss, per_example), grads = jax.value_and_grad(weighted_loss, has_aux=True)(
        state.params, batch, dropout_rng, weights)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = jax.tree.map(lambda new, old: ema_new * new + ema_old * old, params,
                              state.ema_params)
    bad_loss = ~jnp.isfinite(loss)
    bad_grad = ~jnp.isfinite(optax.global_norm(grads))
    skip = jnp.logical_and(tc.skip_nonfinite_updates, bad_loss | bad_grad)
    keep_old = functools.partial(jax.tree.map, lambda old, new: jnp.where(skip, old, new))
    sums = _accumulate(state.sums, jnp.where(skip, 0.0, loss),
                       jnp.where(skip, 0.0, per_example), batch.t, t_count, state.step,
                       bad_loss & ~skip, bad_grad & ~skip, skip)
    return state.replace(step=state.step + 1,
                         params=keep_old(state.params, params),
                         opt_state=keep_old(state.opt_state, opt_state),
                         ema_params=keep_old(state.ema_params, ema_params),
                         sums=sums)

  return step


def get_train_step_fn(config, model, schedule, tx) -> Callable:
  """(state, images) -> state after one optimizer step of the run `config` describes."""
  step = get_step_fn(config, model, schedule, tx)
  weights = jnp.asarray(loss_weights(config, schedule), jnp.float32)
  ema_new = 1.0 - config.train.ema_decay

  def train_step(state: TrainState, images: jax.Array) -> TrainState:
    return step(state, images, weights, ema_new, 1.0 - ema_new)

  return train_step


def get_train_scan_fn(train_step: Callable) -> Callable:
  """(state, images, num_steps) -> state after num_steps steps in one lax.scan."""

  def train_scan(state, images, num_steps):
    return jax.lax.scan(lambda s, _: (train_step(s, images), None), state, None,
                        length=num_steps)[0]

  return jax.jit(train_scan, static_argnums=2, donate_argnums=0)


def train_metrics(sums: MetricSums) -> dict[str, float]:
  """Host-side means of the sums: `train/loss` and the per-timestep-bin losses."""
  sums = jax.device_get(sums)
  count = int(sums.count)
  out = {"train/loss": float(sums.loss / count) if count else float("nan")}
  for b in range(NUM_LOSS_BINS):
    n = int(sums.tbin_count[b])
    out[f"train/loss_tbin/{b}"] = float(sums.tbin_loss[b] / n) if n else float("nan")
  if int(sums.skipped):
    out["train/nonfinite_skipped"] = int(sums.skipped)
  return out


def check_finite(sums: MetricSums) -> None:
  bad_step = int(sums.first_bad_step)
  if bad_step >= 0:
    what = "loss" if int(sums.bad_quantity) == 1 else "gradient"
    raise RunFailed(f"non-finite {what} at step {bad_step + 1}; the last good checkpoint is kept "
                    "as the latest (set train.skip_nonfinite_updates=True to skip such updates)")


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
# The run.
# ----------------------------------------------------------------------------------------------


def config_to_dict(config) -> dict:
  return ml_collections.ConfigDict(config).to_dict()


# Keys that may change between a run and its resume without --allow_config_change.
RESUMABLE_CHANGES = ("train.total_steps", "train.tensorboard")   # neither changes a number


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  diffs = []
  for key in sorted(set(old) | set(new)):
    path = prefix + key
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += config_differences(a, b, path + ".")
    elif _normalise(a) != _normalise(b) and path not in RESUMABLE_CHANGES:
      diffs.append(f"{path}: {a!r} -> {b!r}")
  return diffs


def _normalise(v):
  return list(v) if isinstance(v, tuple) else v


def check_resume_config(workdir: str, config, allow_config_change: bool) -> None:
  old = io.read_config_json(workdir)
  if old is None:
    return
  diffs = config_differences(old, config_to_dict(config))
  if diffs and not allow_config_change:
    raise UserError(f"{workdir} holds a run with a different config ({'; '.join(diffs)}); use "
                    "another --workdir, or pass --allow_config_change to resume it anyway")


class PreemptionFlag:
  """Set by SIGTERM: the loop then checkpoints at the current step and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class CompiledScans:
  """The train scan compiled once per chunk length, with compile time kept apart from run time."""

  def __init__(self, scan_fn):
    self._scan_fn = scan_fn
    self._compiled = {}
    self.compile_seconds = 0.0

  def __call__(self, state, images, num_steps):
    if num_steps not in self._compiled:
      start = time.monotonic()
      self._compiled[num_steps] = self._scan_fn.lower(state, images, num_steps).compile()
      took = time.monotonic() - start
      self.compile_seconds += took
      log.info("compiled the train scan of %d steps in %.1f s", num_steps, took)
    return self._compiled[num_steps](state, images)


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False,
                       evaluators: dict | None = None) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir` to `config.train.total_steps`; returns final metrics.

  `evaluators` replaces the default event handlers (curvature, samples/FID) by name; tests
  and notebooks use it to add or stub out work at events. After a SIGTERM the run stops at the
  end of the current chunk with a checkpoint there, and the returned "step" is short of
  `total_steps`; running it again resumes.
  """
  config = config_lib.validate(config)
  check_resume_config(workdir, config, allow_config_change)
  if not jax.config.jax_compilation_cache_dir:
    io.enable_compilation_cache()
  preempt = PreemptionFlag()
  preempt.install()   # from here on, a SIGTERM during setup also ends the run cleanly
  try:
    return _train(config, workdir, evaluators, preempt)
  finally:
    preempt.uninstall()


def _train(config, workdir: str, evaluators: dict | None, preempt: PreemptionFlag) -> dict:
  """Sets the run up from `workdir` (restoring the latest checkpoint) and runs the event loop."""
  # Every input is checked before the workdir is touched, so bad input leaves nothing behind.
  handlers = default_evaluators(config) if evaluators is None else evaluators
  for handler in handlers.values():
    handler.prepare(config, workdir)
  images = jax.device_put(data_lib.load_images(config.data))
  io.check_writable(workdir)
  model = models.get_model(config.model, compute_dtype(config))
  schedule = make_schedule(config)
  tx = make_optimizer(config.train)

  io.write_config_json(workdir, config_to_dict(config))
  ckpts = io.Checkpoints(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
  with _closed_after(ckpts.close):
    state, meta = _initial_state(config, model, tx, ckpts, workdir)
    writer = io.MetricWriter(workdir, resume_step=int(state.step),
                             wall_time_offset=meta["wall_time"],
                             tensorboard=config.train.tensorboard)
    with _closed_after(writer.flush, writer.close):
      context = RunContext(config=config, workdir=workdir, model=model, schedule=schedule,
                           images=images, writer=writer)
      for handler in handlers.values():
        handler.start(context)
      scans = CompiledScans(get_train_scan_fn(get_train_step_fn(config, model, schedule, tx)))
      return _event_loop(config, state, images, scans, handlers, writer, ckpts, preempt)


def _initial_state(config, model, tx, ckpts: io.Checkpoints, workdir: str):
  """(state, meta) of the latest checkpoint that restores, else of a fresh run."""
  init = functools.partial(create_train_state, config, model, tx)
  if ckpts.steps():
    # Shapes are all a restore needs; computing real initial parameters only to overwrite
    # them would cost every resume seconds (tens on a CPU).
    restored = ckpts.restore_latest(jax.eval_shape(init))
    if restored is not None:
      state, meta, step = restored
      log.info("resumed %s at step %d", workdir, step)
      return state, meta
  # One compiled program, found in the compilation cache by later runs, instead of the
  # hundreds of small dispatches of an eager init. Committed to the device like a restored
  # state, so that fresh and resumed runs share their compiled train scans and evaluations.
  return jax.device_put(jax.jit(init)(), jax.devices()[0]), {"wall_time": 0.0}


def _event_loop(config, state: TrainState, images, scans: CompiledScans, handlers: dict,
                writer: io.MetricWriter, ckpts: io.Checkpoints,
                preempt: PreemptionFlag) -> dict:
  """Scans to each event step, writes all of that step's metrics, then checkpoints it.

  Writes come before the checkpoint, so a run killed between the two resumes from an earlier
  checkpoint: the writer drops the step's partial lines and every evaluation is redone.
  """
  step = int(state.step)
  progress = io.Progress(config.train.total_steps, use_clu=config.train.tensorboard)
  final = {}
  run_start, run_steps, run_seconds = time.monotonic(), 0, 0.0
  while step < config.train.total_steps and not preempt.requested:
    target = next_event_step(config, step)
    log.debug("training steps %d to %d", step, target)
    chunk_start = time.monotonic()
    compile_before = scans.compile_seconds
    state = scans(state, images, target - step)
    check_finite(state.sums)
    run_seconds += time.monotonic() - chunk_start - (scans.compile_seconds - compile_before)
    run_steps += target - step
    step = target
    steps_per_sec = run_steps / run_seconds if run_seconds > 0 else float("nan")
    progress(step, steps_per_sec)
    events = due_events(config, step)
    if "log" in events:
      scalars = train_metrics(state.sums)
      scalars[io.TIMING_PREFIX + "steps_per_sec"] = steps_per_sec
      scalars[io.TIMING_PREFIX + "compile_seconds"] = scans.compile_seconds
      writer.write_scalars(step, scalars)
      final.update(scalars)
      state = state.replace(sums=MetricSums.zeros())
    for name, handler in handlers.items():
      if handler.due(events):
        log.debug("running %s at step %d", name, step)
        final.update(handler(state, step, events))
    if "checkpoint" in events or preempt.requested:
      writer.flush()
      ckpts.save(step, state, {"wall_time": writer.wall_time})
  if preempt.requested:
    log.warning("SIGTERM: stopped at step %d; run the same command to resume from the latest "
                "checkpoint", step)
  log.info("done at step %d: %.1f s compiling, %.1f s running (%.1f steps/s) of %.1f s",
           step, scans.compile_seconds, run_seconds,
           run_steps / run_seconds if run_seconds else float("nan"),
           time.monotonic() - run_start)
  final["step"] = step
  return final


@contextlib.contextmanager
def _closed_after(*closers: Callable[[], None]):
  """Calls `closers` when the block exits.

  If the block raised, a closer's own failure (a flush on a full disk, say) is logged rather
  than raised, so the error reported is the one that stopped the run.
  """
  try:
    yield
  except BaseException:
    for close in closers:
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        log.warning("while stopping: %s: %s", type(e).__name__, e)
    raise
  for close in closers:
    close()


def make_schedule(config) -> diffusion.Schedule:
  d = config.diffusion
  return diffusion.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


@dataclasses.dataclass
class RunContext:
  config: Any
  workdir: str
  model: Any
  schedule: diffusion.Schedule
  images: jax.Array
  writer: io.MetricWriter


def default_evaluators(config) -> dict:
  """The event handlers a config asks for, by name (see `evaluate.py`)."""
  from diffdyn import evaluate  # pylint: disable=import-outside-toplevel
  return evaluate.get_evaluators(config)
