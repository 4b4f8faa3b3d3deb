"""E3: Min-SNR-5, truncated to 10k steps (seed e3_minsnr_short.md).

The definition lives in diffdyn/configs/e3.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e3.py --workdir runs/e3
"""
from diffdyn.configs.e3 import get_config  # noqa: F401  (the config file's entry point)
