"""diffdyn's side of the benchmark: one function per figure, each timed the same way.

Every figure is compiled ahead of time (compile seconds kept apart), warmed up, then run
`repeats` times with the result blocked on; the figure is the median. Memory is XLA's plan
for the program (arguments + outputs + temporaries - aliased), which is per program and so
needs no allocator reset between figures.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench import hlo
from diffdyn import curvature
from diffdyn import data as data_lib
from diffdyn import evaluate
from diffdyn import models
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
  return Settings(config=e6_config())


def smoke_settings(config=None) -> Settings:
  """Everything tiny, for checking the harness on a CPU; the numbers mean nothing."""
  if config is None:
    from experiments import smoke  # pylint: disable=import-outside-toplevel
    config = smoke.get_config()
    config.loss.weighting = "minsnr"
  return Settings(config=config, warmup=1, repeats=2, dispatches=2, scan_length=2, replicates=2,
                  probes=2, probe_batch=2, sample_batch=2, nfe=2, fid_batch=2, fid_batches=1,
                  precisions=("fp32",))


# ----------------------------------------------------------------------------------------------
# Timing.
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


def with_precision(config, precision: str):
  config = ml_collections.ConfigDict(train.config_to_dict(config))
  config.train.precision = precision
  return config


def _setup(config):
  model = models.get_model(config.model, train.compute_dtype(config))
  schedule = train.make_schedule(config)
  images = jnp.asarray(data_lib.load_images(config.data))
  return model, schedule, images


# ----------------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------------


def bench_train(s: Settings, precision: str) -> tuple[list[Figure], dict[str, Any]]:
  """Train steps/s at the config's batch: one step per dispatch, and the loop's K-step scan.

  Also returns `analyse_step` of the two programs.
  """
  config = with_precision(s.config, precision)
  model, schedule, images = _setup(config)
  tx = train.make_optimizer(config.train)
  step_fn = train.get_train_step_fn(config, model, schedule, tx)
  state = [train.create_train_state(config, model, tx)]
  step, compile_s = compile_ahead(jax.jit(step_fn, donate_argnums=0), state[0], images)

  def dispatch_steps():
    for _ in range(s.dispatches):
      state[0] = step(state[0], images)
    jax.block_until_ready(state[0])

  per_step = median_seconds(dispatch_steps, 1, s.repeats) / s.dispatches
  figures = [Figure(f"train_step_{precision}", 1.0 / per_step, "steps/s", compile_s,
                    1e3 * per_step, _mb(step), "one step per dispatch")]

  k = s.scan_length
  state = [train.create_train_state(config, model, tx)]
  scan, compile_s = compile_ahead(train.get_train_scan_fn(step_fn), state[0], images, k)

  def dispatch_scan():
    state[0] = scan(state[0], images)
    jax.block_until_ready(state[0])

  per_scan = median_seconds(dispatch_scan, s.warmup, s.repeats)
  figures.append(Figure(f"train_scan_{precision}", k / per_scan, "steps/s", compile_s,
                        1e3 * per_scan, _mb(scan), f"{k} steps per dispatch, as the loop runs"))
  return figures, analyse_step(config, step, scan)


def bench_replicates(s: Settings, one_run_steps_per_s: float) -> Figure:
  """R replicates (seeds) in one vmapped scan, against one run's scan of the same length."""
  config = ml_collections.ConfigDict(train.config_to_dict(s.config))
  config.sweep.seeds = s.replicates
  configs = [r.config for r in sweep.replicates(config)]
  model, schedule, images_host = _setup(configs[0])
  placement = sweep.plan_placement(s.replicates, config.train.batch_size, jax.devices()[:1])
  tx = sweep.make_sweep_optimizer(config.train)
  state = [sweep.init_states(configs, model, tx, placement.per_replicate)]
  inputs = (sweep.put(images_host, placement.replicated),
            sweep.put(sweep.stacked_hyperparams(configs, schedule), placement.per_replicate))
  step_fn = sweep.get_replicate_step_fn(configs[0], model, schedule, tx)
  k = s.scan_length
  scan, compile_s = compile_ahead(sweep.get_sweep_scan_fn(step_fn, placement.per_replicate),
                                  state[0], inputs, k)

  def dispatch_scan():
    state[0] = scan(state[0], inputs)
    jax.block_until_ready(state[0])

  per_scan = median_seconds(dispatch_scan, s.warmup, s.repeats)
  cost_ratio = per_scan / (k / one_run_steps_per_s)
  return Figure("replicates", cost_ratio, "x one run's wall time", compile_s, 1e3 * per_scan,
                _mb(scan), f"{s.replicates} replicates, {k} steps per dispatch: "
                f"{s.replicates * k / per_scan:.0f} replicate-steps/s")


def bench_hutchinson(s: Settings, step_ms: float) -> list[Figure]:
  """One Hutchinson measurement: at the peer's shape (batch 4, the train objective), and E6's."""
  config = s.config
  model32 = models.get_model(config.model, jnp.float32)
  schedule = train.make_schedule(config)
  images = jnp.asarray(data_lib.load_images(config.data))
  params = train.create_train_state(config, model32, train.make_optimizer(config.train)).params
  per_example = train.get_per_example_loss_fn(config, model32, schedule)
  weights = train.loss_weights(config, schedule)
  keys = train.stream_keys(config.seed)
  shapes = [("hutchinson", s.probe_batch, "train"),
            ("hutchinson_e6", config.curvature.batch_size, config.curvature.objective)]
  figures = []
  for name, batch_size, objective in shapes:
    fn = curvature.get_curvature_fn(lambda p, x0, t, n: per_example(p, x0, t, n), weights,
                                    config.diffusion.num_timesteps, num_probes=s.probes,
                                    objective=objective)
    probe_batch = curvature.make_probe_batch(keys["probe_batch"], images, batch_size,
                                             config.diffusion.num_timesteps)
    measure, compile_s = compile_ahead(fn, params, probe_batch, keys["curvature"])
    seconds = median_seconds(
        lambda: jax.block_until_ready(measure(params, probe_batch, keys["curvature"])),
        s.warmup, s.repeats)
    figures.append(Figure(name, 1e3 * seconds, "ms/measurement", compile_s, 1e3 * seconds,
                          _mb(measure), f"{s.probes} probes, batch {batch_size}, "
                          f"objective {objective}"))
    figures.append(Figure(f"{name}_over_step", 1e3 * seconds / step_ms, "x one train step",
                          note="one train step: the fp32 scan's time per step"))
  return figures


def bench_inception(s: Settings) -> list[Figure]:
  """pool3 features of 32x32 uint8 images (resized to 299 inside), seeded stand-in weights."""
  from diffdyn import fid  # pylint: disable=import-outside-toplevel
  with np.load(FID_RECIPE) as recipe:
    params = fid.params_from_torch_state_dict(fid.seeded_state_dict(recipe))
  n = s.fid_batch * s.fid_batches
  size = s.config.model.image_size
  images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  figures, features = [], {}
  for precision in (None, "highest"):
    label = precision or "default"
    start = time.perf_counter()
    features[label] = fid.inception_features(params, images[:s.fid_batch], s.fid_batch,
                                             precision=precision)
    first = time.perf_counter() - start
    seconds = median_seconds(
        lambda p=precision: fid.inception_features(params, images, s.fid_batch, precision=p),
        s.warmup, s.repeats)
    per_batch = seconds / s.fid_batches
    figures.append(Figure(f"inception_{label}", n / seconds, "images/s",
                          max(first - per_batch, 0.0), 1e3 * per_batch, None,
                          f"batch {s.fid_batch}, matmul precision {label}"))
  error = (np.abs(features["default"] - features["highest"]).max()
           / np.abs(features["highest"]).max())
  figures[0].note += (f"; features within {error:.1e} (of the largest) of precision highest, "
                      "which tests/test_fid.py holds to pytorch-fid")
  return figures


def bench_sampling(s: Settings, precision: str) -> Figure:
  """DDPM sampling of a batch with the config's sampler settings and `nfe` network calls."""
  config = with_precision(s.config, precision)
  model, schedule, _ = _setup(config)
  params = models.init_params(models.get_model(config.model), jax.random.PRNGKey(0),
                              config.model.image_size, config.model.channels)
  sample_fn = evaluate.get_sample_fn(config, model, schedule, sampler="ddpm", nfe=s.nfe,
                                     eta=1.0, batch_size=s.sample_batch)
  key = jax.random.PRNGKey(1)
  sample, compile_s = compile_ahead(sample_fn, params, key)
  seconds = median_seconds(lambda: jax.block_until_ready(sample(params, key)), s.warmup,
                           s.repeats)
  return Figure(f"sampling_{precision}", s.sample_batch / seconds, "images/s", compile_s,
                1e3 * seconds, _mb(sample), f"DDPM-{s.nfe}, batch {s.sample_batch}")


def analyse_step(config, step, scan) -> dict[str, Any]:
  """FLOPs, bytes and launches of one compiled train step, and the floors they imply on an H100.

  A step's launches are those of the scan's loop body where the scan kept its loop, else those
  of the one-step program.
  """
  costs = hlo.cost(step)
  launches = hlo.count_launches(step.as_text())
  scan_launches = hlo.count_launches(scan.as_text())
  per_step = scan_launches.loop_bodies or launches.entry
  out = {"device": jax.devices()[0].device_kind, "params": models.param_count(config.model),
         "batch": config.train.batch_size, "precision": config.train.precision, **costs,
         "launches_step_program": launches.entry,
         "launches_step_inner_loops": launches.loop_bodies,
         "launches_scan_body": scan_launches.loop_bodies, "launches_per_step": per_step}
  for machine in (hlo.H100_FP32, hlo.H100_TF32, hlo.H100_BF16):
    out[f"floors_ms[{machine.name}]"] = hlo.floors_ms(costs["flops"], costs["bytes"], per_step,
                                                      machine)
  return out


def process_peak_mb() -> float | None:
  """The allocator's peak over this process, where the backend reports one (GPUs do)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20
