"""Config validation: every key, type and value is checked before anything compiles.

The schema is `diffdyn/configs/default.py` itself: a key it does not define is unknown, and each
value must have the type of the base value. Value rules below then name the allowed values,
so every mistake becomes one line that says which key is wrong and what it may be.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable

import ml_collections

from diffdyn import diffusion
from diffdyn import data as data_lib
from diffdyn.configs import default
from diffdyn.errors import UserError

Rule = tuple[Callable[[Any], bool], str]

# A chain must end near pure noise, since every sampler starts from x_T ~ N(0, I). Above this
# alpha_bar_T the signal sqrt(alpha_bar_T) x0 left in x_T is > 3% of x0 (DDPM's T = 1000: 4e-5).
MAX_FINAL_ALPHA_BAR = 1e-3


def _one_of(*options) -> Rule:
  return (lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


_POSITIVE_INT: Rule = (lambda v: v > 0, "an integer > 0")
_NON_NEGATIVE: Rule = (lambda v: v >= 0, "a number >= 0")
_POSITIVE: Rule = (lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
_PROBABILITY: Rule = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_UNIT_INTERVAL: Rule = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
_POSITIVE_INTS: Rule = (lambda v: len(v) > 0 and all(isinstance(i, int) and i > 0 for i in v),
                        "a non-empty sequence of integers > 0")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _variants(ok_item: Callable[[Any], bool], items: str) -> Rule:
  """A sweep axis: a sequence of distinct values, each passing ok_item; empty means no axis."""
  return (lambda v: all(ok_item(i) for i in v) and len(set(v)) == len(v),
          f"a sequence of distinct {items} (empty: not swept)")


RULES: dict[str, Rule] = {
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "data.name": _one_of(*data_lib.SOURCE_KEYS),
    "data.split": _one_of("train", "test"),
    "data.layout": _one_of("NHWC", "NCHW"),
    "data.image_size": _POSITIVE_INT,
    "data.synthetic_num_images": _POSITIVE_INT,
    "diffusion.schedule": _one_of("linear", "cosine"),
    "diffusion.num_timesteps": (lambda v: v >= 2, "an integer >= 2"),
    "diffusion.beta_start": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "diffusion.beta_end": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "diffusion.prediction": _one_of("eps", "v", "x0"),
    "loss.weighting": _one_of("constant", "minsnr"),
    "loss.minsnr_gamma": _POSITIVE,
    "model.name": _one_of("unet_cifar32"),
    "model.base_channels": _POSITIVE_INT,
    "model.channel_mult": _POSITIVE_INTS,
    "model.num_res_blocks": _POSITIVE_INT,
    "model.attn_resolutions": (lambda v: all(isinstance(i, int) and i > 0 for i in v),
                               "a sequence of integers > 0"),
    "model.dropout": _PROBABILITY,
    "model.image_size": _POSITIVE_INT,
    "model.channels": _POSITIVE_INT,
    "train.total_steps": _POSITIVE_INT,
    "train.batch_size": _POSITIVE_INT,
    "train.learning_rate": _POSITIVE,
    "train.warmup_steps": _NON_NEGATIVE,
    "train.grad_clip_norm": _NON_NEGATIVE,
    "train.adam_b1": _PROBABILITY,
    "train.adam_b2": _PROBABILITY,
    "train.adam_eps": _POSITIVE,
    "train.ema_decay": _PROBABILITY,
    "train.precision": _one_of("fp32", "bf16"),
    "train.chunk_runner": _one_of("auto", "scan", "loop"),
    "train.log_every_steps": _POSITIVE_INT,
    "train.checkpoint_every_steps": _POSITIVE_INT,
    "train.keep_checkpoints": (lambda v: v >= 2, "an integer >= 2 (one to fall back on)"),
    "curvature.every_steps": _POSITIVE_INT,
    "curvature.num_probes": (lambda v: v >= 2, "an integer >= 2 (a std needs two probes)"),
    "curvature.estimator": _one_of("hutchinson", "hutch++"),
    "curvature.batch": _one_of("fixed", "current"),
    "curvature.batch_size": _POSITIVE_INT,
    "curvature.objective": _one_of("train", "reference", "both"),
    "curvature.params": _one_of("raw", "ema", "both"),
    "curvature.chunk_size": _NON_NEGATIVE,
    "curvature.t_bands": _NON_NEGATIVE,
    "curvature.top_eig_every_steps": _NON_NEGATIVE,
    "curvature.top_eig_iters": _POSITIVE_INT,
    "curvature.max_memory_gb": _POSITIVE,
    "curvature.precond_every_steps": _NON_NEGATIVE,
    "curvature.precond_iters": _POSITIVE_INT,
    "curvature.density_every_steps": _NON_NEGATIVE,
    "curvature.density_runs": _POSITIVE_INT,
    "curvature.density_steps": _POSITIVE_INT,
    "curvature.density_points": (lambda v: v >= 2, "an integer >= 2"),
    "curvature.density_broadening": _POSITIVE,
    "eval.fid_every_steps": _POSITIVE_INT,
    "eval.fid_num_samples": (lambda v: v >= 2, "an integer >= 2"),
    "eval.final_fid_num_samples": (lambda v: v >= 2, "an integer >= 2"),
    "eval.sampler": _one_of("ddpm", "ddim"),
    "eval.nfe": _POSITIVE_INT,
    "eval.eta": _UNIT_INTERVAL,
    "eval.spacing": _one_of("linspace", "leading", "trailing"),
    "eval.variance": _one_of("small", "large"),
    "eval.respacing": _one_of("respaced", "none"),
    "eval.sample_batch_size": _POSITIVE_INT,
    "eval.grid_num_samples": _POSITIVE_INT,
    "eval.grid_sampler": _one_of("ddpm", "ddim"),
    "eval.grid_nfe": _POSITIVE_INT,
    "eval.grid_eta": _UNIT_INTERVAL,
    "eval.grid_params": _one_of("ema", "raw", "both"),
    "eval.grid_upscale": _POSITIVE_INT,
    "fid.batch_size": _POSITIVE_INT,
    "sweep.seeds": _POSITIVE_INT,
    "sweep.seed_list": _variants(lambda v: isinstance(v, int) and not isinstance(v, bool)
                                 and 0 <= v < 2**32, "integers in [0, 2**32)"),
    "sweep.minsnr_gamma": _variants(lambda v: _is_number(v) and 0 < v < math.inf,
                                    "finite numbers > 0"),
    "sweep.learning_rate": _variants(lambda v: _is_number(v) and 0 < v < math.inf,
                                     "finite numbers > 0"),
    "sweep.ema_decay": _variants(lambda v: _is_number(v) and 0 <= v < 1, "numbers in [0, 1)"),
    "sweep.loss_weighting": _variants(lambda v: v in ("constant", "minsnr"),
                                      "'constant' or 'minsnr'"),
}


def base_config() -> ml_collections.ConfigDict:
  return default.get_config()


def _flatten(cfg, prefix="") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def _type_ok(value, reference) -> bool:
  if isinstance(reference, bool):
    return isinstance(value, bool)
  if isinstance(reference, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(reference, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(reference, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(reference))


def _type_name(reference) -> str:
  if isinstance(reference, (tuple, list)):
    return "a sequence"
  return {bool: "a bool (True/False)", int: "an integer", float: "a number",
          str: "a string"}.get(type(reference), type(reference).__name__)


def key_hint(key: str) -> str:
  """For an unknown key: "; did you mean ..." naming the likeliest schema keys, else the keys of
  its section; "" when neither helps."""
  schema = _flatten(base_config())
  leaf = key.rsplit(".", 1)[-1]
  same_leaf = sorted(k for k in schema if k.rsplit(".", 1)[-1] == leaf)
  candidates = set(same_leaf + difflib.get_close_matches(key, schema, n=3, cutoff=0.75))
  close = sorted(candidates, key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())[:3]
  if close:
    return f"; did you mean {' or '.join(repr(k) for k in close)}?"
  section = key.rsplit(".", 1)[0] if "." in key else ""
  known = sorted(k for k in schema if k.rsplit(".", 1)[0] == section) if section else []
  if known:
    return f"; known keys in {section}: {', '.join(known)}"
  sections = sorted({k.rsplit(".", 1)[0] for k in schema if "." in k})
  close = difflib.get_close_matches(section, sections, n=1, cutoff=0.6) if section else []
  return f"; there is no section {section!r}: did you mean {close[0]!r}?" if close else ""


def expected_type(key: str) -> str | None:
  """What a value of schema key `key` must be ("an integer", ...), None for an unknown key."""
  schema = _flatten(base_config())
  return _type_name(schema[key]) if key in schema else None


def check_keys_and_types(config) -> None:
  schema = _flatten(base_config())
  given = _flatten(config)
  for key, value in given.items():
    if key not in schema:
      raise UserError(f"unknown config key {key!r}{key_hint(key)}")
    if not _type_ok(value, schema[key]):
      raise UserError(f"config key {key!r} must be {_type_name(schema[key])}, got {value!r}")


def check_values(config) -> None:
  flat = _flatten(config)
  for key, (ok, allowed) in RULES.items():
    if key in flat and not ok(flat[key]):
      raise UserError(f"config key {key!r} must be {allowed}, got {flat[key]!r}")


def check_consistency(config) -> None:
  d, m, c = config.diffusion, config.model, config.curvature
  if d.beta_start >= d.beta_end:
    raise UserError(f"config diffusion.beta_start ({d.beta_start}) must be < diffusion.beta_end "
                    f"({d.beta_end})")
  if m.image_size != config.data.image_size:
    raise UserError(f"config model.image_size ({m.image_size}) must equal data.image_size "
                    f"({config.data.image_size})")
  divisor = 2 ** (len(m.channel_mult) - 1)
  if m.image_size % divisor:
    raise UserError(f"config model.image_size ({m.image_size}) must be divisible by {divisor} "
                    f"for {len(m.channel_mult)} levels in model.channel_mult")
  for key in ("eval.nfe", "eval.grid_nfe"):
    if _flatten(config)[key] > d.num_timesteps:
      raise UserError(f"config {key} must be <= diffusion.num_timesteps ({d.num_timesteps})")
  for key in ("top_eig_every_steps", "precond_every_steps", "density_every_steps"):
    if c.enabled and c[key] % c.every_steps:
      raise UserError(f"config curvature.{key} ({c[key]}) must be a multiple of "
                      f"curvature.every_steps ({c.every_steps})")
  if c.enabled and (c.blocks or c.ggn) and c.estimator != "hutchinson":
    raise UserError("config curvature.blocks and curvature.ggn need "
                    f"curvature.estimator='hutchinson', got {c.estimator!r}")
  if c.enabled and c.estimator == "hutch++" and c.num_probes < 3:
    raise UserError(f"config curvature.num_probes ({c.num_probes}) must be >= 3 for "
                    "curvature.estimator 'hutch++' (a sketch, its basis and a residual probe)")
  check_samplers(config)
  data_lib.check_source_keys(config.data)
  if c.t_bands > c.batch_size:
    raise UserError(f"config curvature.t_bands ({c.t_bands}) must be <= curvature.batch_size "
                    f"({c.batch_size}) so that every band holds a probe example")
  _check_reaches_noise(d)


def _check_reaches_noise(d) -> None:
  final = diffusion.make_schedule(d.schedule, d.num_timesteps, d.beta_start,
                                  d.beta_end).alphas_cumprod[-1]
  if final <= MAX_FINAL_ALPHA_BAR:
    return
  scale = diffusion.LINEAR_REFERENCE_TIMESTEPS / d.num_timesteps
  fix = "raise diffusion.beta_end or diffusion.num_timesteps"
  if d.schedule == "linear" and d.beta_end * scale < 1:
    scaled = diffusion.make_schedule("linear", d.num_timesteps, d.beta_start, d.beta_end,
                                     scale_betas=True).alphas_cumprod[-1]
    fix = (f"scale the linear betas by 1000/T: --config.diffusion.beta_start="
           f"{d.beta_start * scale:g} --config.diffusion.beta_end={d.beta_end * scale:g} "
           f"(alpha_bar_T {scaled:.1e})")
  raise UserError(f"config diffusion: alpha_bar_T is {final:.3g} at num_timesteps="
                  f"{d.num_timesteps}, above {MAX_FINAL_ALPHA_BAR:g}, so x_T is far from the "
                  f"N(0, I) that sampling starts from; {fix}")


def check_samplers(config) -> None:
  """Builds each evaluation sampler's per-step constants, as the first evaluation will.

  A sampler setting that the math rejects (an NFE its spacing cannot keep, a schedule whose
  alpha_bar leaves (0, 1) at a kept step) then fails here, naming its keys, instead of at the
  first milestone thousands of steps in.
  """
  d, e = config.diffusion, config.eval
  schedule = diffusion.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
  for prefix, sampler, nfe, eta in (("eval.", e.sampler, e.nfe, e.eta),
                                    ("eval.grid_", e.grid_sampler, e.grid_nfe, e.grid_eta)):
    try:
      diffusion.step_coefficients(schedule, sampler=sampler, nfe=nfe, eta=eta,
                                  spacing=e.spacing, variance=e.variance,
                                  respacing=e.respacing)
    except ValueError as err:
      raise UserError(f"config {prefix}sampler {sampler!r} with {prefix}nfe={nfe} cannot run "
                      f"(eval.spacing={e.spacing!r}): {err}") from None


def to_dict(config) -> dict:
  """A config (frozen or not) as plain nested dicts, as config.json stores it."""
  return ml_collections.ConfigDict(config).to_dict()


# Keys that may change between a run and its resume without --allow_config_change: none of them
# changes a number the run computes.
RESUMABLE_CHANGES = ("train.total_steps", "train.tensorboard")


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """(key, old value, new value) for each dotted key whose value differs, sorted by key.

  A tuple equals the list JSON makes of it. A key that `old` (a run's config.json) lacks but
  the schema has was added after that run started, which then ran with its default: it
  differs only if `new` sets it to something else.
  """
  schema = _flatten(base_config())
  a, b = _flatten(old), _flatten(new)
  out = []
  for key in sorted(set(a) | set(b)):
    before = a.get(key, schema.get(key))
    if _as_list(before) != _as_list(b.get(key)):
      out.append((key, before, b.get(key)))
  return out


def _as_list(value):
  return list(value) if isinstance(value, tuple) else value


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
  """One line: "train.learning_rate: 0.0001 -> 0.0002; train.total_steps: 40 -> 80"."""
  return "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in diffs)


def validate(config) -> ml_collections.ConfigDict:
  """Raises UserError naming the first bad key; returns the config, frozen against edits."""
  check_keys_and_types(config)
  check_values(config)
  check_consistency(config)
  return ml_collections.FrozenConfigDict(config)
