"""E1: Baseline: constant weighting, 50k steps, no curvature (seed W1-E1).

The definition lives in diffdyn/configs/e1.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e1.py --workdir runs/e1
"""
from diffdyn.configs.e1 import get_config  # noqa: F401  (the config file's entry point)
