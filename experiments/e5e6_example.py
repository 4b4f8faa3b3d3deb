"""The README's example runs: E5 + E6, three seeds each, at smoke size on synthetic data (CPU).

The definition lives in diffdyn/configs/e5e6_example.py, so that an installed diffdyn has it too.

  python launch.py --config experiments/e5e6_example.py --workdir runs/e56ex
  python -m diffdyn.analysis report runs/e56ex/e56ex_* --out reports/e56ex
"""
from diffdyn.configs.e5e6_example import get_config  # noqa: F401  (the config file's entry point)
