"""E2: Min-SNR-5 weighting, 50k steps (seed W1-E2).

`experiments/e2.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e2"
  config.loss.weighting = "minsnr"
  config.loss.minsnr_gamma = 5.0
  config.train.total_steps = 50_000
  return config
