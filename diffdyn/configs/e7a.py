"""E7A: Baseline rerun, 10k steps, base_channels 32 (seed w1-e7_steps_vs_capacity_plan.md).

`experiments/e7a.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e7a"
  config.curvature.enabled = True
  return config
