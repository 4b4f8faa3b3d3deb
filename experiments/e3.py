"""E3: Min-SNR-5, truncated to 10k steps (seed e3_minsnr_short.md).

  python launch.py --config experiments/e3.py --workdir runs/e3
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e3"
  config.loss.weighting = "minsnr"
  config.loss.minsnr_gamma = 5.0
  return config
