"""E7B: Longer baseline, 50k steps, base_channels 32 (seed w1-e7_steps_vs_capacity_plan.md).

The definition lives in diffdyn/configs/e7b.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e7b.py --workdir runs/e7b
"""
from diffdyn.configs.e7b import get_config  # noqa: F401  (the config file's entry point)
