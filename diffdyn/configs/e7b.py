"""E7B: Longer baseline, 50k steps, base_channels 32 (seed w1-e7_steps_vs_capacity_plan.md).

`experiments/e7b.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e7b"
  config.train.total_steps = 50_000
  config.curvature.enabled = True
  return config
