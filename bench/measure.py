"""diffdyn's side of the benchmark: one generator per part, each figure timed the same way.

Every figure is compiled ahead of time (compile seconds kept apart), warmed up, then run
`repeats` times with the result blocked on; the figure is the median. Memory is XLA's plan
for the program (arguments + outputs + temporaries - aliased), which is per program and so
needs no allocator reset between figures. Each part yields its figures most important first,
so that a part stopped at its time cap has already handed over the ones that matter most.

Only the four `build_*` functions below call into diffdyn's training internals (train.py,
sweep.py, evaluate.py); everything else here goes through them.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench import hlo
from diffdyn import config as config_lib
from diffdyn import curvature
from diffdyn import data as data_lib
from diffdyn import diffusion
from diffdyn import evaluate
from diffdyn import models
from diffdyn import objective as objective_lib
from diffdyn import sweep
from diffdyn import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID_RECIPE = os.path.join(ROOT, "tests", "fixtures", "fid_parity.npz")


@dataclasses.dataclass
class Figure:
  """One measured number and how it was obtained."""
  name: str                          # stable id; run.py pairs it with a peer figure
  value: float
  unit: str
  compile_s: float | None = None     # ahead-of-time compile, or first call minus a steady one
  steady_ms: float | None = None     # median wall time of one dispatch, warm
  memory_mb: float | None = None     # XLA's planned device memory for the program
  note: str = ""
  cost: dict[str, float] | None = None   # `program_cost` of one dispatch's program


@dataclasses.dataclass(frozen=True)
class Settings:
  config: Any            # a run config: the model, data, schedule and weighting under test
  warmup: int = 3
  repeats: int = 7
  dispatches: int = 100  # single-step dispatches per timed repeat
  scan_length: int = 100
  replicates: int = 8
  probes: int = 16
  probe_batch: int = 4
  sample_batch: int = 1000
  nfe: int = 50
  fid_batch: int = 500
  fid_batches: int = 4
  precisions: tuple[str, ...] = ("fp32", "bf16")


def e6_config(num_images: int = 50_000) -> ml_collections.ConfigDict:
  """E6 (unet_cifar32, batch 4, Min-SNR-5, curvature on) on synthetic CIFAR-sized data."""
  from experiments import e6  # pylint: disable=import-outside-toplevel
  config = e6.get_config()
  config.data.name = "synthetic"
  config.data.synthetic_num_images = num_images
  return config


def full_settings() -> Settings:
  # A step gathers its batch from the images on the device, so its cost does not depend on
  # how many there are; 5,000 are made in a second, 50,000 take several.
  return Settings(config=e6_config(num_images=5_000))


def smoke_settings(config) -> Settings:
  """Everything tiny around a tiny `config`, for checking the harness on a CPU.

  The numbers mean nothing.
  """
  return Settings(config=config, warmup=1, repeats=2,
                  dispatches=2, scan_length=2, replicates=2, probes=2, probe_batch=2,
                  sample_batch=2, nfe=2, fid_batch=1, fid_batches=1, precisions=("fp32",))


# ----------------------------------------------------------------------------------------------
# diffdyn's training internals: the only calls into train.py, sweep.py and evaluate.py.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainPrograms:
  step: Callable                # jitted (state, images, hyperparams) -> state; state donated
  scan: Callable                # jitted (state, images, hyperparams, num_steps) -> state
  init_state: Callable[[], Any]
  images: jax.Array
  hyperparams: Any


def _programs(config, devices=None) -> TrainPrograms:
  replicas = sweep.get_replicas(config, "/nonexistent", devices)
  program = train.build_program(config, replicas)
  images = sweep.put(data_lib.load_images(config.data), replicas.placement.replicated)
  return TrainPrograms(step=program.runner.jitted_step, scan=program.runner.jitted_scan,
                       init_state=program.init_state, images=images,
                       hyperparams=program.hyperparams)


def build_train_step(config) -> TrainPrograms:
  """The run's train step and the K-step scan of it, as the run loop builds them."""
  return _programs(config)


def build_replicate_step(config, replicates: int) -> TrainPrograms:
  """`replicates` seeds of `config` in the sweep's one vmapped program, on one device."""
  config = ml_collections.ConfigDict(config_lib.to_dict(config))
  config.sweep.seeds = replicates
  return _programs(config, jax.devices()[:1])


def build_curvature_probe(config, batch_size: int, num_probes: int,
                          objective: str) -> tuple[Callable, tuple]:
  """(jitted measurement, its arguments): the run's curvature probe at the initial params.

  Built as the run's probe is (float32 network, the config's estimator, bands and chunks),
  at the given probe batch, probe count and objective.
  """
  cc, num_timesteps = config.curvature, config.diffusion.num_timesteps
  model32 = models.get_model(config.model, jnp.float32)
  schedule = train.make_schedule(config.diffusion)
  keys = objective_lib.stream_keys(config.seed)
  per_example = objective_lib.get_per_example_loss_fn(model32, schedule,
                                                      config.diffusion.prediction)
  weights = diffusion.loss_weight(schedule, config.loss.weighting, config.loss.minsnr_gamma,
                                  config.diffusion.prediction)
  fn = curvature.get_curvature_fn(
      lambda p, x0, t, n: per_example(p, x0, t, n), weights,
      num_timesteps, num_probes=num_probes, estimator=cc.estimator, objective=objective,
      t_bands=cc.t_bands, chunk_size=cc.chunk_size or None)
  params = models.init_params(model32, keys["init"], config.model.image_size,
                              config.model.channels)
  images = jnp.asarray(data_lib.load_images(config.data))
  probe_batch = curvature.make_probe_batch(keys["probe_batch"], images, batch_size,
                                           num_timesteps)
  return fn, (params, probe_batch, keys["curvature"])


def build_sampler(config, nfe: int, batch_size: int) -> tuple[Callable, tuple]:
  """(jitted DDPM sampler, its arguments) with the config's sampling settings."""
  m = config.model
  model = models.get_model(m, train.compute_dtype(config.train.precision))
  params = models.init_params(models.get_model(m), jax.random.PRNGKey(0), m.image_size,
                              m.channels)
  settings = dict(evaluate.sampler_settings(config.eval), sampler="ddpm", nfe=nfe, eta=1.0)
  sample_fn = evaluate.get_sample_fn(model, train.make_schedule(config.diffusion),
                                     config.diffusion.prediction,
                                     (batch_size, m.image_size, m.image_size, m.channels),
                                     **settings)
  return sample_fn, (params, jax.random.PRNGKey(1))


def with_precision(config, precision: str):
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.precision = precision
  return config


# ----------------------------------------------------------------------------------------------
# Timing and program analysis.
# ----------------------------------------------------------------------------------------------


def median_seconds(run: Callable[[], Any], warmup: int, repeats: int) -> float:
  """Median wall time of `run()`, which must block on its result, after `warmup` calls."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def compile_ahead(jitted, *args):
  """(compiled, seconds) for `jitted` at `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _mb(compiled) -> float | None:
  planned = hlo.program_memory_bytes(compiled)
  return None if planned is None else planned / 2**20


def program_cost(compiled, iterations: int = 1) -> dict[str, float]:
  """XLA's FLOPs and bytes, and the launches, of `compiled`, a loop of `iterations` or not.

  XLA's cost analysis counts a while loop's body once, so for a loop (a scan of train steps,
  the sampler's steps) the FLOPs, bytes and `launches_loop_body` are one iteration's.
  """
  launches = hlo.count_launches(compiled.as_text())
  return {**hlo.cost(compiled), "launches_entry": launches.entry,
          "launches_loop_body": launches.loop_bodies, "iterations": iterations}


# ----------------------------------------------------------------------------------------------
# Parts: each yields its figures, the one its target is set on first.
# ----------------------------------------------------------------------------------------------


def bench_train(s: Settings) -> Iterator[Figure]:
  """Train steps/s at the config's batch: the loop's K-step scan, then one step per dispatch."""
  for precision in s.precisions:
    programs = build_train_step(with_precision(s.config, precision))
    images, hp, k = programs.images, programs.hyperparams, s.scan_length
    state = [programs.init_state()]
    scan, compile_s = compile_ahead(programs.scan, state[0], images, hp, k)

    def dispatch_scan(scan=scan):
      state[0] = scan(state[0], images, hp)
      jax.block_until_ready(state[0])

    per_scan = median_seconds(dispatch_scan, s.warmup, s.repeats)
    yield Figure(f"train_scan_{precision}", k / per_scan, "steps/s", compile_s, 1e3 * per_scan,
                 _mb(scan), f"{k} steps per dispatch, as the loop runs", program_cost(scan, k))

    step, compile_s = compile_ahead(programs.step, state[0], images, hp)

    def dispatch_steps(step=step):
      for _ in range(s.dispatches):
        state[0] = step(state[0], images, hp)
      jax.block_until_ready(state[0])

    per_step = median_seconds(dispatch_steps, 1, s.repeats) / s.dispatches
    yield Figure(f"train_step_{precision}", 1.0 / per_step, "steps/s", compile_s,
                 1e3 * per_step, _mb(step), f"one step per dispatch, {s.dispatches} per repeat",
                 program_cost(step))


def bench_replicates(s: Settings, one_run_steps_per_s: float | None) -> Iterator[Figure]:
  """R replicates (seeds) in one vmapped scan, against one run's scan of the same length."""
  programs = build_replicate_step(s.config, s.replicates)
  k = s.scan_length
  state = [programs.init_state()]
  scan, compile_s = compile_ahead(programs.scan, state[0], programs.images, programs.hyperparams,
                                  k)

  def dispatch_scan():
    state[0] = scan(state[0], programs.images, programs.hyperparams)
    jax.block_until_ready(state[0])

  per_scan = median_seconds(dispatch_scan, s.warmup, s.repeats)
  how = f"{s.replicates} replicates, {k} steps per dispatch"
  yield Figure("replicate_steps", s.replicates * k / per_scan, "replicate-steps/s", compile_s,
               1e3 * per_scan, _mb(scan), how, program_cost(scan, k))
  if one_run_steps_per_s:
    yield Figure("replicates", per_scan / (k / one_run_steps_per_s), "x one run's wall time",
                 note=f"{how}, over the train part's train_scan_fp32 of the same length")


def bench_hutchinson(s: Settings, step_ms: float | None) -> Iterator[Figure]:
  """One Hutchinson measurement: at the peer's shape (batch 4, train objective), then E6's."""
  config = s.config
  shapes = [("hutchinson", s.probe_batch, "train"),
            ("hutchinson_e6", config.curvature.batch_size, config.curvature.objective)]
  for name, batch_size, objective in shapes:
    fn, args = build_curvature_probe(config, batch_size, s.probes, objective)
    measure, compile_s = compile_ahead(fn, *args)
    seconds = median_seconds(lambda m=measure: jax.block_until_ready(m(*args)), s.warmup,
                             s.repeats)
    yield Figure(name, 1e3 * seconds, "ms/measurement", compile_s, 1e3 * seconds, _mb(measure),
                 f"{s.probes} probes, batch {batch_size}, objective {objective}",
                 program_cost(measure))
    if step_ms:
      yield Figure(f"{name}_over_step", 1e3 * seconds / step_ms, "x one train step",
                   note="one train step: the train part's fp32 scan, per step")


def bench_sampling(s: Settings) -> Iterator[Figure]:
  """DDPM sampling of a batch with `nfe` network calls; bf16 first, the closest to the peer."""
  for precision in sorted(s.precisions, key=lambda p: p != "bf16"):
    fn, args = build_sampler(with_precision(s.config, precision), s.nfe, s.sample_batch)
    sample, compile_s = compile_ahead(fn, *args)
    seconds = median_seconds(lambda f=sample: jax.block_until_ready(f(*args)), s.warmup,
                             s.repeats)
    yield Figure(f"sampling_{precision}", s.sample_batch / seconds, "images/s", compile_s,
                 1e3 * seconds, _mb(sample), f"DDPM-{s.nfe}, batch {s.sample_batch}",
                 program_cost(sample, s.nfe))


def bench_inception(s: Settings) -> Iterator[Figure]:
  """pool3 features of uint8 images at the model's size (resized to 299 inside), seeded weights.

  Timed through `fid.inception_features`, as a run computes FID: host batches in, features
  out. Its compile time is the first call less a steady one; FLOPs are XLA's for one batch.
  """
  from diffdyn import fid  # pylint: disable=import-outside-toplevel
  from diffdyn.fid import inception  # pylint: disable=import-outside-toplevel
  with np.load(FID_RECIPE) as recipe:
    params = fid.params_from_torch_state_dict(fid.seeded_state_dict(recipe))
  n = s.fid_batch * s.fid_batches
  size = s.config.model.image_size
  images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  highest = None
  for precision in (None, "highest"):
    label = precision or "default"
    start = time.perf_counter()
    features = fid.inception_features(params, images[:s.fid_batch], s.fid_batch,
                                      precision=precision)
    first = time.perf_counter() - start
    seconds = median_seconds(
        lambda p=precision: fid.inception_features(params, images, s.fid_batch, precision=p),
        s.warmup, s.repeats)
    per_batch = seconds / s.fid_batches
    batch = inception.preprocess(images[:s.fid_batch], precision=precision)
    cost = {**hlo.cost(inception.pool3.lower(params, batch, precision=precision)),
            "iterations": 1}
    note = f"batch {s.fid_batch}, matmul precision {label}"
    if precision is None:
      default_features = features
    else:
      highest = features
      error = (np.abs(default_features - highest).max() / np.abs(highest).max())
      note += (f"; the default's features are within {error:.1e} (of the largest) of these, "
               "which tests/test_fid.py holds to pytorch-fid")
    yield Figure(f"inception_{label}", n / seconds, "images/s", max(first - per_batch, 0.0),
                 1e3 * per_batch, None, note, cost)


def process_peak_mb() -> float | None:
  """The allocator's peak over this process, where the backend reports one (GPUs do)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def device_kind() -> str:
  return jax.devices()[0].device_kind
