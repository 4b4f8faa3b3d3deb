"""Config validation: each bad value is one UserError naming the key and what it may be."""
import importlib
import os

import pytest

from conftest import ROOT
from diffdyn import config as config_lib
from diffdyn.errors import UserError
from diffdyn.configs import default as base
from diffdyn.configs import smoke

EXPERIMENTS = tuple(sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "experiments"))
                           if name.endswith(".py") and name != "__init__.py"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_validates(name):
  config = importlib.import_module(f"experiments.{name}").get_config()
  config_lib.validate(config)


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != "base"])
def test_experiment_files_re_export_the_package_definitions(name):
  # One copy of each experiment: the package's, which an installed diffdyn has too.
  package = importlib.import_module(f"diffdyn.configs.{name}")
  assert importlib.import_module(f"experiments.{name}").get_config is package.get_config


def test_smoke_size_keeps_what_the_experiment_measures():
  e6 = importlib.import_module("diffdyn.configs.e6").get_config()
  small = smoke.smoke_size(importlib.import_module("diffdyn.configs.e6").get_config())
  config_lib.validate(small)
  assert (small.loss.weighting, small.curvature.enabled, small.curvature.objective,
          small.fid.enabled) == (e6.loss.weighting, True, "both", True)
  assert (small.data.name, small.model.base_channels, small.train.total_steps) == (
      "synthetic", 8, 40)
  assert (small.name, small.seed, small.loss.minsnr_gamma) == ("e6", 1077, 5.0)


def test_experiments_set_the_seed_knobs():
  e6 = importlib.import_module("experiments.e6").get_config()
  assert (e6.loss.weighting, e6.loss.minsnr_gamma, e6.train.total_steps) == ("minsnr", 5.0, 10_000)
  assert e6.curvature.enabled and e6.curvature.objective == "both"
  e7c = importlib.import_module("experiments.e7c").get_config()
  assert e7c.model.base_channels == 64 and e7c.loss.weighting == "constant"
  assert importlib.import_module("experiments.e7b").get_config().train.total_steps == 50_000
  b = base.get_config()
  assert (b.train.batch_size, b.train.learning_rate, b.train.ema_decay, b.seed) == (4, 1e-4, 0.999,
                                                                                    1077)


# (key path, bad value, words the message must contain)
BAD = [
    ("train.total_steps", -5, ["train.total_steps", "integer > 0"]),
    ("train.batch_size", 0, ["train.batch_size", "integer > 0"]),
    ("loss.weighting", "snr", ["loss.weighting", "'constant'", "'minsnr'"]),
    ("loss.minsnr_gamma", 0.0, ["loss.minsnr_gamma", "> 0"]),
    ("loss.minsnr_gamma", -1.0, ["loss.minsnr_gamma", "> 0"]),
    ("train.ema_decay", 1.0, ["train.ema_decay", "[0, 1)"]),
    ("train.ema_decay", -0.1, ["train.ema_decay", "[0, 1)"]),
    ("train.batch_size", "four", ["train.batch_size", "an integer", "'four'"]),
    ("diffusion.schedule", "quadratic", ["diffusion.schedule", "'linear'", "'cosine'"]),
    ("train.precision", "fp16", ["train.precision", "'bf16'"]),
    ("eval.sampler", "euler", ["eval.sampler", "'ddim'"]),
    ("curvature.num_probes", 1, ["curvature.num_probes", ">= 2"]),
    ("curvature.objective", "all", ["curvature.objective", "'both'"]),
    ("model.dropout", 1.5, ["model.dropout", "[0, 1)"]),
    ("train.learning_rate", float("nan"), ["train.learning_rate", "finite"]),
    ("curvature.enabled", 1, ["curvature.enabled", "bool"]),
    ("eval.eta", 1.5, ["eval.eta", "[0, 1]"]),
    ("eval.grid_eta", -0.1, ["eval.grid_eta", "[0, 1]"]),
    ("curvature.params", "average", ["curvature.params", "'ema'"]),
    ("train.chunk_runner", "while", ["train.chunk_runner", "'scan'", "'loop'"]),
    ("eval.grid_upscale", 0, ["eval.grid_upscale", "integer > 0"]),
    ("curvature.max_memory_gb", 0.0, ["curvature.max_memory_gb", "> 0"]),
    ("curvature.density_points", 1, ["curvature.density_points", ">= 2"]),
]


@pytest.mark.parametrize("path,value,words", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_value_names_key_and_allowed_values(path, value, words):
  config = base.get_config()
  # Bypass ConfigDict's own type lock so the validator, not ml_collections, sees the value.
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  node.__dict__["_fields"][leaf] = value
  with pytest.raises(UserError) as err:
    config_lib.validate(config)
  message = str(err.value)
  assert "\n" not in message
  for word in words:
    assert word in message, message


def test_unknown_key_lists_known_keys():
  config = base.get_config()
  config.train.unlock()
  config.train.lr = 1e-3
  with pytest.raises(UserError, match=r"unknown config key 'train.lr'.*learning_rate"):
    config_lib.validate(config)


@pytest.mark.parametrize("key, hint", [
    ("train.seed", "; did you mean 'seed'?"),
    ("trian.batch_size", "; did you mean 'train.batch_size' or "),
    ("seeds", "; did you mean 'seed' or 'sweep.seeds'?"),
    ("trian.lr", "; there is no section 'trian': did you mean 'train'?"),
    ("nothing.like.this", ""),
])
def test_unknown_keys_get_the_likeliest_known_ones(key, hint):
  got = config_lib.key_hint(key)
  assert got.startswith(hint) if hint else got == "", got


def test_expected_types_follow_the_schema():
  assert config_lib.expected_type("train.batch_size") == "an integer"
  assert config_lib.expected_type("train.learning_rate") == "a number"
  assert config_lib.expected_type("train.tensorboard") == "a bool (True/False)"
  assert config_lib.expected_type("model.channel_mult") == "a sequence"
  assert config_lib.expected_type("train.nope") is None


def test_differences_name_each_changed_key_with_both_values():
  old = config_lib.base_config().to_dict()
  new = config_lib.base_config()
  new.train.learning_rate = 2e-4
  new.model.channel_mult = (1, 2)
  old["model"]["channel_mult"] = list(old["model"]["channel_mult"])   # as config.json holds it
  del old["data"]["layout"]   # a run from before the key existed ran with its default
  diffs = config_lib.differences(old, new.to_dict())
  assert diffs == [("model.channel_mult", [1, 2, 2, 2], (1, 2)),
                   ("train.learning_rate", 1e-4, 2e-4)]
  assert config_lib.describe_differences(diffs) == (
      "model.channel_mult: [1, 2, 2, 2] -> (1, 2); train.learning_rate: 0.0001 -> 0.0002")
  assert config_lib.differences(old, old) == []


def test_inconsistent_values_are_caught():
  config = base.get_config()
  config.diffusion.beta_start = 0.05
  with pytest.raises(UserError, match="beta_start"):
    config_lib.validate(config)
  config = base.get_config()
  config.eval.nfe = 2000
  with pytest.raises(UserError, match="eval.nfe"):
    config_lib.validate(config)
  config = base.get_config()
  config.model.image_size = 30
  with pytest.raises(UserError, match="image_size"):
    config_lib.validate(config)


def _with(**values):
  config = base.get_config()
  for path, value in values.items():
    section, field = path.split("__")
    config[section][field] = value
  return config


@pytest.mark.parametrize("values,words", [
    # linspace keeps t = 0 and t = T-1, so one network evaluation cannot run it.
    ({"eval__nfe": 1}, ["eval.sampler", "eval.nfe=1", "nfe >= 2"]),
    ({"eval__grid_nfe": 1}, ["eval.grid_sampler", "eval.grid_nfe=1", "nfe >= 2"]),
    # Hutch++ splits its budget into a sketch, its basis and residual probes: 3 at least.
    ({"curvature__enabled": True, "curvature__estimator": "hutch++", "curvature__num_probes": 2},
     ["curvature.num_probes", ">= 3", "hutch++"]),
])
def test_values_that_would_fail_at_the_first_evaluation_fail_at_once(values, words):
  with pytest.raises(UserError) as err:
    config_lib.validate(_with(**values))
  for word in words:
    assert word in str(err.value), str(err.value)
  # The same settings with a spacing that keeps a single step are fine.
  if "eval__nfe" in values:
    config_lib.validate(_with(**values, eval__spacing="leading"))
def test_a_schedule_that_does_not_reach_noise_is_refused():
  # T = 100 with the T = 1000 range leaves alpha_bar_T = 0.364; the message names it and the
  # scaled range (x 1000/T) that fixes it. The smoke config itself uses that scaled range.
  smoke = importlib.import_module("experiments.smoke")
  config = smoke.get_config()
  config.diffusion.beta_start, config.diffusion.beta_end = 1e-4, 0.02
  with pytest.raises(UserError, match=r"alpha_bar_T is 0\.364 at num_timesteps=100.*"
                     r"beta_start=0\.001 --config\.diffusion\.beta_end=0\.2"):
    config_lib.validate(config)
  config_lib.validate(smoke.get_config())
  config = base.get_config()
  config.curvature.enabled = True
  config.curvature.density_every_steps = 150
  with pytest.raises(UserError, match="density_every_steps.*multiple"):
    config_lib.validate(config)
  config = base.get_config()
  config.curvature.enabled = True
  config.curvature.estimator = "hutch++"
  config.curvature.ggn = True
  with pytest.raises(UserError, match="ggn.*hutchinson"):
    config_lib.validate(config)
