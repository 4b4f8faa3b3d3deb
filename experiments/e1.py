"""E1: Baseline: constant weighting, 50k steps, no curvature (seed W1-E1).

  python launch.py --config experiments/e1.py --workdir runs/e1
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e1"
  config.train.total_steps = 50_000
  return config
