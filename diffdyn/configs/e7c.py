"""E7C: Wider baseline, 10k steps, base_channels 64 (seed w1-e7_steps_vs_capacity_plan.md).

`experiments/e7c.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e7c"
  config.model.base_channels = 64
  config.curvature.enabled = True
  return config
