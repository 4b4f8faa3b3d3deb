"""Config validation: each bad value is one UserError naming the key and what it may be."""
import importlib

import pytest

from diffdyn import config as config_lib
from diffdyn.errors import UserError
from diffdyn.configs import default as base

EXPERIMENTS = ("base", "e1", "e2", "e3", "e5", "e6", "e7a", "e7b", "e7c", "smoke")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_validates(name):
  config = importlib.import_module(f"experiments.{name}").get_config()
  config_lib.validate(config)


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
