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


class CurvatureProbe:
  """Hutchinson (or Hutch++) traces of the loss Hessian at the raw and/or EMA params.

  Each measurement freezes one operator: the run's fixed probe batch (or the step's train
  batch), no dropout, float32. Raw and EMA parameters are measured with the same probe
  vectors (common random numbers), so their difference carries no probe noise of its own.
  """
  name = "curvature"

  def __init__(self, config):
    self._cc = config.curvature
    self._model_config = config.model
    self._prediction = config.diffusion.prediction
    self._programs = _Programs(self.name)
    self._fns = {}
    self._probe_batches = {}

  def check(self, config) -> None:
    del config

  def setup(self, setup: Setup) -> None:
    self._setup = setup
    # float32 and no dropout whatever the training precision: every probe sees one function.
    model = models.get_model(self._model_config, jnp.float32)
    self._loss = objective.get_per_example_loss_fn(model, setup.schedule, self._prediction)

  def due(self, events) -> bool:
    return "curvature" in events

  def _fn(self, weights: np.ndarray, with_eig: bool):
    key = (weights.tobytes(), with_eig)
    if key not in self._fns:
      cc = self._cc
      loss = lambda p, x0, t, noise: self._loss(p, x0, t, noise)
      self._fns[key] = curvature.get_curvature_fn(
          loss, weights, weights.shape[0], num_probes=cc.num_probes, estimator=cc.estimator,
          objective=cc.objective, t_bands=cc.t_bands, chunk_size=cc.chunk_size or None,
          top_eig_iters=cc.top_eig_iters if with_eig else 0)
    return key, self._fns[key]

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

  def __call__(self, state, step: int, events, run: RunInfo) -> Result:
    del events
    cc, c = self._cc, run.config
    weights = np.asarray(diffusion.loss_weight(self._setup.schedule, c.loss.weighting,
                                               c.loss.minsnr_gamma, c.diffusion.prediction))
    with_eig = bool(cc.top_eig_every_steps) and step % cc.top_eig_every_steps == 0
    key, fn = self._fn(weights, with_eig)
    batch = self._probe_batch(state, step, run)
    rng = jax.random.fold_in(run.keys["curvature"], step)
    result = Result()
    start = None
    for field, prefix in _MEASURED_PARAMS[cc.params]:
      params = jax.tree.map(lambda a: a.astype(jnp.float32), getattr(state, field))
      compiled = self._programs.get(key, fn, params, batch, rng, result=result)
      start = start or time.monotonic()
      out = jax.device_get(compiled(params, batch, rng))
      result.scalars.update(_under(prefix, {k: float(v) for k, v in out.items()}))
    result.scalars["time/curvature_seconds"] = time.monotonic() - start
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
    mu, sigma = fid.feature_stats(feats)
    result.scalars[f"{prefix}/fid"] = fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
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
