"""Smoke test: the whole pipeline (train, curvature, samples) on the CPU in under a minute.

Synthetic 16x16 images, a width-8 two-level UNet, 40 steps. FID is off because it needs the
Inception weights; add `--config.fid.enabled=True --config.fid.inception_weights=FILE` to
exercise it too. `smoke_size` shrinks any experiment the same way (the notebook's SMOKE switch).

`experiments/smoke.py` re-exports this config for `launch.py --config`.
"""
from diffdyn.configs import default


def smoke_size(config):
  """Shrinks `config` in place to the smoke test's data, network, steps and measurement sizes.

  What the experiment measures (weighting, curvature on or off and on which objective, FID on
  or off) stays as it is.
  """
  config.data.name = "synthetic"
  config.data.image_size = 16
  config.data.synthetic_num_images = 256
  config.model.image_size = 16
  config.model.base_channels = 8
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.diffusion.num_timesteps = 100
  # DDPM's 1e-4 ... 0.02 scaled by 1000/T, so that 100 steps still end near noise (alpha_bar_T
  # 2e-5; unscaled it would be 0.36, which config validation refuses).
  config.diffusion.beta_start = 1e-3
  config.diffusion.beta_end = 0.2
  config.train.total_steps = 40
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 20
  config.curvature.every_steps = 10
  config.curvature.num_probes = 4
  config.curvature.batch_size = 4
  config.eval.fid_every_steps = 20
  config.eval.fid_num_samples = 16
  config.eval.final_fid_num_samples = 32
  config.eval.sample_batch_size = 16
  config.eval.nfe = 10
  config.eval.grid_num_samples = 16
  config.eval.grid_nfe = 5
  config.fid.batch_size = 16
  return config


def get_config():
  config = smoke_size(default.get_config())
  config.name = "smoke"
  config.curvature.enabled = True
  config.curvature.objective = "both"
  # Every curvature measurement, at smoke size: per-block traces and the Gauss-Newton trace at
  # each measurement, Adam's preconditioned sharpness and the spectral density at two.
  config.curvature.blocks = True
  config.curvature.ggn = True
  config.curvature.precond_every_steps = 20
  config.curvature.precond_iters = 5
  config.curvature.density_every_steps = 20
  config.curvature.density_runs = 2
  config.curvature.density_steps = 8
  config.curvature.density_points = 128
  config.fid.enabled = False
  return config
