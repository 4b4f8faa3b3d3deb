"""E3: Min-SNR-5, truncated to 10k steps (seed e3_minsnr_short.md).

`experiments/e3.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e3"
  config.loss.weighting = "minsnr"
  config.loss.minsnr_gamma = 5.0
  return config
