"""Numbers that put a run's FID in context: its training budget, the initialisation left in its
EMA, and which timesteps its loss weighting changes.

Everything is computed from a run's config.json (a plain dict); keys it lacks take the values
of `diffdyn/configs/default.py`, the seeds' settings. No I/O here.
"""
from __future__ import annotations

import numpy as np

from diffdyn import diffusion
from diffdyn.analysis import runs as runs_lib

# Ho et al. (2020) trained their CIFAR-10 DDPM for 800k steps at batch 128.
DDPM_CIFAR10_STEPS = 800_000
DDPM_CIFAR10_BATCH = 128
# Training images per data set, where the config alone says it (a local path: not known).
_TRAIN_SET_SIZES = {"cifar10": {"train": 50_000, "test": 10_000}}
# The warm-up decay_t = min(d, (1 + t) / (10 + t)) (t = updates made before this one).
_WARMUP_OFFSET = 10.0


def ema_decays(decay: float, warmup: bool, num_updates: int) -> np.ndarray:
  """The decay used by each EMA update t = 0 .. num_updates - 1 (float64).

  ema <- decay_t * ema + (1 - decay_t) * params. Without warm-up decay_t = decay; with it
  min(decay, (1 + t) / (10 + t)), which starts at 0.1 and reaches 0.999 at t = 8991.
  """
  t = np.arange(num_updates, dtype=np.float64)
  if not warmup:
    return np.full(num_updates, float(decay))
  return np.minimum(float(decay), (1.0 + t) / (_WARMUP_OFFSET + t))


def ema_init_weight(steps, decay: float, warmup: bool) -> np.ndarray:
  """Weight of the initial parameters in the EMA after each of `steps` updates.

  The EMA starts as a copy of the initial parameters and every update keeps decay_t of it,
  so after s updates their weight is prod_{t < s} decay_t: decay^s without warm-up
  (0.999^2000 = 13.5%). Summed in logs so 50k-step runs do not underflow early.
  """
  steps = np.asarray(steps, dtype=np.int64)
  if steps.size == 0:
    return np.zeros(0)
  log_cumulative = np.concatenate([[0.0], np.cumsum(np.log(ema_decays(decay, warmup,
                                                                       int(steps.max()))))])
  return np.exp(log_cumulative[steps])


def ema_settings(config: dict) -> tuple[float, bool]:
  """(train.ema_decay, train.ema_warmup); runs from before the warm-up existed had none."""
  warmup = runs_lib.config_get(config, "train.ema_warmup")
  return float(runs_lib.config_value(config, "train.ema_decay")), bool(warmup)


def training_budget(config: dict, steps: int) -> dict:
  """Images seen after `steps` steps, against DDPM's CIFAR-10 budget and the data set."""
  batch = int(runs_lib.config_value(config, "train.batch_size"))
  seen = steps * batch
  reference = DDPM_CIFAR10_STEPS * DDPM_CIFAR10_BATCH
  name = runs_lib.config_value(config, "data.name")
  split = runs_lib.config_value(config, "data.split")
  size = None
  if name == "synthetic":
    size = int(runs_lib.config_value(config, "data.synthetic_num_images"))
  elif not runs_lib.config_value(config, "data.path"):
    size = _TRAIN_SET_SIZES.get(name, {}).get(split)
  return dict(steps=steps, batch_size=batch, images_seen=seen,
              reference=dict(name="DDPM (Ho et al. 2020), CIFAR-10", steps=DDPM_CIFAR10_STEPS,
                             batch_size=DDPM_CIFAR10_BATCH, images_seen=reference),
              fraction_of_reference=seen / reference, dataset_size=size,
              epochs=seen / size if size else None)


def weighting_effect(config: dict) -> dict:
  """Which timesteps the run's loss weighting changes, for its schedule and prediction.

  A weight of exactly 1 leaves a timestep's loss as the constant weighting has it, so the
  fraction of timesteps with w(t) != 1 is what the weighting can change at all. Min-SNR-gamma
  with eps-prediction has w = min(SNR, gamma) / SNR, below 1 only where SNR > gamma: the
  least noisy timesteps. With the seeds' linear schedule (T = 1000) and gamma = 5 that is
  t < 130, 13% of them, with w(0) = 5e-4.
  """
  d = {k: runs_lib.config_value(config, f"diffusion.{k}")
       for k in ("schedule", "num_timesteps", "beta_start", "beta_end", "prediction")}
  weighting = runs_lib.config_value(config, "loss.weighting")
  gamma = float(runs_lib.config_value(config, "loss.minsnr_gamma"))
  schedule = diffusion.make_schedule(d["schedule"], int(d["num_timesteps"]),
                                     float(d["beta_start"]), float(d["beta_end"]))
  w = diffusion.loss_weight(schedule, weighting, gamma, d["prediction"])
  snr = diffusion.snr(schedule)
  changed = np.flatnonzero(np.abs(w - 1.0) > 1e-12)
  prefix = changed.size > 0 and np.array_equal(changed, np.arange(changed.size))
  return dict(
      weighting=weighting, gamma=gamma if weighting == "minsnr" else None,
      prediction=d["prediction"], schedule=d["schedule"], num_timesteps=schedule.num_timesteps,
      beta_start=float(d["beta_start"]), beta_end=float(d["beta_end"]),
      changed_timesteps=int(changed.size), fraction_changed=changed.size / w.size,
      changed_below_t=int(changed.size) if prefix else None,
      weight_at_t0=float(w[0]), min_weight=float(w.min()), max_weight=float(w.max()),
      snr_at_last_changed=float(snr[changed[-1]]) if changed.size else None,
      snr_range=[float(snr.min()), float(snr.max())])


def final_alpha_bar(config: dict) -> float:
  """alpha_bar_T of the run's schedule: how close x_T is to N(0, I)."""
  d = {k: runs_lib.config_value(config, f"diffusion.{k}")
       for k in ("schedule", "num_timesteps", "beta_start", "beta_end")}
  schedule = diffusion.make_schedule(d["schedule"], int(d["num_timesteps"]),
                                     float(d["beta_start"]), float(d["beta_end"]))
  return float(schedule.alphas_cumprod[-1])


def milestone_steps(run: runs_lib.Run, fid_key: str) -> list[int]:
  """The run's logged FID steps, else the steps its config schedules milestones at."""
  if run.has(fid_key):
    return [int(s) for s in run.series(fid_key)[0]]
  every = runs_lib.config_value(run.config, "eval.fid_every_steps")
  if not isinstance(every, int) or every <= 0:
    return []
  return list(range(every, run.total_steps + 1, every))

