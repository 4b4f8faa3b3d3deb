"""E1: Baseline: constant weighting, 50k steps, no curvature (seed W1-E1).

`experiments/e1.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e1"
  config.train.total_steps = 50_000
  return config
