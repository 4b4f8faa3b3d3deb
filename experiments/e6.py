"""E6: Min-SNR-5 with the Hutchinson probe, compared with E5 (seed w1-e6_minsnr_hutchinson.md).

The definition lives in diffdyn/configs/e6.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e6.py --workdir runs/e6
"""
from diffdyn.configs.e6 import get_config  # noqa: F401  (the config file's entry point)
