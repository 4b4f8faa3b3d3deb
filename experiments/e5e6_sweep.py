"""E5 + E6 with 8 seeds each, trained together: constant vs Min-SNR-5 weighting, curvature on.

The definition lives in diffdyn/configs/e5e6_sweep.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e5e6_sweep.py --workdir runs/e56
  python -m diffdyn.analysis report runs/e56/e56_* --out reports/e56
"""
from diffdyn.configs.e5e6_sweep import get_config  # noqa: F401  (the config file's entry point)
