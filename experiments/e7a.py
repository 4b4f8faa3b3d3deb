"""E7A: Baseline rerun, 10k steps, base_channels 32 (seed w1-e7_steps_vs_capacity_plan.md).

  python launch.py --config experiments/e7a.py --workdir runs/e7a
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e7a"
  config.curvature.enabled = True
  return config
