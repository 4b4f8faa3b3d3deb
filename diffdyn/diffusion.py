"""Diffusion math: noise schedules, the forward process, loss weights and samplers.

Everything here is a pure function of arrays. A `Schedule` holds float64 numpy arrays
so that derived quantities (SNR, respaced betas) are computed without float32 round-off;
functions that run under `jit` read them as constants.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")
WEIGHTINGS = ("constant", "minsnr")
PREDICTIONS = ("eps", "v", "x0")


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A discrete DDPM noise schedule over timesteps 0 .. T-1 (float64, numpy)."""
  betas: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas(self) -> np.ndarray:
    return 1.0 - self.betas

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(self.alphas)

  @property
  def alphas_cumprod_prev(self) -> np.ndarray:
    return np.append(1.0, self.alphas_cumprod[:-1])


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (2021), eq. 17: betas from a squared-cosine alpha-bar, capped at max_beta."""
  def alpha_bar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  t = np.arange(num_timesteps, dtype=np.float64)
  ratios = np.array([alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps) for i in t])
  return np.minimum(1.0 - ratios, max_beta)


def make_schedule(name: str, num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> Schedule:
  if name == "linear":
    return Schedule(linear_betas(num_timesteps, beta_start, beta_end))
  if name == "cosine":
    return Schedule(cosine_betas(num_timesteps))
  raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")


def snr(schedule: Schedule) -> np.ndarray:
  """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep (float64)."""
  ab = schedule.alphas_cumprod
  return ab / (1.0 - ab)


def loss_weight(schedule: Schedule, weighting: str = "constant", gamma: float = 5.0,
                prediction: str = "eps") -> np.ndarray:
  """Per-timestep loss weight (float64, length T).

  Min-SNR-gamma (Hang et al. 2023) clamps the effective x0-space weight at gamma. Written in
  each parameterisation's own loss: min(SNR, g)/SNR for eps, min(SNR, g)/(SNR + 1) for v and
  min(SNR, g) for x0. Where SNR is 0 the ratio is undefined and the weight is 1.
  """
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
  t_count = schedule.num_timesteps
  if weighting == "constant":
    return np.ones(t_count, dtype=np.float64)
  if weighting != "minsnr":
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
  if gamma <= 0:
    raise ValueError(f"minsnr gamma must be > 0, got {gamma}")
  s = snr(schedule)
  clamped = np.minimum(s, gamma)
  with np.errstate(divide="ignore", invalid="ignore"):
    if prediction == "eps":
      w = clamped / s
    elif prediction == "v":
      w = clamped / (s + 1.0)
    else:
      w = clamped
  return np.where(s == 0, 1.0, w)


def _gather(values: np.ndarray, t: jax.Array, ndim: int, dtype=jnp.float32) -> jax.Array:
  """values[t], shaped to broadcast against a batch of rank `ndim`."""
  out = jnp.asarray(values, dtype)[t]
  return out.reshape(out.shape + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draw x_t ~ q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I) with the given noise."""
  ab = schedule.alphas_cumprod
  return (_gather(np.sqrt(ab), t, x0.ndim, x0.dtype) * x0
          + _gather(np.sqrt(1.0 - ab), t, x0.ndim, x0.dtype) * noise)


def prediction_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array,
                      prediction: str) -> jax.Array:
  """What the network is trained to output for the given parameterisation."""
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x0
  if prediction == "v":
    ab = schedule.alphas_cumprod
    return (_gather(np.sqrt(ab), t, x0.ndim, x0.dtype) * noise
            - _gather(np.sqrt(1.0 - ab), t, x0.ndim, x0.dtype) * x0)
  raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def eps_from_prediction(schedule: Schedule, model_out: jax.Array, x_t: jax.Array, t: jax.Array,
                        prediction: str) -> jax.Array:
  """Converts a network output of any parameterisation to an eps prediction."""
  if prediction == "eps":
    return model_out
  ab = schedule.alphas_cumprod
  sqrt_ab = _gather(np.sqrt(ab), t, x_t.ndim, x_t.dtype)
  sqrt_1m = _gather(np.sqrt(1.0 - ab), t, x_t.ndim, x_t.dtype)
  if prediction == "x0":
    return (x_t - sqrt_ab * model_out) / sqrt_1m
  if prediction == "v":
    return sqrt_ab * model_out + sqrt_1m * x_t
  raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over every axis but the batch axis, in float32."""
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return err.reshape(err.shape[0], -1).mean(axis=1)


def timestep_bins(t: jax.Array, num_timesteps: int, num_bins: int) -> jax.Array:
  """Index of the equal-width timestep bin each t falls into."""
  return jnp.minimum(t * num_bins // num_timesteps, num_bins - 1)


# ---------------------------------------------------------------------------------------
# Sampling (respaced DDPM / DDIM) follows below.
# ---------------------------------------------------------------------------------------
