"""E6: Min-SNR-5 with the Hutchinson probe, compared with E5 (seed w1-e6_minsnr_hutchinson.md).

E5 with the one thing the study varies, the loss weighting. `experiments/e6.py` re-exports
this config for `launch.py --config`.
"""
from diffdyn.configs import e5


def get_config():
  config = e5.get_config()
  config.name = "e6"
  config.loss.weighting = "minsnr"
  config.loss.minsnr_gamma = 5.0
  return config
