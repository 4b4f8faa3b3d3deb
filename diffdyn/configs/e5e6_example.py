"""The README's example runs: E5 + E6, three seeds each, at smoke size on synthetic data (CPU).

One sweep program trains the six replicates, `e56ex_constant_seed1077` ... `_seed1079` and
`e56ex_minsnr_seed1077` ... `_seed1079` (paired seeds), for 300 steps with every curvature
measurement of E5/E6 on: Hessian, per-block and Gauss-Newton traces of the raw and EMA params
every 10 steps, Adam's preconditioned sharpness and the spectral density every 50. FID is off:
the Inception weights cannot be fetched offline. `docs/example_runs.sh` runs both commands:

  python launch.py --config experiments/e5e6_example.py --workdir runs/e56ex
  python -m diffdyn.analysis report runs/e56ex/e56ex_* --out reports/e56ex
"""
from diffdyn.configs import e5e6_sweep
from diffdyn.configs import smoke


def get_config():
  config = smoke.smoke_size(e5e6_sweep.get_config())
  config.name = "e56ex"
  config.sweep.seeds = 3
  config.train.total_steps = 300
  config.train.checkpoint_every_steps = 100
  config.train.tensorboard = False
  # The preconditioned sharpness and the density at six steps each and with fewer Lanczos
  # steps than E5/E6: they are the costly measurements (time/curvature_*_train_steps).
  config.curvature.precond_every_steps = 50
  config.curvature.precond_iters = 10
  config.curvature.density_every_steps = 50
  config.curvature.density_runs = 2
  config.curvature.density_steps = 12
  config.curvature.density_points = 128
  config.eval.fid_every_steps = 100   # sample grids at 100, 200, 300
  config.fid.enabled = False
  return config
