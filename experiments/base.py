"""The base config itself, runnable as an experiment; its content lives in diffdyn/configs/default.py.

  python launch.py --config experiments/base.py --workdir runs/base
"""
from diffdyn.configs.default import get_config  # noqa: F401  (the config file's entry point)
