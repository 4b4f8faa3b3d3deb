"""E5: Hutchinson trace probe on the constant-weight baseline (seed w1-e5_hutchinson_baseline.md).

The definition lives in diffdyn/configs/e5.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e5.py --workdir runs/e5
"""
from diffdyn.configs.e5 import get_config  # noqa: F401  (the config file's entry point)
