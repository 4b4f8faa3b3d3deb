"""E2: Min-SNR-5 weighting, 50k steps (seed W1-E2).

The definition lives in diffdyn/configs/e2.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e2.py --workdir runs/e2
"""
from diffdyn.configs.e2 import get_config  # noqa: F401  (the config file's entry point)
