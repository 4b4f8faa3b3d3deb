"""What a run does at its event steps besides training: curvature probes, samples and FID.

Each evaluator is built from the config, checks its inputs in `prepare` (before anything is
written), compiles in `start`, and at a due step measures, writes its metrics and returns them.
"""
from __future__ import annotations

import copy
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffdyn import curvature
from diffdyn import diffusion
from diffdyn import io
from diffdyn import models
from diffdyn import train as train_lib

log = logging.getLogger("diffdyn")


def timed_compile(jitted, *args):
  """AOT-compiles `jitted` for `args`; returns (compiled, seconds)."""
  start = time.monotonic()
  compiled = jitted.lower(*args).compile()
  return compiled, time.monotonic() - start


class CurvatureProbe:
  """Hutchinson (or Hutch++) traces of the loss Hessian at the raw training params."""

  def prepare(self, config, workdir):
    del workdir
    self.config = config
    # Compiled measurements by loss weights; the copies `for_run` makes share this dict.
    self._programs = {}

  def start(self, ctx):
    self._bind(ctx)

  def for_run(self, ctx):
    """This probe for another run of a sweep (another seed or variant, same shapes).

    The copy measures on its own run's probe batch and keys and writes to its own writer, but
    shares the compiled measurements: a sweep compiles one per distinct loss weighting.
    """
    probe = copy.copy(self)
    probe.config = ctx.config
    probe._bind(ctx)  # pylint: disable=protected-access
    return probe

  def _bind(self, ctx):
    config, cc = ctx.config, ctx.config.curvature
    weights = train_lib.loss_weights(config, ctx.schedule)
    key = weights.tobytes()
    if key not in self._programs:
      self._programs[key] = self._build(config, ctx.schedule, weights)
    self._fns, self._compiled = self._programs[key]
    keys = train_lib.stream_keys(config.seed)
    self._keys, self._ctx = keys, ctx
    if cc.batch == "fixed":
      x0, t, noise = curvature.make_probe_batch(keys["probe_batch"], ctx.images, cc.batch_size,
                                                config.diffusion.num_timesteps)
      self._fixed = (x0, t, noise)

  @staticmethod
  def _build(config, schedule, weights):
    """({with_eig: jitted measurement or None}, {} for its compiled forms) for these weights."""
    cc = config.curvature
    # float32 and no dropout whatever the training precision: every probe sees one function.
    model = models.get_model(config.model, jnp.float32)
    per_example = train_lib.get_per_example_loss_fn(config, model, schedule)
    common = dict(num_probes=cc.num_probes, estimator=cc.estimator, objective=cc.objective,
                  t_bands=cc.t_bands, chunk_size=cc.chunk_size or None)
    loss = lambda p, x0, t, noise: per_example(p, x0, t, noise)
    fns = {False: jax.jit(curvature.get_curvature_fn(
        loss, weights, config.diffusion.num_timesteps, **common)), True: None}
    if cc.top_eig_every_steps:
      fns[True] = jax.jit(curvature.get_curvature_fn(
          loss, weights, config.diffusion.num_timesteps, top_eig_iters=cc.top_eig_iters, **common))
    return fns, {}

  def due(self, events):
    return "curvature" in events

  def _batch(self, state, step):
    if self.config.curvature.batch == "fixed":
      return self._fixed
    c = self.config
    b = train_lib.draw_train_batch(state.rng, jnp.asarray(step - 1, jnp.int32), self._ctx.images,
                                   c.train.batch_size, c.diffusion.num_timesteps,
                                   c.data.random_flip)
    return b.x0, b.t, b.noise

  def __call__(self, state, step, events):
    del events
    cc = self.config.curvature
    with_eig = self._fns[True] is not None and step % cc.top_eig_every_steps == 0
    params = jax.tree.map(lambda a: a.astype(jnp.float32), state.params)
    args = (params, self._batch(state, step), jax.random.fold_in(self._keys["curvature"], step))
    if with_eig not in self._compiled:
      self._compiled[with_eig], secs = timed_compile(self._fns[with_eig], *args)
      log.info("compiled the curvature probe in %.1f s", secs)
    start = time.monotonic()
    out = jax.device_get(self._compiled[with_eig](*args))
    scalars = {k: float(v) for k, v in out.items()}
    scalars[io.TIMING_PREFIX + "curvature_seconds"] = time.monotonic() - start
    self._ctx.writer.write_scalars(step, scalars)
    return scalars


def get_sample_fn(config, model, schedule, *, sampler, nfe, eta, batch_size, respacing=None):
  """A jitted (params, rng) -> uint8 batch of samples from the EMA network."""
  e, m = config.eval, config.model
  shape = (batch_size, m.image_size, m.image_size, m.channels)
  prediction = config.diffusion.prediction

  def sample(params, rng):
    def eps_fn(x_t, t):
      out = model.apply({"params": params}, x_t, t, train=False)
      return diffusion.eps_from_prediction(schedule, out, x_t, t, prediction)
    x = diffusion.sample(eps_fn, schedule, shape, rng, sampler=sampler, nfe=nfe, eta=eta,
                         clip_x0=e.clip_x0, spacing=e.spacing, variance=e.variance,
                         respacing=respacing or e.respacing)
    return diffusion.to_uint8(x)

  return jax.jit(sample)


def sample_images(sample_fn, params, rng, num: int, batch_size: int) -> np.ndarray:
  """`num` uint8 samples, batch i drawn with fold_in(rng, i); the last batch is cut to size."""
  batches = [np.asarray(sample_fn(params, jax.random.fold_in(rng, i)))
             for i in range(-(-num // batch_size))]
  return np.concatenate(batches)[:num]


class SamplesAndFid:
  """A sample grid at each milestone; FID/KID of the EMA network at milestones and at the end."""

  def prepare(self, config, workdir):
    self.config = config
    self.samples_dir = os.path.join(workdir, "samples")
    self.inception = None
    if config.fid.enabled:
      from diffdyn import fid  # pylint: disable=import-outside-toplevel
      self.inception = fid.load_inception(config.fid.inception_weights or None)
      if config.fid.reference_stats and not os.path.exists(config.fid.reference_stats):
        from diffdyn.errors import UserError  # pylint: disable=import-outside-toplevel
        raise UserError(f"fid.reference_stats {config.fid.reference_stats!r} does not exist; "
                        "pass an .npz with 'mu' and 'sigma', or leave it empty to compute them")

  def start(self, ctx):
    config, e = ctx.config, ctx.config.eval
    self._bind(ctx)
    model = models.get_model(config.model, train_lib.compute_dtype(config))
    grid_batch = min(e.sample_batch_size, e.grid_num_samples)
    self._grid_fn = get_sample_fn(config, model, ctx.schedule, sampler=e.grid_sampler,
                                  nfe=e.grid_nfe, eta=e.grid_eta, batch_size=grid_batch)
    self._grid_batch = grid_batch
    if self.inception is not None:
      self._fid_batch = min(e.sample_batch_size, e.fid_num_samples, e.final_fid_num_samples)
      self._fid_fn = get_sample_fn(config, model, ctx.schedule, sampler=e.sampler, nfe=e.nfe,
                                   eta=e.eta, batch_size=self._fid_batch)
      self._reference = self._reference_stats(ctx)

  def for_run(self, ctx):
    """These evaluations for another run of a sweep (another seed or loss/optimizer variant).

    The copy shares the compiled samplers, the Inception weights and the reference statistics
    (sweeps vary no model, eval or data setting); its samples, noise and metrics are its run's.
    """
    evaluator = copy.copy(self)
    evaluator.config = ctx.config
    evaluator.samples_dir = os.path.join(ctx.workdir, "samples")
    evaluator._bind(ctx)  # pylint: disable=protected-access
    return evaluator

  def _bind(self, ctx):
    self._ctx = ctx
    self._keys = train_lib.stream_keys(ctx.config.seed)
    os.makedirs(self.samples_dir, exist_ok=True)

  def _reference_stats(self, ctx):
    from diffdyn import fid  # pylint: disable=import-outside-toplevel
    fc = self.config.fid
    if fc.reference_stats:
      return fid.load_stats(fc.reference_stats)
    return fid.reference_stats(self.inception, np.asarray(jax.device_get(ctx.images)),
                               cache_dir=fc.cache_dir or io.default_cache_dir(),
                               batch_size=fc.batch_size, keep_features=True)

  def due(self, events):
    return "samples" in events or "final" in events

  def __call__(self, state, step, events):
    e = self.config.eval
    out = {}
    # The grid uses the same noise at every milestone, so grids compare across steps.
    grid = sample_images(self._grid_fn, state.ema_params, self._keys["grid"],
                         e.grid_num_samples, self._grid_batch)
    image = io.image_grid(grid)
    io.save_png(os.path.join(self.samples_dir, f"step_{step:06d}.png"), image)
    self._ctx.writer.write_images(step, {"samples/grid": image[None]})
    if self.inception is not None:
      if "samples" in events:
        out.update(self._fid(state, step, e.fid_num_samples, "val/fid_milestone"))
      if "final" in events:
        out.update(self._fid(state, step, e.final_fid_num_samples, "eval/final"))
    return out

  def _fid(self, state, step, num, prefix):
    from diffdyn import fid  # pylint: disable=import-outside-toplevel
    start = time.monotonic()
    rng = jax.random.fold_in(jax.random.fold_in(self._keys["sample"], step), len(prefix))
    images = sample_images(self._fid_fn, state.ema_params, rng, num, self._fid_batch)
    sampled = time.monotonic()
    feats = fid.inception_features(self.inception, images, batch_size=self.config.fid.batch_size)
    mu, sigma = fid.feature_stats(feats)
    ref = self._reference
    scalars = {f"{prefix}/fid": fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    if "features" in ref:
      subset = min(1000, len(feats), len(ref["features"]))
      scalars[f"{prefix}/kid"] = float(fid.kid(feats, ref["features"], subset_size=subset)[0])
    scalars[io.TIMING_PREFIX + f"{prefix}/sample_seconds"] = sampled - start
    scalars[io.TIMING_PREFIX + f"{prefix}/inception_seconds"] = time.monotonic() - sampled
    self._ctx.writer.write_scalars(step, scalars)
    return scalars


def get_evaluators(config) -> dict:
  evaluators = {}
  if config.curvature.enabled:
    evaluators["curvature"] = CurvatureProbe()
  evaluators["samples"] = SamplesAndFid()
  return evaluators
