"""E5 + E6 with 8 seeds each, trained together: constant vs Min-SNR-5 weighting, curvature on.

One program trains all 16 replicates (the weighting is a row of per-timestep loss weights, so it
is vmapped like the seed). Each writes its own run directory, `e56_constant_seed<seed>` or
`e56_minsnr_seed<seed>`, whose config matches experiments/e5.py or e6.py but for the name.

`experiments/e5e6_sweep.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import e6


def get_config():
  config = e6.get_config()
  config.name = "e56"
  config.sweep.seeds = 8
  config.sweep.loss_weighting = ("constant", "minsnr")
  return config
