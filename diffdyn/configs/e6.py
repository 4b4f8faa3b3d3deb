"""E6: Min-SNR-5 with the Hutchinson probe, compared with E5 (seed w1-e6_minsnr_hutchinson.md).

`experiments/e6.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import default


def get_config():
  config = default.get_config()
  config.name = "e6"
  config.loss.weighting = "minsnr"
  config.loss.minsnr_gamma = 5.0
  config.curvature.enabled = True
  config.curvature.objective = "both"
  config.curvature.params = "both"   # EMA curvature pairs with FID, which samples the EMA
  config.curvature.blocks = True
  config.curvature.ggn = True
  config.curvature.precond_every_steps = 1000
  config.curvature.density_every_steps = 1000
  return config
