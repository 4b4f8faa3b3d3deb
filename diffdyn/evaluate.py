"""What a run does at its event steps besides training: curvature probes, samples and FID.

An evaluator is built from the config (`get_evaluators`). `check` verifies its inputs before
anything is written (weights files, say); `setup` builds its programs for the run's model,
schedule and data; at a due step it measures ONE run's state and returns a `Result`, which the
run loop writes. Evaluators hold no writer and write no file, so a sweep calls the same
evaluator once per replicate, and its compiled programs serve every replicate with the shapes
and loss weights they were built for.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffdyn import curvature
from diffdyn import diffusion
from diffdyn import io
from diffdyn import models
from diffdyn import objective
from diffdyn.errors import UserError

log = logging.getLogger("diffdyn")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every evaluator is built for: the network (training dtype), schedule and data."""
  model: Any
  schedule: diffusion.Schedule
  images: jax.Array            # the training set on the device, uint8 NHWC


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """The run an evaluation is for: its name, its own config (seed, variant values), its keys."""
  name: str
  config: Any
  keys: dict

  @classmethod
  def of(cls, name: str, config) -> "RunInfo":
    return cls(name, config, objective.stream_keys(config.seed))


@dataclasses.dataclass
class Result:
  """What an evaluation produced; the run loop writes it.

  scalars: metric key -> number (metrics.jsonl and the CLU writers).
  images: folder -> uint8 HWC image, saved as `<run dir>/<folder>/step_XXXXXX.png` and sent to
    the CLU writers as `<folder>/grid`.
  arrays: folder -> {name: array}, saved as `<run dir>/<folder>/step_XXXXXX.npz`.
  compile_seconds: program -> seconds spent compiling during this evaluation.
  """
  scalars: dict = dataclasses.field(default_factory=dict)
  images: dict = dataclasses.field(default_factory=dict)
  arrays: dict = dataclasses.field(default_factory=dict)
  compile_seconds: dict = dataclasses.field(default_factory=dict)

  def merge(self, other: "Result") -> "Result":
    self.scalars.update(other.scalars)
    self.images.update(other.images)
    self.arrays.update(other.arrays)
    for name, seconds in other.compile_seconds.items():
      self.compile_seconds[name] = self.compile_seconds.get(name, 0.0) + seconds
    return self


class _Programs:
  """Jitted functions compiled ahead of their first call, once per key, with the time it took."""

  def __init__(self, name: str):
    self.name = name
    self._compiled = {}

  def get(self, key, jitted, *args, result: Result):
    if key not in self._compiled:
      start = time.monotonic()
      self._compiled[key] = jitted.lower(*args).compile()
      took = time.monotonic() - start
      result.compile_seconds[self.name] = result.compile_seconds.get(self.name, 0.0) + took
      log.info("compiled the %s program in %.1f s", self.name, took)
    return self._compiled[key]


# ----------------------------------------------------------------------------------------------
# Curvature.
# ----------------------------------------------------------------------------------------------

# curvature.params -> (which params of the state, the prefix their keys are written under)
_MEASURED_PARAMS = {"raw": (("params", ""),), "ema": (("ema_params", "ema/"),),
                    "both": (("params", ""), ("ema_params", "ema/"))}


def _under(prefix: str, metrics: dict) -> dict:
  """curvature/<key> -> curvature/<prefix><key>."""
  if not prefix:
    return metrics
  head = "curvature/"
  return {head + prefix + k[len(head):]: v for k, v in metrics.items()}


def _timed(fn, *args) -> tuple[dict, float]:
  """(host result of fn(*args), the seconds it took, synchronised)."""
  start = time.monotonic()
  out = jax.device_get(fn(*args))
  return out, time.monotonic() - start


class CurvatureProbe:
  """Curvature of the loss at the raw and/or EMA params, from Hessian-vector products.

  Each measurement freezes one operator: the run's fixed probe batch (or the step's train
  batch), no dropout, float32. Raw and EMA parameters are measured with the same probe
  vectors (common random numbers), so their difference carries no probe noise of its own.

  At every curvature step: Hutchinson traces of the train and/or reference objective, with
  per-block traces, parameter norms and tr/P (`curvature.blocks`), and the Gauss-Newton trace
  on the same probes (`curvature.ggn`, its own program). Less often: Adam's preconditioned
  sharpness of the raw params (`precond_every_steps`) and the SLQ spectral density
  (`density_every_steps`, saved under curvature_density/). Each measurement's seconds are
  returned as time/curvature*_seconds, which the loop also gives in train steps.

  `chunk_size=0` vmaps as many probes at once as fit `curvature.max_memory_gb`, chosen from
  XLA's memory analysis of the compiled measurement (`curvature.plan_chunk_size`); the chunk
  and its planned memory are logged and returned (time/curvature_plan/..., with the timings:
  they describe this machine and process, not the run).
  """
  name = "curvature"

  def __init__(self, config):
    self._cc = config.curvature
    self._train_config = config.train
    self._model_config = config.model
    self._prediction = config.diffusion.prediction
    self._programs = {}        # (kind, weights, ...) -> compiled
    self._probe_batches = {}   # seed -> the fixed probe batch
    self._chunk = None         # the planned chunk, once the first measurement is compiled

  def check(self, config) -> None:
    del config

  def setup(self, setup: Setup) -> None:
    self._setup = setup
    m = self._model_config
    # float32 and no dropout whatever the training precision: every probe sees one function.
    model = models.get_model(m, jnp.float32)
    self._residual = objective.get_residual_fn(model, setup.schedule, self._prediction)
    self._loss = objective.get_per_example_loss_fn(model, setup.schedule, self._prediction)
    self._blocks = None
    if self._cc.blocks:
      shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), m.image_size,
                                                          m.channels))
      levels = curvature.unet_attention_levels(m.image_size, len(m.channel_mult),
                                               m.attn_resolutions)
      self._blocks = curvature.unet_param_blocks(shapes, len(m.channel_mult), m.num_res_blocks,
                                                 levels)

  def due(self, events) -> bool:
    return "curvature" in events

  def _compiled(self, key, build, args, result: Result):
    """The compiled program for `key`; `build(chunk)` makes it. Compile time goes to `result`."""
    if key in self._programs:
      return self._programs[key]
    cc = self._cc
    start = time.monotonic()
    if self._chunk is None and not cc.chunk_size:
      budget = cc.max_memory_gb * 2**30
      plan = curvature.plan_chunk_size(build, args, cc.num_probes, budget)
      self._chunk, compiled = plan.chunk_size, plan.compiled
      log.info("curvature probes in chunks of %d of %d: XLA plans %.2f GiB for the "
               "measurement (budget curvature.max_memory_gb=%g)", plan.chunk_size,
               cc.num_probes, plan.planned_bytes / 2**30, cc.max_memory_gb)
      if plan.planned_bytes > budget:
        log.warning("even one probe at a time needs %.2f GiB, above curvature.max_memory_gb="
                    "%g; lower curvature.batch_size", plan.planned_bytes / 2**30,
                    cc.max_memory_gb)
      result.scalars["time/curvature_plan/chunk_size"] = plan.chunk_size
      result.scalars["time/curvature_plan/planned_gib"] = plan.planned_bytes / 2**30
    else:
      compiled = build(self._chunk or cc.chunk_size).lower(*args).compile()
    took = time.monotonic() - start
    result.compile_seconds["curvature"] = result.compile_seconds.get("curvature", 0.0) + took
    log.info("compiled the curvature %s program in %.1f s", key[0], took)
    self._programs[key] = compiled
    return compiled

  def _probe_batch(self, state, step, run: RunInfo):
    c = run.config
    if self._cc.batch == "current":
      keys = objective.step_keys(state.rng, jnp.asarray(step - 1, jnp.int32))
      b = objective.draw_batch(keys, self._setup.images, c.train.batch_size,
                               c.diffusion.num_timesteps, c.data.random_flip)
      return b.x0, b.t, b.noise
    if c.seed not in self._probe_batches:
      self._probe_batches[c.seed] = curvature.make_probe_batch(
          run.keys["probe_batch"], self._setup.images, self._cc.batch_size,
          c.diffusion.num_timesteps)
    return self._probe_batches[c.seed]

  def _preconditioner(self, state, run: RunInfo) -> curvature.AdamPreconditioner:
    """Adam's preconditioner after the last update, at the learning rate that update used."""
    tc = run.config.train
    _, nu, count = objective.adam_moments(state.opt_state)
    rate = state.opt_state.hyperparams["learning_rate"]
    if tc.warmup_steps > 0:   # the last update was number count - 1 of the warm-up
      rate = rate * jnp.minimum(1.0, (count - 1) / tc.warmup_steps)
    return curvature.adam_preconditioner(nu, count, tc.adam_b1, tc.adam_b2, tc.adam_eps, rate)

  def __call__(self, state, step: int, events, run: RunInfo) -> Result:
    del events
    cc, c = self._cc, run.config
    weights = np.asarray(diffusion.loss_weight(self._setup.schedule, c.loss.weighting,
                                               c.loss.minsnr_gamma, c.diffusion.prediction))
    w_key, t_count = weights.tobytes(), weights.shape[0]
    common = dict(objective=cc.objective)
    with_eig = bool(cc.top_eig_every_steps) and step % cc.top_eig_every_steps == 0
    with_precond = bool(cc.precond_every_steps) and step % cc.precond_every_steps == 0
    with_density = bool(cc.density_every_steps) and step % cc.density_every_steps == 0
    batch = self._probe_batch(state, step, run)
    rng = jax.random.fold_in(run.keys["curvature"], step)
    result = Result()
    seconds = {}

    def add_time(name, took):
      seconds[name] = seconds.get(name, 0.0) + took

    for field, prefix in _MEASURED_PARAMS[cc.params]:
      params = jax.tree.map(lambda a: a.astype(jnp.float32), getattr(state, field))
      args = (params, batch, rng)
      traces = self._compiled(
          ("traces", w_key, with_eig),
          lambda chunk: curvature.get_curvature_fn(
              self._loss, weights, t_count, num_probes=cc.num_probes, estimator=cc.estimator,
              t_bands=cc.t_bands, chunk_size=chunk, blocks=self._blocks,
              top_eig_iters=cc.top_eig_iters if with_eig else 0, **common), args, result)
      out, took = _timed(traces, *args)
      add_time("time/curvature_seconds", took)
      if cc.ggn:
        ggn = self._compiled(
            ("Gauss-Newton", w_key),
            lambda chunk: curvature.get_ggn_trace_fn(
                self._residual, weights, t_count, num_probes=cc.num_probes, chunk_size=chunk,
                **common), args, result)
        more, took = _timed(ggn, *args)
        out.update(more)
        add_time("time/curvature_ggn_seconds", took)
      if with_precond and field == "params":   # Adam's preconditioner is the raw iterate's
        precond_args = (*args, self._preconditioner(state, run))
        precond = self._compiled(
            ("preconditioned sharpness", w_key),
            lambda chunk: curvature.get_precond_sharpness_fn(
                self._loss, weights, t_count, num_iters=cc.precond_iters, **common),
            precond_args, result)
        more, took = _timed(precond, *precond_args)
        out.update(more)
        add_time("time/curvature_precond_seconds", took)
      if with_density:
        density = self._compiled(
            ("spectral density", w_key),
            lambda chunk: curvature.get_spectral_density_fn(
                self._loss, weights, t_count, num_runs=cc.density_runs,
                num_steps=cc.density_steps, num_points=cc.density_points,
                broadening=cc.density_broadening, **common), args, result)
        arrays, took = _timed(density, *args)
        tag = prefix.replace("/", "_")   # "" or "ema_"
        result.arrays.setdefault("curvature_density", {}).update(
            {tag + name: np.asarray(value) for name, value in arrays.items()})
        add_time("time/curvature_density_seconds", took)
      result.scalars.update(_under(prefix, {k: float(v) for k, v in out.items()}))
    result.scalars.update(seconds)
    return result


# ----------------------------------------------------------------------------------------------
# Samples and FID.
# ----------------------------------------------------------------------------------------------


def sampler_settings(eval_config, which: str = "fid") -> dict:
  """`diffusion.sample` keyword arguments of the FID sampler ("fid") or the grid's ("grid")."""
  e = eval_config
  prefix = "grid_" if which == "grid" else ""
  return dict(sampler=e[prefix + "sampler"], nfe=e[prefix + "nfe"], eta=e[prefix + "eta"],
              clip_x0=e.clip_x0, spacing=e.spacing, variance=e.variance,
              respacing=e.respacing)


def get_sample_fn(model, schedule: diffusion.Schedule, prediction: str, shape, **sample_kwargs):
  """A jitted (params, rng) -> uint8 batch of `shape` drawn by `diffusion.sample`."""

  def sample(params, rng):
    def eps_fn(x_t, t):
      out = model.apply({"params": params}, x_t, t, train=False)
      return diffusion.eps_from_prediction(schedule, out, x_t, t, prediction)
    return diffusion.to_uint8(diffusion.sample(eps_fn, schedule, shape, rng, **sample_kwargs))

  return jax.jit(sample)


def sample_images(sample_fn, params, rng, num: int, batch_size: int) -> np.ndarray:
  """`num` uint8 samples, batch i drawn with fold_in(rng, i); the last batch is cut to size."""
  batches = [np.asarray(sample_fn(params, jax.random.fold_in(rng, i)))
             for i in range(-(-num // batch_size))]
  return np.concatenate(batches)[:num]


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour zoom of an HWC image by an integer factor (pixels stay visible as such)."""
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


# eval.grid_params -> (which params of the state, the folder its grids go to)
_GRID_PARAMS = {"ema": (("ema_params", "samples"),), "raw": (("params", "samples_raw"),),
                "both": (("ema_params", "samples"), ("params", "samples_raw"))}


class SamplesAndFid:
  """Sample grids at milestones (EMA and/or raw params); FID/KID at milestones and at the end.

  FID is of the EMA network (`val/fid_milestone`, `eval/final`), as the seeds measured it;
  `eval.fid_raw_params` adds the raw network's at milestones (`val/fid_milestone_raw`).
  """
  name = "samples"

  def __init__(self, config):
    self._config = config
    self._samplers = _Programs("samples")
    self.inception = None
    self._reference = None
    self._inception_warm = False

  def check(self, config) -> None:
    """Loads the Inception weights (or fails with one line naming the file and the fix)."""
    fc = config.fid
    if not fc.enabled:
      return
    from diffdyn import fid  # pylint: disable=import-outside-toplevel
    self.inception = fid.load_inception(fc.inception_weights or None)
    if fc.reference_stats and not os.path.exists(fc.reference_stats):
      raise UserError(f"fid.reference_stats {fc.reference_stats!r} does not exist; pass an .npz "
                      "with 'mu' and 'sigma', or leave it empty to compute them")

  def setup(self, setup: Setup) -> None:
    c, e, m = self._config, self._config.eval, self._config.model
    self._setup = setup
    image_shape = (m.image_size, m.image_size, m.channels)
    self._grid_batch = min(e.sample_batch_size, e.grid_num_samples)
    self._grid_fn = get_sample_fn(setup.model, setup.schedule, c.diffusion.prediction,
                                  (self._grid_batch, *image_shape),
                                  **sampler_settings(e, "grid"))
    if self.inception is not None:
      self._fid_batch = min(e.sample_batch_size, e.fid_num_samples, e.final_fid_num_samples)
      self._fid_fn = get_sample_fn(setup.model, setup.schedule, c.diffusion.prediction,
                                   (self._fid_batch, *image_shape),
                                   **sampler_settings(e, "fid"))

  def reference_stats(self) -> dict:
    """The training set's Inception statistics, computed once (and cached on disk by fid)."""
    from diffdyn import fid  # pylint: disable=import-outside-toplevel
    if self._reference is None:
      fc = self._config.fid
      if fc.reference_stats:
        self._reference = fid.load_stats(fc.reference_stats)
      else:
        self._reference = fid.reference_stats(
            self.inception, np.asarray(jax.device_get(self._setup.images)),
            cache_dir=fc.cache_dir or io.default_cache_dir(), batch_size=fc.batch_size,
            keep_features=True)
    return self._reference

  def due(self, events) -> bool:
    return "samples" in events or "final" in events

  def _draw(self, which: str, params, rng, num: int, result: Result) -> np.ndarray:
    fn, batch = (self._grid_fn, self._grid_batch) if which == "grid" else (self._fid_fn,
                                                                         self._fid_batch)
    compiled = self._samplers.get(which, fn, params, rng, result=result)
    return sample_images(compiled, params, rng, num, batch)

  def __call__(self, state, step: int, events, run: RunInfo) -> Result:
    e = run.config.eval
    result = Result()
    # The grid uses the same noise at every milestone, so grids compare across steps.
    for field, folder in _GRID_PARAMS[e.grid_params]:
      grid = self._draw("grid", getattr(state, field), run.keys["grid"], e.grid_num_samples,
                        result)
      result.images[folder] = upscale(io.image_grid(grid), e.grid_upscale)
    if self.inception is not None:
      if "samples" in events:
        result.merge(self._fid(state.ema_params, step, run, e.fid_num_samples,
                               "val/fid_milestone"))
        if e.fid_raw_params:
          result.merge(self._fid(state.params, step, run, e.fid_num_samples,
                                 "val/fid_milestone_raw"))
      if "final" in events:
        result.merge(self._fid(state.ema_params, step, run, e.final_fid_num_samples,
                               "eval/final"))
    return result

  def _warm_inception(self, result: Result) -> None:
    """Runs Inception once on a padded batch, so its compile is counted apart from its use."""
    if self._inception_warm:
      return
    from diffdyn import fid  # pylint: disable=import-outside-toplevel
    m = self._config.model
    batch = min(self._config.fid.batch_size, self._config.eval.fid_num_samples,
                self._config.eval.final_fid_num_samples)
    start = time.monotonic()
    fid.inception_features(self.inception, np.zeros((batch, m.image_size, m.image_size,
                                                     m.channels), np.uint8), batch_size=batch)
    took = time.monotonic() - start
    result.compile_seconds["inception"] = result.compile_seconds.get("inception", 0.0) + took
    log.info("compiled (and ran once) the Inception network in %.1f s", took)
    self._inception_warm = True

  def _fid(self, params, step: int, run: RunInfo, num: int, prefix: str) -> Result:
    from diffdyn import fid  # pylint: disable=import-outside-toplevel
    result = Result()
    ref = self.reference_stats()
    self._warm_inception(result)
    start = time.monotonic()
    # Every FID of a step draws its own samples; raw and EMA use the same noise.
    rng = jax.random.fold_in(jax.random.fold_in(run.keys["sample"], step),
                             len(prefix.replace("_raw", "")))
    images = self._draw("fid", params, rng, num, result)
    sampled = time.monotonic()
    feats = fid.inception_features(self.inception, images, batch_size=self._config.fid.batch_size)
    result.scalars[f"{prefix}/fid"] = fid.frechet_distance_of_features(feats, ref["mu"],
                                                                       ref["sigma"])
    if "features" in ref:
      subset = min(1000, len(feats), len(ref["features"]))
      result.scalars[f"{prefix}/kid"] = float(fid.kid(feats, ref["features"],
                                                      subset_size=subset)[0])
    result.scalars[f"time/{prefix}/sample_seconds"] = sampled - start
    result.scalars[f"time/{prefix}/inception_seconds"] = time.monotonic() - sampled
    return result


def get_evaluators(config) -> dict:
  """The evaluators a config asks for, by name, in the order they run at a step."""
  evaluators = {}
  if config.curvature.enabled:
    evaluators["curvature"] = CurvatureProbe(config)
  evaluators["samples"] = SamplesAndFid(config)
  return evaluators
