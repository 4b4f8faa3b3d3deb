"""E7A: Baseline rerun, 10k steps, base_channels 32 (seed w1-e7_steps_vs_capacity_plan.md).

The definition lives in diffdyn/configs/e7a.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e7a.py --workdir runs/e7a
"""
from diffdyn.configs.e7a import get_config  # noqa: F401  (the config file's entry point)
