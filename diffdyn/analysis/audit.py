"""The sampler audit: does the sampler alone produce the seeds' saturated, speckled samples?

  python -m diffdyn.analysis audit RUN_DIR [--out DIR] [--num-samples N] ...

The audit restores the run's latest EMA parameters and draws samples from the same x_T with
several sampler configurations (`default_configurations`): DDPM-50 on the respaced
schedule, DDPM-50 with the original per-step constants (`respacing="none"`, the ablation
that mimics a sampler which strides the βs without recomputing them), DDIM-20 and the full
T-step DDPM chain, which needs no respacing at all. For each it measures the pixel
statistics below, FID when Inception weights are available, and writes a grid. The same
statistics of the run's own training images are the yardstick.

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

Symptoms (`Thresholds` holds the numbers; the report states them):
  saturated: saturated > saturation_factor x the data's and > saturation_min.
  speckle: hf_ratio > hf_ratio_min.
  posterized: unique_levels < levels_factor x the data's.
A configuration reproduces the seeds' symptoms when it shows all three.

No training math lives here: sampling is `evaluate.get_sample_fn`/`sample_images`, FID
is `diffdyn.fid`. Nothing is written into the run directory except under the output
directory (default RUN_DIR/audit).
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
from typing import Any, Sequence

import jax
import matplotlib.backends.backend_agg as backend_agg
import matplotlib.figure
import ml_collections
import numpy as np

from diffdyn import config as config_lib
from diffdyn import data as data_lib
from diffdyn import errors
from diffdyn import evaluate
from diffdyn import io
from diffdyn import models
from diffdyn import train as train_lib

CONFIG_FILE = io.CONFIG_FILE
CHECKPOINTS_DIR = "checkpoints"
AUDIT_DIR = "audit"
REPORT_FILE = "audit.md"
JSON_FILE = "audit.json"
FIGURE_FILE = "side_by_side.png"
DATA = "data"
SYMPTOMS = ("saturated", "speckle", "posterized")
# The sampler settings every configuration shares, whatever the run's eval config says, so
# that audits of different runs compare: the small posterior variance and clipped x0.
FIXED_EVAL = dict(clip_x0=True, variance="small", spacing="linspace")
# Enough data images for population-level statistics; more only costs time.
MAX_DATA_IMAGES = 5000
# Half the Nyquist frequency (0.5 cycles/pixel): the high-frequency band's lower edge.
HF_CUTOFF = 0.25
# Grids show at most this many images.
GRID_IMAGES = 64


class AuditError(errors.UserError):
  """The run directory or an input file cannot be used; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """One sampler configuration of the audit (arguments of `evaluate.get_sample_fn`)."""
  name: str
  label: str
  sampler: str
  nfe: int
  eta: float
  respacing: str


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Where a statistic becomes one of the seeds' symptoms (see the module docstring)."""
  saturation_factor: float = 3.0
  saturation_min: float = 0.05
  hf_ratio_min: float = 2.0
  levels_factor: float = 0.5


def default_configurations(num_timesteps: int, ddpm_nfe: int = 50,
                           ddim_nfe: int = 20) -> tuple[SamplerConfig, ...]:
  """DDPM-50 respaced and not, DDIM-20 and DDPM over all T steps (NFEs capped at T)."""
  ddpm_nfe, ddim_nfe = min(ddpm_nfe, num_timesteps), min(ddim_nfe, num_timesteps)
  return (
      SamplerConfig("ddpm_respaced", f"DDPM-{ddpm_nfe} respaced", "ddpm", ddpm_nfe, 1.0,
                    "respaced"),
      SamplerConfig("ddpm_none", f"DDPM-{ddpm_nfe} respacing=none", "ddpm", ddpm_nfe, 1.0,
                    "none"),
      SamplerConfig("ddim", f"DDIM-{ddim_nfe} (eta=0)", "ddim", ddim_nfe, 0.0, "respaced"),
      SamplerConfig("ddpm_all", f"DDPM-{num_timesteps} (all steps)", "ddpm", num_timesteps,
                    1.0, "respaced"),
  )


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


@contextlib.contextmanager
def _quiet_absl():
  """Orbax's warnings (through absl's logger) off: it warns that read-only is read-only."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _restore_newest(directory: pathlib.Path,
                    template) -> tuple[Any, int, list[int], list[tuple[int, str]]]:
  """(state or None, its step, every step, (step, why) of newer ones), touching no file.

  Read-only, since an audit must leave the run as it found it: no temporary directory
  cleaned, no damaged checkpoint moved aside.
  """
  with _quiet_absl():
    ckpts = io.Checkpoints(str(directory), read_only=True)
    try:
      steps = ckpts.steps()
      restored = ckpts.restore_latest(template)
    finally:
      ckpts.close()
  if restored is None:
    return None, -1, steps, ckpts.restore_failures
  state, _, step = restored
  return state, step, steps, ckpts.restore_failures


def restore_ema_params(run_dir: pathlib.Path, config, model) -> tuple[Any, int, list[str]]:
  """(EMA params, step, warnings) of the newest checkpoint that restores."""
  directory = run_dir / CHECKPOINTS_DIR
  if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
    raise AuditError(f"{directory}: no checkpoint; train the run first (python launch.py "
                     f"--config ... --workdir {run_dir}), or pass another run directory")
  tx = train_lib.make_optimizer(config.train)
  template = jax.eval_shape(lambda: train_lib.create_train_state(config, model, tx))
  state, step, steps, failures = _restore_newest(directory, template)
  if not steps:
    raise AuditError(f"{directory}: no complete checkpoint; train the run first, or pass "
                     "another run directory")
  if state is None:
    earlier = {1: "", 2: ", nor does the one before it"}.get(
        len(steps), f", nor do the {len(steps) - 1} before it")
    raise AuditError(f"{directory / str(steps[-1])}: the checkpoint does not restore{earlier} "
                     f"({failures[0][1]}); it is damaged or was written with another config; "
                     "re-run the training to write a new one")
  warnings = [f"the checkpoint at step {failed} does not restore ({why}); audited the one at "
              f"step {step}" for failed, why in failures]
  return state.ema_params, step, warnings


# ----------------------------------------------------------------------------------------------
# FID.
# ----------------------------------------------------------------------------------------------


def find_inception_weights(given: str | None, config) -> str | None:
  """The weights file to use: the flag, else the run's, else a cached copy; None: no FID.

  Never downloads: an audit without weights still answers from pixel statistics.
  """
  from diffdyn.fid import weights  # pylint: disable=import-outside-toplevel
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
    from diffdyn import fid  # pylint: disable=import-outside-toplevel
    features = fid.inception_features(self.params, images, batch_size=self.batch_size)
    mu, sigma = fid.feature_stats(features)
    return fid.frechet_distance(mu, sigma, self.reference["mu"], self.reference["sigma"])


def _load_fid(weights_path: str, stats_path: str | None, config, data_images: np.ndarray,
              batch_size: int) -> _Fid:
  from diffdyn import fid  # pylint: disable=import-outside-toplevel
  params = fid.load_inception(weights_path)
  if stats_path:
    reference = fid.load_stats(stats_path)
  else:
    reference = fid.reference_stats(params, data_images,
                                    cache_dir=config.fid.cache_dir or io.default_cache_dir(),
                                    batch_size=config.fid.batch_size)
  return _Fid(params, reference, batch_size)


# ----------------------------------------------------------------------------------------------
# The audit.
# ----------------------------------------------------------------------------------------------


def _audit_config(config) -> ml_collections.ConfigDict:
  """The run's config with FIXED_EVAL in place of its own sampler settings."""
  audit = ml_collections.ConfigDict(config.to_dict())
  audit.eval.update(FIXED_EVAL)
  return audit


def data_subset(images: np.ndarray, limit: int = MAX_DATA_IMAGES) -> np.ndarray:
  """At most `limit` images spread evenly over the set (deterministic)."""
  if images.shape[0] <= limit:
    return images
  return images[np.linspace(0, images.shape[0] - 1, limit).round().astype(int)]


def _check_counts(num_samples: int, batch_size: int | None, with_fid: bool, ddpm_nfe: int,
                  ddim_nfe: int) -> None:
  for flag, nfe in (("--nfe", ddpm_nfe), ("--ddim-nfe", ddim_nfe)):
    if nfe < 2:
      raise AuditError(f"{flag} must be >= 2 (a linspace sampler keeps t=0 and t=T-1), got "
                       f"{nfe}")
  if num_samples < 1:
    raise AuditError(f"--num-samples must be >= 1, got {num_samples}")
  if with_fid and num_samples < 2:
    raise AuditError(f"FID needs --num-samples >= 2, got {num_samples}; or pass --no-fid")
  if batch_size is not None and batch_size < 1:
    raise AuditError(f"--batch-size must be >= 1, got {batch_size}")


@dataclasses.dataclass
class _Inputs:
  """Everything the audit reads from a run, checked before anything is sampled."""
  config: Any
  model: Any
  ema_params: Any
  step: int
  data_images: np.ndarray
  weights_path: str | None
  stats_path: str | None
  warnings: list[str]


def _read_inputs(run_dir: pathlib.Path, inception_weights: str | None,
                 reference_stats: str | None, use_fid: bool) -> _Inputs:
  """The run's config, EMA parameters and data, and the FID files; cheap checks first."""
  config, warnings = load_config(run_dir)
  weights_path = find_inception_weights(inception_weights, config) if use_fid else None
  stats_path = find_reference_stats(reference_stats, config) if weights_path else None
  model = models.get_model(config.model, train_lib.compute_dtype(config))
  ema_params, step, restore_warnings = restore_ema_params(run_dir, config, model)
  return _Inputs(config, model, ema_params, step, data_lib.load_images(config.data),
                 weights_path, stats_path, warnings + restore_warnings)


def _sample_and_measure(sc: SamplerConfig, inputs: _Inputs, rng, num_samples: int,
                        batch_size: int, data_stats: dict, thresholds: Thresholds,
                        fid_fn) -> tuple[dict, np.ndarray]:
  """(the configuration's row of audit.json, its samples)."""
  start = time.monotonic()
  sample_fn = evaluate.get_sample_fn(_audit_config(inputs.config), inputs.model,
                                     train_lib.make_schedule(inputs.config),
                                     sampler=sc.sampler, nfe=sc.nfe, eta=sc.eta,
                                     batch_size=batch_size, respacing=sc.respacing)
  images = evaluate.sample_images(sample_fn, inputs.ema_params, rng, num_samples, batch_size)
  seconds = time.monotonic() - start
  stats = pixel_stats(images)
  row = dict(dataclasses.asdict(sc), stats=stats, relative=relative_stats(stats, data_stats),
             symptoms=symptoms(stats, data_stats, thresholds),
             fid=fid_fn(images) if fid_fn else None, grid=f"grid_{sc.name}.png",
             sample_seconds=seconds)
  return row, images


def _run_eval(config) -> dict:
  """The run's own FID sampler settings, for the report."""
  e = config.eval
  return dict(sampler=e.sampler, nfe=e.nfe, eta=e.eta, respacing=e.respacing,
              variance=e.variance, clip_x0=e.clip_x0, spacing=e.spacing)


def run_audit(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
              num_samples: int = 500, batch_size: int | None = None, seed: int = 0,
              inception_weights: str | None = None, reference_stats: str | None = None,
              use_fid: bool = True, ddpm_nfe: int = 50, ddim_nfe: int = 20,
              configurations: Sequence[SamplerConfig] | None = None,
              thresholds: Thresholds = Thresholds(), command: str | None = None) -> dict:
  """Samples, measures and writes the audit of one run; returns what audit.json holds.

  Args:
    run_dir: a run directory (config.json and checkpoints/).
    out_dir: where the audit goes; default RUN_DIR/audit.
    num_samples: samples per configuration, drawn from the same x_T for every one.
    batch_size: samples per compiled batch; default min(num_samples, eval.sample_batch_size).
    seed: the noise: batch i of every configuration uses fold_in(PRNGKey(seed), i).
    inception_weights: an Inception weights file; default the run's, else a cached copy,
      else no FID.
    reference_stats: an .npz with the data's mu/sigma; default the run's, else computed.
    use_fid: False skips FID even when weights are found.
    ddpm_nfe: steps of the two DDPM-50 configurations (capped at T).
    ddim_nfe: steps of the DDIM-20 configuration (capped at T).
    configurations: replaces `default_configurations(T, ddpm_nfe, ddim_nfe)`.
    thresholds: where statistics become symptoms.
    command: the command line, for the report.

  Raises:
    errors.UserError: an input cannot be used (AuditError for the run's own files); raised
      before anything is sampled or written.
  """
  run_dir = pathlib.Path(run_dir)
  out_dir = pathlib.Path(out_dir) if out_dir is not None else run_dir / AUDIT_DIR
  _check_counts(num_samples, batch_size, use_fid, ddpm_nfe, ddim_nfe)
  inputs = _read_inputs(run_dir, inception_weights, reference_stats, use_fid)
  config = inputs.config
  out_dir.mkdir(parents=True, exist_ok=True)
  batch_size = batch_size or min(num_samples, config.eval.sample_batch_size)
  configurations = tuple(configurations or default_configurations(
      config.diffusion.num_timesteps, ddpm_nfe, ddim_nfe))
  data_stats = pixel_stats(data_subset(inputs.data_images))
  fid_fn = None
  if inputs.weights_path:
    fid_fn = _load_fid(inputs.weights_path, inputs.stats_path, config, inputs.data_images,
                       min(config.fid.batch_size, num_samples))
  # One key for every configuration: the samplers draw x_T from it, so all start alike.
  rng = jax.random.PRNGKey(seed)
  rows, grids = [], {DATA: io.image_grid(inputs.data_images[:min(num_samples, GRID_IMAGES)])}
  for sc in configurations:
    row, images = _sample_and_measure(sc, inputs, rng, num_samples, batch_size, data_stats,
                                      thresholds, fid_fn)
    rows.append(row)
    grids[sc.name] = io.image_grid(images[:GRID_IMAGES])
  result = dict(
      run_dir=str(run_dir), step=inputs.step, name=config.name,
      num_timesteps=config.diffusion.num_timesteps, num_samples=num_samples,
      batch_size=batch_size, seed=seed, fixed_eval=FIXED_EVAL, run_eval=_run_eval(config),
      fid=dict(weights=inputs.weights_path, reference_stats=inputs.stats_path or (
          "computed from the run's data" if inputs.weights_path else None)),
      thresholds=dataclasses.asdict(thresholds),
      data=dict(stats=data_stats, num_images=int(min(len(inputs.data_images), MAX_DATA_IMAGES)),
                grid=f"grid_{DATA}.png"),
      configurations=rows, verdict=verdict(rows), figure=FIGURE_FILE,
      warnings=inputs.warnings, command=command)
  write_outputs(result, grids, out_dir)
  return result


def write_outputs(result: dict, grids: dict[str, np.ndarray], out_dir: pathlib.Path) -> None:
  """The grids, the side-by-side figure, audit.md and audit.json."""
  for name, grid in grids.items():
    io.save_png(str(out_dir / f"grid_{name}.png"), grid)
  write_figure(result, grids, out_dir / FIGURE_FILE)
  (out_dir / REPORT_FILE).write_text(render_markdown(result), encoding="utf-8")
  (out_dir / JSON_FILE).write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False)
                                   + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# The verdict: is it the sampler?
# ----------------------------------------------------------------------------------------------


def _names(rows: Sequence[dict]) -> str:
  return ", ".join(r["label"] for r in rows) or "none"


def _symptom_summary(full: Sequence[dict], some: Sequence[dict],
                     clean: Sequence[dict]) -> str:
  parts = [f"{_names(full)} reproduce{'s' if len(full) == 1 else ''} all three symptoms"
           if full else "No configuration shows all three symptoms"]
  parts += [f"{r['label']} shows {', '.join(r['symptoms'])}" for r in some]
  if clean:
    parts.append(f"{_names(clean)} show{'s' if len(clean) == 1 else ''} none")
  return "; ".join(parts) + "."


def verdict(rows: Sequence[dict]) -> dict:
  """Which configurations reproduce the symptoms, and the answer to "is it the sampler?"."""
  full = [r for r in rows if len(r["symptoms"]) == len(SYMPTOMS)]
  some = [r for r in rows if r["symptoms"] and r not in full]
  clean = [r for r in rows if not r["symptoms"]]
  correct = [r for r in rows if r["respacing"] == "respaced"]
  ablation = [r for r in rows if r["respacing"] == "none"]
  bad_correct = [r for r in correct if r["symptoms"]]
  bad_ablation = [r for r in ablation if r["symptoms"]]

  lines = [_symptom_summary(full, some, clean)]
  if bad_ablation and correct and not bad_correct:
    answer = "yes"
    lines.append(
        "Only the sampler that strides the original betas without recomputing them "
        "(respacing=\"none\") shows them; the respaced samplers on the same noise do not. "
        "Such a sampler treats each of its steps as one original step, so it removes one "
        "step's worth of noise where it should remove many, and much of the noise is still "
        "in the sample when the last step clips it to [-1, 1]. If the seeds' harness samples "
        "this way, that alone explains their grids and their FID; fix the sampler before "
        "reading FID.")
  elif correct and len(bad_correct) == len(correct):
    answer = "no"
    lines.append(
        "Every correctly respaced sampler shows symptoms too, the full chain over all "
        "timesteps included (it needs no respacing), so the sampler is not their cause; "
        "look at the network and its training.")
  elif not full and not some:
    answer = "no symptoms"
    lines.append("No configuration shows the seeds' symptoms for this checkpoint, so the "
                 "sampler cannot be blamed for them here.")
  else:
    answer = "partly"
    lines.append(
        f"Some correctly respaced samplers show symptoms ({_names(bad_correct)}) and others "
        f"do not ({_names([r for r in correct if not r['symptoms']])}): the choice of "
        "sampler (steps, DDPM noise vs deterministic DDIM) matters for this network, but "
        "no single sampler bug explains the seeds' grids.")
  fids = [(r["fid"], r["label"]) for r in rows if r.get("fid") is not None]
  if fids:
    lines.append("FID: " + ", ".join(f"{label} {value:.1f}" for value, label in fids) + ".")
  return dict(answer=answer, reproducing=[r["name"] for r in full],
              with_symptoms=[r["name"] for r in rows if r["symptoms"]], text=" ".join(lines))


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
  if isinstance(value, np.integer):
    return int(value)
  return value


def _num(x: float | None, fmt: str = ".3g") -> str:
  if x is None or not math.isfinite(x):
    return "n/a"
  return format(x, fmt)


def _title(label: str, stats: dict, relative: dict | None, found: Sequence[str] | None,
           fid: float | None) -> str:
  hf = f"HF {stats['hf_fraction']:.2f}"
  if relative is not None:
    hf += f" (x{_num(relative['hf_ratio'], '.2g')})"
  numbers = f"sat {stats['saturated']:.1%}, {hf}" + (f", FID {fid:.1f}" if fid is not None
                                                      else "")
  if found is None:
    return f"{label}\n{numbers}\n(training images)"
  return f"{label}\n{numbers}\n{', '.join(found) or 'no symptoms'}"


def write_figure(result: dict, grids: dict[str, np.ndarray], path: pathlib.Path) -> None:
  """The data's grid and every configuration's, side by side, with their key statistics."""
  panels = [(_title("data", result["data"]["stats"], None, None, None), grids[DATA])]
  panels += [(_title(r["label"], r["stats"], r["relative"], r["symptoms"], r["fid"]),
              grids[r["name"]]) for r in result["configurations"]]
  fig = matplotlib.figure.Figure(figsize=(2.8 * len(panels), 3.7), dpi=130)
  backend_agg.FigureCanvasAgg(fig)
  for i, (title, grid) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
  fig.suptitle(f"{result['name']} at step {result['step']}: the same x_T through every "
               "sampler", fontsize=10)
  # Leaves the top strip to the suptitle, which tight_layout would otherwise overlap.
  fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.9))
  fig.savefig(path)


def _table(result: dict) -> list[str]:
  lines = ["| configuration | NFE | FID | saturated | x data | HF fraction | x data | "
           "levels | x data | mean | std | symptoms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  d = result["data"]["stats"]
  lines.append(f"| data ({result['data']['num_images']} images) | | | {d['saturated']:.2%} | 1 | "
               f"{d['hf_fraction']:.3f} | 1 | {d['unique_levels']:.1f} | 1 | {d['mean']:.1f} | "
               f"{d['std']:.1f} | |")
  for r in result["configurations"]:
    s, rel = r["stats"], r["relative"]
    lines.append(
        f"| {r['label']} | {r['nfe']} | {_num(r['fid'], '.1f')} | {s['saturated']:.2%} | "
        f"{_num(rel['saturated_ratio'])} | {s['hf_fraction']:.3f} | {_num(rel['hf_ratio'])} | "
        f"{s['unique_levels']:.1f} | {_num(rel['levels_ratio'])} | {s['mean']:.1f} | "
        f"{s['std']:.1f} | {', '.join(r['symptoms']) or '-'} |")
  return lines


def render_markdown(result: dict) -> str:
  t, v = result["thresholds"], result["verdict"]
  run_eval = ", ".join(f"{k}={val}" for k, val in result["run_eval"].items())
  fixed = ", ".join(f"{k}={val}" for k, val in result["fixed_eval"].items())
  fid = result["fid"]
  lines = [f"# Sampler audit: {result['name']}", ""]
  if result["command"]:
    lines += [f"Generated by `{result['command']}`.", ""]
  lines += [
      f"Run `{result['run_dir']}`, EMA parameters at step {result['step']}, T = "
      f"{result['num_timesteps']}. {result['num_samples']} samples per configuration, all "
      f"from the same x_T (seed {result['seed']}); every configuration uses {fixed}. The "
      f"run's own FID sampler: {run_eval}.", "",
      "## Is it the sampler?", "", f"**{v['answer']}**. {v['text']}", "",
      "## Measurements", ""]
  lines += _table(result)
  lines += [
      "", "FID: " + (f"weights `{fid['weights']}`, reference {fid['reference_stats']}; with "
                     f"{result['num_samples']} samples it is biased upwards, so compare the "
                     "configurations with each other, not with 50k-sample FIDs."
                     if fid["weights"] else "not measured (no Inception weights; pass "
                     "--inception-weights FILE)."),
      "", "## Definitions and thresholds", "",
      "- **saturated**: fraction of channel values equal to 0 or 255. Symptom when above "
      f"{t['saturation_factor']:g}x the data's and above {t['saturation_min']:.0%}.",
      "- **HF fraction**: per image, the share of the grey image's spectral power (mean "
      f"removed) at radial frequencies above {HF_CUTOFF} cycles/pixel (half the Nyquist "
      "frequency), averaged over images; white noise has ~0.8. Symptom **speckle** when "
      f"above {t['hf_ratio_min']:g}x the data's.",
      "- **levels**: distinct values per image and channel, averaged. Symptom **posterized** "
      f"when below {t['levels_factor']:g}x the data's.",
      "- A configuration **reproduces the seeds' symptoms** when it shows all three.", "",
      "## Figures", "", f"![side by side]({result['figure']})", ""]
  lines += [f"- {r['label']}: [{r['grid']}]({r['grid']})" for r in result["configurations"]]
  lines += [f"- data: [{result['data']['grid']}]({result['data']['grid']})", ""]
  if result["warnings"]:
    lines += ["## Notes", ""] + [f"- {w}" for w in result["warnings"]] + [""]
  return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
  """What the CLI prints: one line per configuration and the answer."""
  lines = []
  for r in result["configurations"]:
    fid = f", FID {r['fid']:.1f}" if r["fid"] is not None else ""
    lines.append(f"{r['label']}: saturated {r['stats']['saturated']:.1%}, HF x"
                 f"{_num(r['relative']['hf_ratio'])}, levels x"
                 f"{_num(r['relative']['levels_ratio'])}{fid}; symptoms: "
                 f"{', '.join(r['symptoms']) or 'none'}")
  lines.append(f"is it the sampler? {result['verdict']['answer']}")
  return lines
