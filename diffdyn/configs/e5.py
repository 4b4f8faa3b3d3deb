"""E5: Hutchinson trace probe on the constant-weight baseline (seed w1-e5_hutchinson_baseline.md).

`experiments/e5.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e5"
  config.curvature.enabled = True
  config.curvature.objective = "both"
  config.curvature.params = "both"   # EMA curvature pairs with FID, which samples the EMA
  config.curvature.blocks = True
  config.curvature.ggn = True
  config.curvature.precond_every_steps = 1000
  config.curvature.density_every_steps = 1000
  return config
