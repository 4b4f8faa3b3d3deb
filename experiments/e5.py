"""E5: Hutchinson trace probe on the constant-weight baseline (seed w1-e5_hutchinson_baseline.md).

  python launch.py --config experiments/e5.py --workdir runs/e5
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e5"
  config.curvature.enabled = True
  config.curvature.objective = "both"
  config.curvature.params = "both"   # EMA curvature pairs with FID, which samples the EMA
  return config
