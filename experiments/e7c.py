"""E7C: Wider baseline, 10k steps, base_channels 64 (seed w1-e7_steps_vs_capacity_plan.md).

The definition lives in diffdyn/configs/e7c.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e7c.py --workdir runs/e7c
"""
from diffdyn.configs.e7c import get_config  # noqa: F401  (the config file's entry point)
