"""The sampler audit: is it the sampler, the training, or the EMA? It weighs the evidence.

  python -m diffdyn.analysis audit RUN_DIR [--out DIR] [--num-samples N] [--params both] ...

Every sampler configuration draws from the same x_T, with the EMA parameters, the raw
parameters or both (the checkpoint holds `params` and `ema_params`):
  - the reference: DDPM over all T steps, which needs no respacing, so no respacing bug;
  - the run's own samplers (its FID sampler, eval.*, and its grid sampler, eval.grid_*),
    which the verdict is about ("audited");
  - controls: DDPM-50 respaced, DDIM-20, and DDPM-50 with respacing="none", a sampler that
    strides the original betas without recomputing them (what such a bug produces).

Evidence:
  1. Each configuration against the data (the seeds' symptoms below) and against the
     reference on the same x_T: `worse than the reference` when its distance to the data
     (the yardstick) is more than `worse_factor` times the reference's, or it saturates
     beyond the reference by both `saturation_factor` and `saturation_min`. Symptoms
     relative to the data alone fire on every sampler of an imperfect model.
  2. Model quality over training: the run's milestone FIDs (metrics.jsonl), else the
     yardstick of the reference sampler at each kept checkpoint. "Still improves" when the
     last value is below the one before by more than `quality_tolerance`.
  3. EMA against raw parameters: the yardstick of the reference sampler with each, and the
     weight of the initialisation left in the EMA (from train.ema_decay, train.ema_warmup).

The yardstick is FID when Inception weights are available, else the pixel Frechet distance
(`pixel_fd`): the Frechet distance between Gaussians fitted to the images' pixel values
(scaled to [0, 1]) at 16x16 at most (larger images are area-averaged down).

Pixel statistics, on uint8 NHWC images (every value is a channel value 0..255):
  saturated: the fraction of channel values equal to 0 or 255, over all images, pixels and
    channels.
  hf_fraction: per image, the grey image (mean of the channels) minus its mean is Fourier
    transformed (2-D DFT); its power |F(f)|^2 summed over frequencies with radius
    |f| > half the Nyquist frequency (|f| > 0.25 cycles/pixel) is divided by the total power.
    The mean of that fraction over images; an image without any variation counts as 0.
    White noise puts ~80% of its power there, smooth images a few percent.
  hf_ratio: hf_fraction of the samples divided by that of the data.
  unique_levels: per image and channel, the number of distinct values; the mean over images
    and channels. Posterised images use few levels.
  mean, std: of all channel values.

Symptoms against the data (`Thresholds`; the report states them):
  saturated: saturated > saturation_factor x the data's and > saturation_min.
  speckle: hf_ratio > hf_ratio_min.
  posterized: unique_levels < levels_factor x the data's.

Verdicts (`weigh_evidence`), first that applies:
  - "consistent with a sampler that strides the original betas": one of the run's samplers
    is worse than the reference and strides them (respacing="none");
  - "EMA still dominated by the initialisation": more than `ema_init_weight_max` of the EMA is
    the initialisation and the raw parameters are better by more than `quality_tolerance`;
  - "under-trained": quality still improves. Worded "under-trained: every correct sampler
    shows the symptom and quality still improves with steps" when every correctly respaced
    sampler shows a symptom against the data; else the text names those that do not;
  - "no sampler defect found".
A correctly respaced sampler worse than the reference is named in every verdict: its step
count costs quality on this network, which is no respacing bug.

Sampling goes through `_sampler` and the checkpoint layout through `_state_template`: the
only two places that know train.py and evaluate.py. Nothing is written into the run
directory except under the output directory (default RUN_DIR/audit).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import matplotlib.backends.backend_agg as backend_agg
import matplotlib.figure
import ml_collections
import numpy as np

from diffdyn import config as config_lib
from diffdyn import data as data_lib
from diffdyn import errors
from diffdyn import evaluate
from diffdyn import fid as fid_lib
from diffdyn import io
from diffdyn import models
from diffdyn import sweep
from diffdyn import train as train_lib
from diffdyn.analysis import criteria
from diffdyn.analysis import runs as runs_lib
from diffdyn.analysis import yardsticks

CONFIG_FILE = io.CONFIG_FILE
CHECKPOINTS_DIR = "checkpoints"
AUDIT_DIR = "audit"
REPORT_FILE = "audit.md"
JSON_FILE = "audit.json"
FIGURE_FILE = "side_by_side.png"
DATA = "data"
SYMPTOMS = ("saturated", "speckle", "posterized")
PARAMS = ("ema", "raw")
PARAMS_CHOICES = ("ema", "raw", "both")
ROLES = ("reference", "audited", "control")
# The sampler settings every control and the reference share, whatever the run's eval config
# says, so that audits of different runs compare: the small posterior variance, clipped x0.
FIXED_EVAL = dict(clip_x0=True, variance="small", spacing="linspace")
# Enough data images for population-level statistics; more only costs time.
MAX_DATA_IMAGES = 5000
# Half the Nyquist frequency (0.5 cycles/pixel): the high-frequency band's lower edge.
HF_CUTOFF = 0.25
# Grids show at most this many images, each upscaled (nearest neighbour) to about this size.
GRID_IMAGES = 64
GRID_IMAGE_PIXELS = 128
# pixel_fd works at most at this resolution: 768 values per RGB image keep the covariance's
# square root fast, and 16x16 still holds the speckle a striding sampler leaves.
PIXEL_FD_SIZE = 16

VERDICT_STRIDE = "consistent with a sampler that strides the original βs"
VERDICT_EMA = "EMA still dominated by the initialisation"
VERDICT_UNDERTRAINED = ("under-trained: every correct sampler shows the symptom and quality "
                        "still improves with steps")
VERDICT_NONE = "no sampler defect found"


class AuditError(errors.UserError):
  """The run directory or an input file cannot be used; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """One sampler configuration of the audit and its part in the verdict (`ROLES`)."""
  name: str
  label: str
  sampler: str
  nfe: int
  eta: float
  respacing: str
  role: str = "control"
  variance: str = FIXED_EVAL["variance"]
  spacing: str = FIXED_EVAL["spacing"]
  clip_x0: bool = FIXED_EVAL["clip_x0"]

  def settings(self) -> tuple:
    """What makes two configurations draw the same samples."""
    return (self.sampler, self.nfe, self.eta if self.sampler == "ddim" else None,
            self.respacing, self.variance if self.sampler == "ddpm" else None, self.spacing,
            self.clip_x0)


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Where a statistic becomes a symptom, a defect or a finding (see the module docstring)."""
  saturation_factor: float = 3.0
  saturation_min: float = 0.05
  hf_ratio_min: float = 2.0
  levels_factor: float = 0.5
  worse_factor: float = 2.0
  quality_tolerance: float = 0.05
  ema_init_weight_max: float = 0.05


def reference_configuration(num_timesteps: int) -> SamplerConfig:
  return SamplerConfig("ddpm_all", f"DDPM-{num_timesteps} (all steps, reference)", "ddpm",
                       num_timesteps, 1.0, "respaced", "reference")


def _label(sampler: str, nfe: int, eta: float, respacing: str) -> str:
  label = f"{sampler.upper()}-{nfe}" + (f" (eta={eta:g})" if sampler == "ddim" else "")
  return label + (" respacing=none" if respacing == "none" else "")


def default_configurations(config, ddpm_nfe: int = 50,
                           ddim_nfe: int = 20) -> tuple[SamplerConfig, ...]:
  """The reference, the controls and the run's own FID and grid samplers (NFEs capped at T).

  A control with the settings of one of the run's samplers is that sampler ("audited"); a
  run's sampler that matches no control is added under its own name.
  """
  t_count = config.diffusion.num_timesteps
  ddpm_nfe, ddim_nfe = min(ddpm_nfe, t_count), min(ddim_nfe, t_count)
  configs = [
      SamplerConfig("ddpm_respaced", f"DDPM-{ddpm_nfe} respaced", "ddpm", ddpm_nfe, 1.0,
                    "respaced"),
      SamplerConfig("ddpm_none", f"DDPM-{ddpm_nfe} respacing=none (strides the original "
                    "betas)", "ddpm", ddpm_nfe, 1.0, "none"),
      SamplerConfig("ddim", f"DDIM-{ddim_nfe} (eta=0)", "ddim", ddim_nfe, 0.0, "respaced"),
      reference_configuration(t_count)]
  e = config.eval
  own = {"run_fid_sampler": ("the run's FID sampler", e.sampler, e.nfe, e.eta, e.respacing),
         "run_grid_sampler": ("the run's grid sampler", e.grid_sampler, e.grid_nfe, e.grid_eta,
                              "respaced")}
  for name, (what, sampler, nfe, eta, respacing) in own.items():
    mine = SamplerConfig(name, f"{_label(sampler, nfe, eta, respacing)} ({what})", sampler,
                         nfe, eta, respacing, "audited", e.variance, e.spacing, e.clip_x0)
    same = [i for i, c in enumerate(configs) if c.settings() == mine.settings()]
    if same:
      c = configs[same[0]]
      role = c.role if c.role == "reference" else "audited"
      label = c.label if what in c.label else f"{c.label}, {what}"
      configs[same[0]] = dataclasses.replace(c, role=role, label=label)
    else:
      configs.insert(-1, mine)
  return tuple(configs)


# ----------------------------------------------------------------------------------------------
# Pixel statistics.
# ----------------------------------------------------------------------------------------------


def _check_uint8_nhwc(images) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or 0 in images.shape:
    raise ValueError(f"expected a non-empty uint8 (N, H, W, C) array, got {images.dtype} "
                     f"{images.shape}")
  return images


def saturated_fraction(images) -> float:
  """The fraction of channel values that are 0 or 255."""
  images = _check_uint8_nhwc(images)
  return float(np.mean((images == 0) | (images == 255)))


def high_frequency_fraction(images, cutoff: float = HF_CUTOFF, chunk: int = 1000) -> float:
  """Mean over images of the grey image's spectral power above `cutoff` cycles/pixel.

  The power excludes the mean (DC), so the fraction describes the image's variation only;
  an image with none contributes 0.
  """
  images = _check_uint8_nhwc(images)
  h, w = images.shape[1:3]
  radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
  high = radius > cutoff
  fractions = []
  for start in range(0, images.shape[0], chunk):
    grey = images[start:start + chunk].astype(np.float64).mean(axis=-1)
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(grey)) ** 2
    total = power.sum(axis=(1, 2))
    # Round-off on a flat image leaves power many orders below one grey level's (~1).
    fractions.append(np.divide(power[:, high].sum(axis=1), total, out=np.zeros_like(total),
                               where=total > 1e-6))
  return float(np.concatenate(fractions).mean())


def unique_levels(images) -> float:
  """Mean over images and channels of the number of distinct values."""
  images = _check_uint8_nhwc(images)
  n, h, w, c = images.shape
  ordered = np.sort(images.reshape(n, h * w, c), axis=1)
  return float(np.mean(1 + np.count_nonzero(np.diff(ordered, axis=1), axis=1)))


def pixel_stats(images) -> dict[str, float]:
  """Every pixel statistic of the module docstring except the ratio to the data."""
  images = _check_uint8_nhwc(images)
  return dict(saturated=saturated_fraction(images),
              hf_fraction=high_frequency_fraction(images),
              unique_levels=unique_levels(images),
              mean=float(images.mean()), std=float(images.std()))


def pixel_fd(images, data_images, size: int = PIXEL_FD_SIZE) -> float:
  """The Frechet distance between Gaussians fitted to two image sets' pixel values in [0, 1].

  Images larger than `size` are area-averaged to size x size first (by an integer factor).
  A yardstick of quality that needs no Inception weights; like FID it is biased by the
  number of images, so compare values measured with the same numbers only.
  """
  def features(x):
    x = _check_uint8_nhwc(x).astype(np.float64) / 255.0
    n, h, w, c = x.shape
    factor = max(1, h // size)
    if h % factor or w % factor:
      factor = 1
    x = x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return x.reshape(n, -1)
  mu1, sigma1 = fid_lib.feature_stats(features(images))
  mu2, sigma2 = fid_lib.feature_stats(features(data_images))
  return fid_lib.frechet_distance(mu1, sigma1, mu2, sigma2)


def grid_of(images: np.ndarray) -> np.ndarray:
  """At most GRID_IMAGES images tiled and upscaled so that each is ~GRID_IMAGE_PIXELS wide."""
  factor = max(1, round(GRID_IMAGE_PIXELS / images.shape[1]))
  return evaluate.upscale(io.image_grid(images[:GRID_IMAGES]), factor)


# ----------------------------------------------------------------------------------------------
# Reading the run.
# ----------------------------------------------------------------------------------------------


def _as_tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config held (the model wants hashable sequences)."""
  if isinstance(value, dict):
    return {k: _as_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def _fill_defaults(loaded: dict, defaults: dict, prefix: str = "") -> list[str]:
  """Adds keys of `defaults` missing from `loaded` (in place); returns their dotted names."""
  added = []
  for key, default in defaults.items():
    if key not in loaded:
      loaded[key] = default
      added.append(prefix + key)
    elif isinstance(default, dict) and isinstance(loaded[key], dict):
      added += _fill_defaults(loaded[key], default, f"{prefix}{key}.")
  return added


def load_config(run_dir: pathlib.Path) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The run's validated config from RUN_DIR/config.json, and warnings about it.

  Keys that a run from an older diffdyn lacks take today's defaults, with a warning.
  """
  if not run_dir.is_dir():
    raise AuditError(f"{run_dir}: not a directory; pass a run directory (the --workdir of "
                     "launch.py)")
  path = run_dir / CONFIG_FILE
  if not path.is_file():
    raise AuditError(f"{path}: missing; is {run_dir} a run directory? (launch.py writes it "
                     "before training starts)")
  try:
    loaded = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise AuditError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise AuditError(f"{path}: cannot be read ({e}); restore the run's config.json") from None
  if not isinstance(loaded, dict):
    raise AuditError(f"{path}: expected a JSON object, got {type(loaded).__name__}")
  added = _fill_defaults(loaded, config_lib.base_config().to_dict())
  try:
    config = config_lib.validate(ml_collections.ConfigDict(_as_tuples(loaded)))
  except errors.UserError as e:
    raise AuditError(f"{path}: {e}") from None
  warnings = [f"{path} lacks {key}; using today's default" for key in added]
  return config, warnings


# ----------------------------------------------------------------------------------------------
# What the audit needs from train.py and evaluate.py, in two functions.
# ----------------------------------------------------------------------------------------------


def _state_template(config):
  """(the model, the abstract train state a checkpoint of this config restores into).

  The state must have `params` (raw) and `ema_params`.
  """
  program = train_lib.build_program(config, sweep.get_replicas(config, "."))
  return program.model, program.abstract_state()


def _sampler(config, model, sc: SamplerConfig, batch_size: int) -> Callable:
  """(params, rng, num) -> `num` uint8 samples drawn with `sc` on the run's schedule.

  Batch i uses fold_in(rng, i) and starts from x_T = normal(split(that)[0]) (see
  diffusion.sample), so configurations given the same rng start from the same noise. One
  compiled program per configuration, reused for every parameter set and checkpoint.
  """
  m = config.model
  sample_fn = evaluate.get_sample_fn(
      model, train_lib.make_schedule(config.diffusion), config.diffusion.prediction,
      (batch_size, m.image_size, m.image_size, m.channels), sampler=sc.sampler, nfe=sc.nfe,
      eta=sc.eta, clip_x0=sc.clip_x0, spacing=sc.spacing, variance=sc.variance,
      respacing=sc.respacing)
  return lambda params, rng, num: evaluate.sample_images(sample_fn, params, rng, num,
                                                         batch_size)


# ----------------------------------------------------------------------------------------------
# Checkpoints, read-only.
# ----------------------------------------------------------------------------------------------


class _Checkpoints:
  """The run's checkpoints, opened read-only: an audit leaves the run as it found it (no
  temporary directory cleaned, no damaged checkpoint moved aside)."""

  def __init__(self, directory: pathlib.Path, template):
    with io.quiet_absl():
      self._ckpts = io.Checkpoints(str(directory), read_only=True)
    self.template = template

  def steps(self) -> list[int]:
    with io.quiet_absl():
      return self._ckpts.steps()

  def restore_latest(self):
    """(state or None, its step, (step, why) of the newer ones that failed)."""
    with io.quiet_absl():
      restored = self._ckpts.restore_latest(self.template)
    failures = list(self._ckpts.restore_failures)
    if restored is None:
      return None, -1, failures
    state, _, step = restored
    return state, step, failures

  def restore(self, step: int):
    """The state at `step`, or None when it does not restore."""
    try:
      with io.quiet_absl():
        return self._ckpts.restore(step, self.template)[0]
    except Exception:  # pylint: disable=broad-except
      return None  # orbax raises many types for a damaged checkpoint

  def close(self) -> None:
    self._ckpts.close()


def open_checkpoints(run_dir: pathlib.Path, template) -> tuple[_Checkpoints, Any, int,
                                                                 list[str]]:
  """(checkpoints, newest state that restores, its step, warnings); AuditError when none."""
  directory = run_dir / CHECKPOINTS_DIR
  if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
    raise AuditError(f"{directory}: no checkpoint; train the run first (python launch.py "
                     f"--config ... --workdir {run_dir}), or pass another run directory")
  ckpts = _Checkpoints(directory, template)
  steps = ckpts.steps()
  if not steps:
    ckpts.close()
    raise AuditError(f"{directory}: no complete checkpoint; train the run first, or pass "
                     "another run directory")
  state, step, failures = ckpts.restore_latest()
  if state is None:
    ckpts.close()
    earlier = {1: "", 2: ", nor does the one before it"}.get(
        len(steps), f", nor do the {len(steps) - 1} before it")
    raise AuditError(f"{directory / str(steps[-1])}: the checkpoint does not restore{earlier} "
                     f"({failures[0][1]}); it is damaged or was written with another config; "
                     "re-run the training to write a new one")
  warnings = [f"the checkpoint at step {failed} does not restore ({why}); audited the one at "
              f"step {step}" for failed, why in failures]
  return ckpts, state, step, warnings


# ----------------------------------------------------------------------------------------------
# FID.
# ----------------------------------------------------------------------------------------------


def find_inception_weights(given: str | None, config) -> str | None:
  """The weights file to use: the flag, else the run's, else a cached copy; None: no FID.

  Never downloads: an audit without weights uses the pixel Frechet distance instead.
  """
  weights = fid_lib.weights
  if given:
    if not os.path.isfile(given):
      raise AuditError(f"{given}: no such Inception weights file; pass pytorch-fid's "
                       f"{weights.WEIGHTS_FILENAME} or its converted .npz, or leave "
                       "--inception-weights out to skip FID")
    return given
  if config.fid.inception_weights:
    if not os.path.isfile(config.fid.inception_weights):
      raise AuditError(f"{config.fid.inception_weights}: the run's fid.inception_weights does "
                       "not exist here; pass --inception-weights FILE, or --no-fid")
    return config.fid.inception_weights
  cache = config.fid.cache_dir or weights.default_cache_dir()
  stem = os.path.splitext(os.path.join(cache, weights.WEIGHTS_FILENAME))[0]
  for path in (stem + ".npz", stem + ".pth"):
    if os.path.isfile(path):
      return path
  return None


def find_reference_stats(given: str | None, config) -> str | None:
  """An explicit mu/sigma file (the flag, else the run's); None: computed from the data."""
  path = given or config.fid.reference_stats
  if path and not os.path.isfile(path):
    flag = "--reference-stats" if given else "the run's fid.reference_stats"
    raise AuditError(f"{path}: no such FID statistics file ({flag}); pass an .npz with 'mu' "
                     "and 'sigma' (python -m diffdyn.fid stats makes one), or leave it out to "
                     "compute them from the run's data")
  return path or None


@dataclasses.dataclass
class _Fid:
  """Inception parameters and the reference statistics that sample FIDs are measured to."""
  params: Any
  reference: dict
  batch_size: int

  def __call__(self, images: np.ndarray) -> float:
    features = fid_lib.inception_features(self.params, images, batch_size=self.batch_size)
    return fid_lib.frechet_distance_of_features(features, self.reference["mu"],
                                                self.reference["sigma"])


def _load_fid(weights_path: str, stats_path: str | None, config, data_images: np.ndarray,
              batch_size: int) -> _Fid:
  params = fid_lib.load_inception(weights_path)
  if stats_path:
    reference = fid_lib.load_stats(stats_path)
  else:
    reference = fid_lib.reference_stats(params, data_images,
                                    cache_dir=config.fid.cache_dir or io.default_cache_dir(),
                                    batch_size=config.fid.batch_size)
  return _Fid(params, reference, batch_size)


# ----------------------------------------------------------------------------------------------
# Evidence: samplers against the data and against the reference.
# ----------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
  return a / b if b > 0 else math.nan


def relative_stats(stats: dict, data_stats: dict) -> dict[str, float]:
  """The statistics that symptoms are judged on, relative to the data's."""
  return dict(saturated_ratio=_ratio(stats["saturated"], data_stats["saturated"]),
              hf_ratio=_ratio(stats["hf_fraction"], data_stats["hf_fraction"]),
              levels_ratio=_ratio(stats["unique_levels"], data_stats["unique_levels"]))


def symptoms(stats: dict, data_stats: dict, thresholds: Thresholds = Thresholds()) -> list[str]:
  """The seeds' symptoms that samples with `stats` show, judged against the data's."""
  found = []
  if stats["saturated"] > max(thresholds.saturation_factor * data_stats["saturated"],
                              thresholds.saturation_min):
    found.append("saturated")
  if stats["hf_fraction"] > thresholds.hf_ratio_min * data_stats["hf_fraction"]:
    found.append("speckle")
  if stats["unique_levels"] < thresholds.levels_factor * data_stats["unique_levels"]:
    found.append("posterized")
  return found


def against_reference(row: dict, reference: dict, thresholds: Thresholds) -> dict:
  """How a configuration's samples compare with the reference's from the same x_T.

  Worse when its yardstick (distance to the data) exceeds worse_factor x the reference's,
  or its saturation exceeds both saturation_factor x and saturation_min above the
  reference's.
  """
  s, r = row["stats"], reference["stats"]
  quality = _ratio(row["quality"], reference["quality"])
  reasons = []
  if quality > thresholds.worse_factor:
    reasons.append(f"{row['quality_name']} {quality:.2g}x the reference's")
  if s["saturated"] > max(thresholds.saturation_factor * r["saturated"],
                          r["saturated"] + thresholds.saturation_min):
    reasons.append(f"saturated {s['saturated']:.1%} against {r['saturated']:.1%}")
  return dict(quality_ratio=quality, hf_ratio=_ratio(s["hf_fraction"], r["hf_fraction"]),
              saturated_ratio=_ratio(s["saturated"], r["saturated"]),
              levels_ratio=_ratio(s["unique_levels"], r["unique_levels"]),
              worse=bool(reasons), reasons=reasons)


def measure(sc: SamplerConfig, params: str, images: np.ndarray, data_stats: dict,
            quality: Callable[[np.ndarray], float], quality_name: str,
            thresholds: Thresholds) -> dict:
  """One configuration's row: statistics, symptoms against the data, its yardstick."""
  stats = pixel_stats(images)
  return dict(dataclasses.asdict(sc), params=params, stats=stats,
              relative=relative_stats(stats, data_stats),
              symptoms=symptoms(stats, data_stats, thresholds), quality=quality(images),
              quality_name=quality_name, grid=f"grid_{params}_{sc.name}.png")


def compare_to_reference(rows: Sequence[dict], thresholds: Thresholds) -> None:
  """Adds `vs_reference` to every row: against the reference of the same parameters."""
  for params in {r["params"] for r in rows}:
    group = [r for r in rows if r["params"] == params]
    reference = [r for r in group if r["role"] == "reference"]
    for row in group:
      row["vs_reference"] = (against_reference(row, reference[0], thresholds)
                             if reference and row["role"] != "reference" else None)


# ----------------------------------------------------------------------------------------------
# Evidence: model quality over training, EMA against raw parameters.
# ----------------------------------------------------------------------------------------------


def quality_trend(points: Sequence[tuple[int, float]], source: str,
                  tolerance: float) -> dict:
  """Is quality (a distance: lower is better) still improving at the last evaluation?

  Improving when the last value is below the one before it by more than `tolerance` of
  that one; None (unknown) with fewer than two finite points.
  """
  points = sorted((int(s), float(v)) for s, v in points if math.isfinite(v))
  improving, change = None, None
  if len(points) >= 2:
    (_, before), (_, last) = points[-2], points[-1]
    change = (last - before) / before if before else math.nan
    improving = bool(last < before * (1.0 - tolerance))
  return dict(source=source, points=[list(p) for p in points], improving=improving,
              relative_change=change, tolerance=tolerance)


def logged_fid_trend(run: runs_lib.Run | None, tolerance: float) -> dict | None:
  """The trend of the run's own milestone FIDs (EMA, else raw), if it logged 2 or more."""
  if run is None:
    return None
  for key in (criteria.MILESTONE_FID, criteria.RAW_MILESTONE_FID):
    if run.has(key):
      steps, values = run.series(key)
      trend = quality_trend(zip(steps.tolist(), values.tolist()), f"`{key}` in metrics.jsonl",
                            tolerance)
      if trend["improving"] is not None:
        return trend
  return None


def ema_evidence(step: int, decay: float, warmup: bool, quality: dict[str, float],
                 quality_name: str, thresholds: Thresholds) -> dict:
  """The EMA's initialisation weight at `step` and the reference's yardstick per params."""
  init_weight = float(yardsticks.ema_init_weight([step], decay, warmup)[0])
  raw, ema = quality.get("raw"), quality.get("ema")
  raw_better = None
  if raw is not None and ema is not None:
    raw_better = bool(raw < ema * (1.0 - thresholds.quality_tolerance))
  return dict(step=step, decay=decay, warmup=warmup, init_weight=init_weight,
              quality=quality, quality_name=quality_name, raw_better=raw_better,
              dominated=bool(init_weight > thresholds.ema_init_weight_max and raw_better))


def _names(rows: Sequence[dict]) -> str:
  return ", ".join(f"{r['label']} [{r['params']}]" for r in rows) or "none"


def weigh_evidence(rows: Sequence[dict], trend: dict | None, ema: dict | None) -> dict:
  """The verdict (module docstring) and the findings behind it, as sentences.

  `rows` carry `vs_reference` (compare_to_reference); `trend` is a quality_trend, `ema` an
  ema_evidence, each None where unknown.
  """
  correct = [r for r in rows if r["respacing"] == "respaced"]
  worse = [r for r in rows if r.get("vs_reference") and r["vs_reference"]["worse"]]
  worse_audited = [r for r in worse if r["role"] == "audited"]
  striding = [r for r in worse_audited if r["respacing"] == "none"]
  improving = trend["improving"] if trend else None

  findings = []
  for r in worse:
    findings.append(f"{r['label']} [{r['params']}] is worse than the reference on the same "
                    f"x_T: {'; '.join(r['vs_reference']['reasons'])}.")
  controls = [r for r in rows if r["respacing"] == "none" and r["role"] == "control"]
  if controls and all(r in worse for r in controls) and not worse_audited:
    findings.append("The stride control is worse than the reference and the run's samplers "
                    "are not: that is what a sampler that strides the original βs without "
                    "recomputing them does to this network.")
  with_symptoms = [r for r in rows if r["symptoms"]]
  if with_symptoms:
    findings.append("Against the data: " + "; ".join(
        f"{r['label']} [{r['params']}] {', '.join(r['symptoms'])}" for r in with_symptoms)
        + ".")
  if trend:
    values = ", ".join(f"{s}: {v:.4g}" for s, v in trend["points"])
    reading = {True: "still improves", False: "no longer improves",
               None: "unknown (fewer than two evaluations)"}[improving]
    findings.append(f"Quality over training ({trend['source']}; lower is better): {values}: "
                    f"{reading} (tolerance {trend['tolerance']:.0%}).")
  if ema:
    q = ", ".join(f"{p} {v:.4g}" for p, v in ema["quality"].items())
    findings.append(f"EMA at step {ema['step']} (decay {ema['decay']}, "
                    f"{'with' if ema['warmup'] else 'no'} warm-up): {ema['init_weight']:.1%} "
                    f"of it is the initialisation; reference {ema['quality_name']}: {q}.")

  costly = [r for r in worse_audited if r["respacing"] != "none"]
  cost = (f"; {_names(costly)} {'is' if len(costly) == 1 else 'are'} respaced correctly but "
          "worse than the reference: the step count, not a respacing bug, costs quality on "
          "this network" if costly else "")
  if striding:
    answer = VERDICT_STRIDE
    text = (f"{VERDICT_STRIDE}: {_names(striding)} {'is' if len(striding) == 1 else 'are'} "
            "worse than the reference sampler on the same x_T and strides the original betas "
            "without recomputing them: each step removes one original step's worth of noise, "
            "so noise is left in the samples.")
  elif ema and ema["dominated"]:
    answer = VERDICT_EMA
    text = (f"{VERDICT_EMA}: {ema['init_weight']:.1%} of the EMA parameters is still the "
            f"initialisation at step {ema['step']}, and the raw parameters are better "
            f"({ema['quality_name']} {ema['quality']['raw']:.4g} against "
            f"{ema['quality']['ema']:.4g}){cost}.")
  elif improving:
    answer = "under-trained"
    clean = [r for r in correct if not r["symptoms"]]
    if not clean:
      text = (f"{VERDICT_UNDERTRAINED}: every correctly respaced sampler, the reference "
              "included, shows a symptom against the data, the run's samplers show no "
              f"striding defect, and quality still improves{cost}.")
    else:
      text = ("under-trained: quality still improves with steps and the run's samplers show "
              f"no striding defect ({_names(clean)} show no symptom against the data){cost}.")
  else:
    answer = VERDICT_NONE
    reading = {False: "quality no longer improves with steps",
               None: "whether quality still improves is unknown"}[improving]
    text = (f"{VERDICT_NONE}: the run's samplers show no striding defect and {reading}{cost}.")
  return dict(answer=answer, text=text, findings=findings,
              worse_than_reference=[f"{r['params']}/{r['name']}" for r in worse],
              reproducing=[r["name"] for r in rows if len(r["symptoms"]) == len(SYMPTOMS)],
              with_symptoms=sorted({r["name"] for r in rows if r["symptoms"]}))


# ----------------------------------------------------------------------------------------------
# The audit.
# ----------------------------------------------------------------------------------------------

# The quality trend from checkpoints uses at most this many of the newest ones (each costs a
# reference-sampler run per parameter set).
MAX_TREND_CHECKPOINTS = 4


def data_subset(images: np.ndarray, limit: int = MAX_DATA_IMAGES) -> np.ndarray:
  """At most `limit` images spread evenly over the set (deterministic)."""
  if images.shape[0] <= limit:
    return images
  return images[np.linspace(0, images.shape[0] - 1, limit).round().astype(int)]


def _check_counts(num_samples: int, batch_size: int | None, ddpm_nfe: int, ddim_nfe: int,
                  params: str) -> None:
  for flag, nfe in (("--nfe", ddpm_nfe), ("--ddim-nfe", ddim_nfe)):
    if nfe < 2:
      raise AuditError(f"{flag} must be >= 2 (a linspace sampler keeps t=0 and t=T-1), got "
                       f"{nfe}")
  if num_samples < 2:
    # The yardstick (FID or pixel FD) fits a Gaussian: it needs two samples at least.
    raise AuditError(f"--num-samples must be >= 2, got {num_samples}")
  if batch_size is not None and batch_size < 1:
    raise AuditError(f"--batch-size must be >= 1, got {batch_size}")
  if params not in PARAMS_CHOICES:
    raise AuditError(f"--params must be one of {', '.join(PARAMS_CHOICES)}, got {params!r}")


@dataclasses.dataclass
class _Inputs:
  """Everything the audit reads from a run, checked before anything is sampled."""
  config: Any
  model: Any
  checkpoints: _Checkpoints
  state: Any
  step: int
  run: runs_lib.Run | None
  data_images: np.ndarray
  weights_path: str | None
  stats_path: str | None
  warnings: list[str]


def _read_metrics(run_dir: pathlib.Path) -> tuple[runs_lib.Run | None, list[str]]:
  try:
    return runs_lib.load_run(run_dir), []
  except runs_lib.RunFormatError as e:
    return None, [f"{e}; the quality trend comes from the checkpoints instead"]


def _read_inputs(run_dir: pathlib.Path, inception_weights: str | None,
                 reference_stats: str | None, use_fid: bool) -> _Inputs:
  """The run's config, checkpoints, metrics and data, and the FID files; cheap checks first."""
  config, warnings = load_config(run_dir)
  weights_path = find_inception_weights(inception_weights, config) if use_fid else None
  stats_path = find_reference_stats(reference_stats, config) if weights_path else None
  model, template = _state_template(config)
  ckpts, state, step, restore_warnings = open_checkpoints(run_dir, template)
  run, metric_warnings = _read_metrics(run_dir)
  try:
    images = data_lib.load_images(config.data)
  except BaseException:
    ckpts.close()
    raise
  return _Inputs(config, model, ckpts, state, step, run, images, weights_path, stats_path,
                 warnings + restore_warnings + metric_warnings)


def _with_reference(configurations: Sequence[SamplerConfig],
                    num_timesteps: int) -> tuple[SamplerConfig, ...]:
  if any(c.role == "reference" for c in configurations):
    return tuple(configurations)
  return (*configurations, reference_configuration(num_timesteps))


def _params_of(state, which: str):
  return state.ema_params if which == "ema" else state.params


def checkpoint_trend(inputs: _Inputs, draw: Callable, param_sets: Sequence[str], rng,
                     num_samples: int, latest: dict[str, float], quality: Callable,
                     quality_name: str, tolerance: float) -> dict:
  """The reference sampler's yardstick at the newest kept checkpoints, per parameter set.

  Improving when either parameter set still improves: the network, averaged or not, is still
  getting better with steps. `latest` holds the values at the audited step.
  """
  older = [s for s in inputs.checkpoints.steps() if s < inputs.step]
  older = older[-(MAX_TREND_CHECKPOINTS - 1):]
  points = {p: [(inputs.step, latest[p])] for p in param_sets}
  for step in older:
    state = inputs.checkpoints.restore(step)
    if state is None:
      inputs.warnings.append(f"the checkpoint at step {step} does not restore; the quality "
                             "trend leaves it out")
      continue
    for p in param_sets:
      points[p].append((step, quality(draw(_params_of(state, p), rng, num_samples))))
  by_params = {p: quality_trend(points[p], f"reference sampler's {quality_name}, {p} "
                                f"parameters, at the kept checkpoints", tolerance)
               for p in param_sets}
  chosen = next((t for t in by_params.values() if t["improving"]), by_params[param_sets[0]])
  return dict(chosen, by_params=by_params)


def run_audit(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
              num_samples: int = 500, batch_size: int | None = None, seed: int = 0,
              inception_weights: str | None = None, reference_stats: str | None = None,
              use_fid: bool = True, ddpm_nfe: int = 50, ddim_nfe: int = 20,
              params: str = "both", configurations: Sequence[SamplerConfig] | None = None,
              thresholds: Thresholds = Thresholds(), command: str | None = None) -> dict:
  """Samples, measures, weighs and writes the audit of one run; returns what audit.json holds.

  Args:
    run_dir: a run directory (config.json and checkpoints/; metrics.jsonl if there).
    out_dir: where the audit goes; default RUN_DIR/audit.
    num_samples: samples per configuration, drawn from the same x_T for every one.
    batch_size: samples per compiled batch; default min(num_samples, eval.sample_batch_size).
    seed: the noise: batch i of every configuration uses fold_in(PRNGKey(seed), i).
    inception_weights: an Inception weights file; default the run's, else a cached copy,
      else no FID (the yardstick is then pixel_fd).
    reference_stats: an .npz with the data's mu/sigma; default the run's, else computed.
    use_fid: False skips FID even when weights are found.
    ddpm_nfe: steps of the two DDPM-50 controls (capped at T).
    ddim_nfe: steps of the DDIM-20 control (capped at T).
    params: "ema", "raw" or "both": which parameters every configuration samples with.
    configurations: replaces `default_configurations(config, ddpm_nfe, ddim_nfe)`; the
      reference is added when none has that role.
    thresholds: where statistics become symptoms, defects and findings.
    command: the command line, for the report.

  Raises:
    errors.UserError: an input cannot be used (AuditError for the run's own files); raised
      before anything is sampled or written.
  """
  run_dir = pathlib.Path(run_dir)
  out_dir = pathlib.Path(out_dir) if out_dir is not None else run_dir / AUDIT_DIR
  _check_counts(num_samples, batch_size, ddpm_nfe, ddim_nfe, params)
  inputs = _read_inputs(run_dir, inception_weights, reference_stats, use_fid)
  try:
    return _audit(inputs, run_dir, out_dir, num_samples, batch_size, seed, params,
                  configurations, thresholds, ddpm_nfe, ddim_nfe, command)
  finally:
    inputs.checkpoints.close()


def _audit(inputs: _Inputs, run_dir, out_dir, num_samples, batch_size, seed, params,
           configurations, thresholds, ddpm_nfe, ddim_nfe, command) -> dict:
  config = inputs.config
  t_count = config.diffusion.num_timesteps
  batch_size = batch_size or min(num_samples, config.eval.sample_batch_size)
  configurations = _with_reference(
      configurations or default_configurations(config, ddpm_nfe, ddim_nfe), t_count)
  param_sets = PARAMS if params == "both" else (params,)
  data = data_subset(inputs.data_images)
  data_stats = pixel_stats(data)
  if inputs.weights_path:
    quality = _load_fid(inputs.weights_path, inputs.stats_path, config, inputs.data_images,
                        min(config.fid.batch_size, num_samples))
    quality_name = "FID"
  else:
    quality, quality_name = (lambda images: pixel_fd(images, data)), "pixel FD"
  out_dir.mkdir(parents=True, exist_ok=True)
  # One key for every configuration: the samplers draw x_T from it, so all start alike.
  rng = jax.random.PRNGKey(seed)
  draws = {sc.name: _sampler(config, inputs.model, sc, batch_size) for sc in configurations}
  rows, grids = [], {DATA: grid_of(data)}
  for p in param_sets:
    for sc in configurations:
      start = time.monotonic()
      images = draws[sc.name](_params_of(inputs.state, p), rng, num_samples)
      row = measure(sc, p, images, data_stats, quality, quality_name, thresholds)
      row["sample_seconds"] = time.monotonic() - start
      rows.append(row)
      grids[f"{p}_{sc.name}"] = grid_of(images)
  compare_to_reference(rows, thresholds)
  reference = next(sc for sc in configurations if sc.role == "reference")
  latest = {r["params"]: r["quality"] for r in rows if r["role"] == "reference"}
  trend = logged_fid_trend(inputs.run, thresholds.quality_tolerance) or checkpoint_trend(
      inputs, draws[reference.name], param_sets, rng, num_samples, latest, quality,
      quality_name, thresholds.quality_tolerance)
  decay = float(config.train.ema_decay)
  warmup = bool(config.train.get("ema_warmup", False))
  ema = ema_evidence(inputs.step, decay, warmup, latest, quality_name, thresholds)
  result = dict(
      run_dir=str(run_dir), step=inputs.step, name=config.name, num_timesteps=t_count,
      num_samples=num_samples, batch_size=batch_size, seed=seed, params=list(param_sets),
      fixed_eval=FIXED_EVAL, run_eval=_run_eval(config),
      fid=dict(weights=inputs.weights_path, reference_stats=inputs.stats_path or (
          "computed from the run's data" if inputs.weights_path else None)),
      quality=dict(name=quality_name, num_data_images=int(len(data))),
      thresholds=dataclasses.asdict(thresholds),
      data=dict(stats=data_stats, num_images=int(len(data)), grid=f"grid_{DATA}.png"),
      configurations=rows, trend=trend, ema=ema,
      verdict=weigh_evidence(rows, trend, ema), figure=FIGURE_FILE,
      warnings=inputs.warnings, command=command)
  write_outputs(result, grids, out_dir)
  return result


def _run_eval(config) -> dict:
  """The run's own FID sampler settings, for the report."""
  e = config.eval
  return dict(sampler=e.sampler, nfe=e.nfe, eta=e.eta, respacing=e.respacing,
              variance=e.variance, clip_x0=e.clip_x0, spacing=e.spacing)


def write_outputs(result: dict, grids: dict[str, np.ndarray], out_dir: pathlib.Path) -> None:
  """The grids, the side-by-side figure, audit.md and audit.json."""
  for name, grid in grids.items():
    io.save_png(str(out_dir / f"grid_{name}.png"), grid)
  write_figure(result, grids, out_dir / FIGURE_FILE)
  (out_dir / REPORT_FILE).write_text(render_markdown(result), encoding="utf-8")
  (out_dir / JSON_FILE).write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False)
                                   + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
  """Plain JSON; non-finite floats become null."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  return value


def _num(x: float | None, fmt: str = ".3g") -> str:
  if x is None or not math.isfinite(x):
    return "n/a"
  return format(x, fmt)


def _title(row: dict | None, stats: dict) -> str:
  if row is None:
    return f"data\nsat {stats['saturated']:.1%}, HF {stats['hf_fraction']:.2f}\n(training images)"
  vs = row["vs_reference"]
  against = (f"x{_num(vs['quality_ratio'], '.2g')} ref" if vs else "reference")
  verdict = ("WORSE than ref" if vs and vs["worse"] else ", ".join(row["symptoms"])
             or "no symptoms")
  return (f"{row['label']}\nsat {stats['saturated']:.1%}, HF {stats['hf_fraction']:.2f}, "
          f"{row['quality_name']} {_num(row['quality'], '.3g')} ({against})\n{verdict}")


def write_figure(result: dict, grids: dict[str, np.ndarray], path: pathlib.Path) -> None:
  """Data and every configuration side by side, one row per parameter set (EMA, raw)."""
  params = result["params"]
  names = [r["name"] for r in result["configurations"] if r["params"] == params[0]]
  columns = 1 + len(names)
  fig = matplotlib.figure.Figure(figsize=(3.0 * columns, 3.6 * len(params) + 0.4), dpi=110)
  backend_agg.FigureCanvasAgg(fig)
  by_key = {(r["params"], r["name"]): r for r in result["configurations"]}
  for i, p in enumerate(params):
    panels = [(_title(None, result["data"]["stats"]), grids[DATA])]
    panels += [(_title(by_key[(p, n)], by_key[(p, n)]["stats"]), grids[f"{p}_{n}"])
               for n in names]
    for j, (title, grid) in enumerate(panels):
      ax = fig.add_subplot(len(params), columns, i * columns + j + 1)
      ax.imshow(grid, interpolation="nearest")
      ax.set_title(title, fontsize=7)
      ax.set_axis_off()
      if j == 1:
        ax.text(-0.08, 0.5, f"{p} parameters", transform=ax.transAxes, rotation=90,
                ha="right", va="center", fontsize=9)
  fig.suptitle(f"{result['name']} at step {result['step']}: the same x_T through every "
               "sampler, EMA and raw parameters", fontsize=10)
  fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.95))
  fig.savefig(path)


def _table(result: dict, params: str) -> list[str]:
  lines = [f"### {params} parameters", "",
           f"| configuration | role | NFE | {result['quality']['name']} | x ref | saturated | "
           "x ref | HF fraction | x data | x ref | levels | x data | symptoms (vs data) | "
           "worse than the reference |", "|" + "---|" * 14]
  d = result["data"]["stats"]
  lines.append(f"| data ({result['data']['num_images']} images) | | | | | {d['saturated']:.2%} "
               f"| | {d['hf_fraction']:.3f} | 1 | | {d['unique_levels']:.1f} | 1 | | |")
  for r in result["configurations"]:
    if r["params"] != params:
      continue
    s, rel, vs = r["stats"], r["relative"], r["vs_reference"] or {}
    worse = ("-" if not vs else ("**yes**: " + "; ".join(vs["reasons"]) if vs["worse"] else "no"))
    lines.append(
        f"| {r['label']} | {r['role']} | {r['nfe']} | {_num(r['quality'], '.4g')} | "
        f"{_num(vs.get('quality_ratio'))} | {s['saturated']:.2%} | "
        f"{_num(vs.get('saturated_ratio'))} | {s['hf_fraction']:.3f} | {_num(rel['hf_ratio'])} | "
        f"{_num(vs.get('hf_ratio'))} | {s['unique_levels']:.1f} | {_num(rel['levels_ratio'])} | "
        f"{', '.join(r['symptoms']) or '-'} | {worse} |")
  return lines + [""]


def _trend_lines(trend: dict | None) -> list[str]:
  if not trend:
    return ["No quality trend: the run logged fewer than two milestone FIDs and kept one "
            "checkpoint.", ""]
  lines = []
  for t in trend.get("by_params", {"": trend}).values():
    values = ", ".join(f"step {s}: {v:.4g}" for s, v in t["points"])
    reading = {True: "still improves", False: "does not improve", None: "unknown"}[t["improving"]]
    change = (f" (last change {t['relative_change']:+.1%})" if t["relative_change"] is not None
              else "")
    lines.append(f"- {t['source']}: {values}{change}: **{reading}**")
  return lines + [""]


def render_markdown(result: dict) -> str:
  t, v, e = result["thresholds"], result["verdict"], result["ema"]
  run_eval = ", ".join(f"{k}={val}" for k, val in result["run_eval"].items())
  fixed = ", ".join(f"{k}={val}" for k, val in result["fixed_eval"].items())
  fid = result["fid"]
  lines = [f"# Sampler audit: {result['name']}", ""]
  if result["command"]:
    lines += [f"Generated by `{result['command']}`.", ""]
  lines += [
      f"Run `{result['run_dir']}`, checkpoint at step {result['step']}, T = "
      f"{result['num_timesteps']}, {' and '.join(result['params'])} parameters. "
      f"{result['num_samples']} samples per configuration, all from the same x_T (seed "
      f"{result['seed']}); the reference and the controls use {fixed}. The run's own FID "
      f"sampler: {run_eval}.", "",
      "## Verdict", "", f"**{v['answer']}**", "", v["text"], "", "Evidence:", ""]
  lines += [f"- {f}" for f in v["findings"]]
  lines += ["", "## Samplers from the same x_T", "",
            f"Yardstick: **{result['quality']['name']}** against "
            f"{result['quality']['num_data_images']} training images (lower is better; " + (
                f"Inception weights `{fid['weights']}`, reference {fid['reference_stats']}; "
                f"with {result['num_samples']} samples it is biased upwards, so compare the "
                "rows with each other, not with 50k-sample FIDs)" if fid["weights"] else
                "no Inception weights given: the Frechet distance between the pixel values' "
                "Gaussians at <= 16x16, which has no absolute scale; pass "
                "--inception-weights FILE for FID)") + ". \"x ref\": the ratio to the "
            "reference's value with the same parameters.", ""]
  for p in result["params"]:
    lines += _table(result, p)
  lines += ["## Quality over training", ""] + _trend_lines(result["trend"])
  lines += ["## EMA against raw parameters", "",
            f"- Initialisation left in the EMA at step {e['step']}: {e['init_weight']:.2%} "
            f"(decay {e['decay']}, {'with' if e['warmup'] else 'no'} warm-up: the product of "
            "the decays).",
            "- Reference sampler's " + e["quality_name"] + ": " + ", ".join(
                f"{p} {val:.4g}" for p, val in e["quality"].items()) + "." + (
                "" if e["raw_better"] is None else
                f" Raw better by more than {t['quality_tolerance']:.0%}: "
                f"{'yes' if e['raw_better'] else 'no'}."), ""]
  lines += [
      "## Definitions and thresholds", "",
      "- **saturated**: fraction of channel values equal to 0 or 255. Symptom when above "
      f"{t['saturation_factor']:g}x the data's and above {t['saturation_min']:.0%}.",
      "- **HF fraction**: per image, the share of the grey image's spectral power (mean "
      f"removed) at radial frequencies above {HF_CUTOFF} cycles/pixel (half the Nyquist "
      "frequency), averaged over images; white noise has ~0.8. Symptom **speckle** when "
      f"above {t['hf_ratio_min']:g}x the data's.",
      "- **levels**: distinct values per image and channel, averaged. Symptom **posterized** "
      f"when below {t['levels_factor']:g}x the data's.",
      "- **worse than the reference** (same parameters, same x_T): the yardstick above "
      f"{t['worse_factor']:g}x the reference's, or saturated above both "
      f"{t['saturation_factor']:g}x the reference's and the reference's + "
      f"{t['saturation_min']:.0%}.",
      f"- **{VERDICT_STRIDE}**: one of the run's samplers is worse than the reference and "
      "strides the original betas (respacing=\"none\").",
      f"- **{VERDICT_EMA}**: more than {t['ema_init_weight_max']:.0%} of the EMA is the "
      "initialisation and the raw parameters' reference yardstick is lower by more than "
      f"{t['quality_tolerance']:.0%}.",
      f"- **under-trained**: none of the above, and the last quality value is lower than the "
      f"one before by more than {t['quality_tolerance']:.0%}; the text is \""
      f"{VERDICT_UNDERTRAINED}\" when every correctly respaced sampler shows a symptom "
      "against the data, else it names the ones that do not.",
      f"- **{VERDICT_NONE}**: none of the above.", "",
      "## Figures", "", f"![side by side]({result['figure']})", ""]
  lines += [f"- {r['label']} [{r['params']}]: [{r['grid']}]({r['grid']})"
            for r in result["configurations"]]
  lines += [f"- data: [{result['data']['grid']}]({result['data']['grid']})", ""]
  if result["warnings"]:
    lines += ["## Notes", ""] + [f"- {w}" for w in result["warnings"]] + [""]
  return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
  """What the CLI prints: one line per configuration and the verdict."""
  lines = []
  for r in result["configurations"]:
    vs = r["vs_reference"]
    against = ("reference" if vs is None else
               f"x{_num(vs['quality_ratio'])} the reference{' (WORSE)' if vs['worse'] else ''}")
    lines.append(f"{r['label']} [{r['params']}]: {r['quality_name']} {_num(r['quality'])} "
                 f"({against}), saturated {r['stats']['saturated']:.1%}, HF x"
                 f"{_num(r['relative']['hf_ratio'])} the data; symptoms: "
                 f"{', '.join(r['symptoms']) or 'none'}")
  lines.append(f"verdict: {result['verdict']['answer']}")
  return lines
