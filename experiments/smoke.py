"""Smoke test: the whole pipeline (train, curvature, samples) on the CPU in under a minute.

The definition lives in diffdyn/configs/smoke.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/smoke.py --workdir runs/smoke
"""
from diffdyn.configs.smoke import get_config  # noqa: F401  (the config file's entry point)
