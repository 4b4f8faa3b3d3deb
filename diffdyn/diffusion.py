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


# The chain length the linear beta range is quoted for (Ho et al. 2020: 1e-4 ... 0.02 over 1000).
LINEAR_REFERENCE_TIMESTEPS = 1000


def make_schedule(name: str, num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, *, scale_betas: bool = False) -> Schedule:
  """The named schedule over `num_timesteps` steps.

  Args:
    name: "linear" (betas evenly from beta_start to beta_end) or "cosine" (Nichol & Dhariwal;
      beta_start and beta_end do not apply).
    num_timesteps: T.
    beta_start, beta_end: the linear range.
    scale_betas: linear only: multiply both ends by 1000 / T first (improved-diffusion's rule).
      The range is quoted for T = 1000, where it drives alpha_bar_T to 4.0e-5; the same range
      over T = 100 steps only reaches alpha_bar_T = 0.36, so x_T is far from N(0, I) and
      every sampler starts off the distribution. Scaled, T = 100 reaches 2.0e-5. T = 1000 is
      unchanged either way.

  Raises:
    ValueError: an unknown name, or a scaled beta_end that is not below 1.
  """
  if name == "linear":
    if scale_betas:
      scale = LINEAR_REFERENCE_TIMESTEPS / num_timesteps
      beta_start, beta_end = beta_start * scale, beta_end * scale
      if beta_end >= 1.0:
        raise ValueError(f"beta_end scaled by 1000/T = {scale:g} is {beta_end:g}, not < 1; "
                         f"use more timesteps than {num_timesteps} or a smaller beta_end")
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

SPACINGS = ("linspace", "leading", "trailing")
VARIANCES = ("small", "large")
RESPACINGS = ("respaced", "none")


def respaced_timesteps(num_timesteps: int, nfe: int, spacing: str = "linspace") -> np.ndarray:
  """The original timesteps a sampler with `nfe` network evaluations visits.

  Args:
    num_timesteps: T, the length of the training schedule.
    nfe: how many timesteps to keep, 1 <= nfe <= T; nfe == T keeps them all.
    spacing: "linspace" rounds nfe evenly spaced points from 0 to T-1, so both ends are kept
      (it needs nfe >= 2 when T > 1); "leading" keeps 0, s, 2s, ... with s = T // nfe;
      "trailing" keeps round(T - i T / nfe) - 1 for i < nfe, so T-1 is kept and 0 may not be.

  Returns:
    `nfe` distinct int64 timesteps in [0, T), ascending.
  """
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
  if not 1 <= nfe <= num_timesteps:
    raise ValueError(f"nfe must be in [1, num_timesteps={num_timesteps}], got {nfe}")
  if spacing == "linspace":
    if nfe == 1 and num_timesteps > 1:
      raise ValueError("spacing 'linspace' keeps both t=0 and t=T-1, so it needs nfe >= 2")
    steps = np.round(np.linspace(0, num_timesteps - 1, nfe))
  elif spacing == "leading":
    steps = np.arange(nfe) * (num_timesteps // nfe)
  else:
    steps = np.round(num_timesteps - np.arange(nfe) * (num_timesteps / nfe)) - 1
  return np.sort(steps.astype(np.int64))


def respaced_schedule(schedule: Schedule, timesteps) -> Schedule:
  """The schedule that treats the kept `timesteps` as consecutive steps.

  Its alpha_bar at step k is the original alpha_bar at timesteps[k]. For that to hold, each
  beta has to be recomputed as 1 - alpha_bar[tau_k] / alpha_bar[tau_{k-1}] (with 1 before
  the first kept step); the original beta at tau_k describes one original step only.

  Args:
    schedule: the training schedule.
    timesteps: strictly increasing original timesteps, e.g. from `respaced_timesteps`.

  Returns:
    A `Schedule` of length len(timesteps).
  """
  timesteps = np.asarray(timesteps)
  if (timesteps.ndim != 1 or timesteps.size == 0
      or not np.issubdtype(timesteps.dtype, np.integer)):
    raise ValueError(f"timesteps must be a non-empty 1-D integer array, got {timesteps!r}")
  in_range = 0 <= timesteps[0] and timesteps[-1] < schedule.num_timesteps
  if not in_range or np.any(np.diff(timesteps) <= 0):
    raise ValueError(f"timesteps must increase strictly within [0, {schedule.num_timesteps}), "
                     f"got {timesteps}")
  alphas_cumprod = schedule.alphas_cumprod[timesteps]
  return Schedule(1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1]))


def _noise_levels(schedule: Schedule, timesteps: np.ndarray,
                  respacing: str) -> tuple[np.ndarray, np.ndarray]:
  """alpha_bar at each kept step, and the alpha_bar that step moves x to (float64)."""
  if respacing == "respaced":
    kept = respaced_schedule(schedule, timesteps)
    return kept.alphas_cumprod, kept.alphas_cumprod_prev
  if respacing != "none":
    raise ValueError(f"unknown respacing {respacing!r}; expected one of {RESPACINGS}")
  # The ablation reads the original per-step tables at tau_k: it moves x from tau_k to
  # tau_k - 1 only, yet the next step treats x as being at tau_{k-1}. Noise that should have
  # been removed between the kept steps stays in x. The final step still lands on the data
  # (alpha_bar 1), so it returns the x0 prediction for every spacing.
  target = schedule.alphas_cumprod_prev[timesteps]
  target[0] = 1.0
  return schedule.alphas_cumprod[timesteps], target


def _ddpm_coefficients(ab, ab_prev, *, eta, variance):
  """Ancestral step: x_prev ~ N(x0_coef x0 + xt_coef x_t, noise_std^2), q's posterior."""
  del eta  # DDPM's noise is set by `variance`.
  beta = 1.0 - ab / ab_prev
  if variance == "small":
    var = beta * (1.0 - ab_prev) / (1.0 - ab)
  elif variance == "large":
    # beta', the forward step's variance: Ho et al.'s other choice, optimal for x0 ~ N(0, I).
    # Its entry for the last step is never used (no noise is added there). improved-diffusion
    # puts the next step's posterior variance in that slot only to keep a log-variance
    # finite for likelihoods, which sampling does not need.
    var = beta
  else:
    raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
  return {
      "x0_coef": np.sqrt(ab_prev) * beta / (1.0 - ab),
      "xt_coef": np.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab),
      "noise_std": np.sqrt(var),
  }


def _ddpm_update(c, x_t, x0, noise):
  return c["x0_coef"] * x0 + c["xt_coef"] * x_t + c["noise_std"] * noise


def _ddim_coefficients(ab, ab_prev, *, eta, variance):
  """Song et al. (2021), eq. 12: x_prev = sqrt(ab_prev) x0 + dir_coef eps + sigma z."""
  del variance  # DDIM's noise is set by `eta`.
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"ddim eta must be in [0, 1], got {eta}")
  var = eta**2 * (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)
  return {
      "x0_coef": np.sqrt(ab_prev),
      # 1 - ab_prev - var >= 0 for eta <= 1; the floor only absorbs round-off at ab_prev = 1.
      "dir_coef": np.sqrt(np.maximum(1.0 - ab_prev - var, 0.0)),
      "sqrt_ab": np.sqrt(ab),
      "rsqrt_one_minus_ab": 1.0 / np.sqrt(1.0 - ab),
      "noise_std": np.sqrt(var),
  }


def _ddim_update(c, x_t, x0, noise):
  # eps is re-derived from the (possibly clipped) x0 so that x_t = sqrt(ab) x0 +
  # sqrt(1 - ab) eps holds exactly. With eta = 1 the step is then the DDPM "small" step even
  # under clipping; the network's own eps next to a clipped x0 would describe some other x_t.
  eps = (x_t - c["sqrt_ab"] * x0) * c["rsqrt_one_minus_ab"]
  return c["x0_coef"] * x0 + c["dir_coef"] * eps + c["noise_std"] * noise


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A reverse-process update rule, split into its schedule constants and its step.

  Attributes:
    coefficients: (ab, ab_prev, *, eta, variance) -> dict of float64 arrays, one entry per
      kept step; ab is alpha_bar at the step and ab_prev the alpha_bar it moves x to.
    update: (coefficients of one step, x_t, x0_pred, noise) -> x_prev, in float32.
  """
  coefficients: object
  update: object


_SAMPLERS = {
    "ddpm": Sampler(_ddpm_coefficients, _ddpm_update),
    "ddim": Sampler(_ddim_coefficients, _ddim_update),
}
SAMPLERS = tuple(_SAMPLERS)


def get_sampler(name: str) -> Sampler:
  """The registered `Sampler` called `name`."""
  if name not in _SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
  return _SAMPLERS[name]


def _step_coefficients(schedule: Schedule, timesteps: np.ndarray, sampler: str, eta: float,
                       variance: str, respacing: str) -> dict[str, np.ndarray]:
  """Every per-step constant of the sampling loop, as float32 arrays over the kept steps."""
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
  ab, ab_prev = _noise_levels(schedule, timesteps, respacing)
  if np.any(ab <= 0.0) or np.any(ab >= 1.0):
    raise ValueError("alpha_bar must lie in (0, 1) at every kept timestep: x0 cannot be "
                     "recovered from eps where it is 0, nor eps from x_t where it is 1")
  coef = get_sampler(sampler).coefficients(ab, ab_prev, eta=eta, variance=variance)
  coef["sqrt_recip_ab"] = 1.0 / np.sqrt(ab)
  coef["sqrt_recipm1_ab"] = np.sqrt(1.0 / ab - 1.0)
  return {name: np.asarray(value, np.float32) for name, value in coef.items()}


def step_coefficients(schedule: Schedule, *, sampler: str, nfe: int, eta: float, spacing: str,
                      variance: str, respacing: str) -> dict[str, np.ndarray]:
  """The per-step constants `sample` would use, or the ValueError it would raise."""
  timesteps = respaced_timesteps(schedule.num_timesteps, nfe, spacing)
  return _step_coefficients(schedule, timesteps, sampler, eta, variance, respacing)


def _sample_loop(eps_fn, rng, timesteps, coef, *, shape, sampler, clip_x0, dtype):
  """The reverse process as one scan over the kept steps, from the noisiest to t = 0."""
  update = get_sampler(sampler).update
  init_rng, step_rng = jax.random.split(rng)
  x_init = jax.random.normal(init_rng, shape, jnp.float32).astype(dtype)

  def step(x, inputs):
    k, t, c = inputs
    x_t = x.astype(jnp.float32)
    eps = eps_fn(x, jnp.full((shape[0],), t, jnp.int32)).astype(jnp.float32)
    x0 = c["sqrt_recip_ab"] * x_t - c["sqrt_recipm1_ab"] * eps
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    noise = jax.random.normal(jax.random.fold_in(step_rng, k), shape, jnp.float32)
    noise = jnp.where(k > 0, noise, 0.0)
    return update(c, x_t, x0, noise).astype(dtype), None

  steps = jnp.arange(timesteps.shape[0], dtype=jnp.int32)
  x, _ = jax.lax.scan(step, x_init, (steps, timesteps, coef), reverse=True)
  return x


_STATIC_LOOP_ARGS = ("shape", "sampler", "clip_x0", "dtype")
# For an eps_fn given as a `jax.tree_util.Partial`: its arguments (say, network parameters)
# are traced inputs and its function is part of the cache key, so calls with new arguments
# reuse one compiled loop.
_run_partial_loop = jax.jit(_sample_loop, static_argnames=_STATIC_LOOP_ARGS)


def _closed_loop(eps_fn):
  # A fresh jit per call for any other callable: arrays it closes over become constants of
  # the program, and a module-level cache would keep them, and the program, alive.
  return jax.jit(lambda *args, **kwargs: _sample_loop(eps_fn, *args, **kwargs),
                 static_argnames=_STATIC_LOOP_ARGS)


def sample(eps_fn, schedule: Schedule, shape, rng: jax.Array, sampler: str = "ddpm",
           nfe: int = 50, eta: float = 1.0, clip_x0: bool = True, spacing: str = "linspace",
           variance: str = "small", respacing: str = "respaced",
           dtype=jnp.float32) -> jax.Array:
  """Draws samples by running the reverse process over `nfe` respaced timesteps.

  Both samplers first predict x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) and clip it to
  [-1, 1] if `clip_x0`. The last step returns that prediction, so with clipping the output
  lies in [-1, 1].

  Random numbers: with `init_rng, step_rng = jax.random.split(rng)`, x_T is
  `normal(init_rng, shape)` and the step taken at kept index k (timesteps[k]) adds
  `normal(fold_in(step_rng, k), shape)`, both float32. The step at k = 0 adds none.

  Callable eagerly or under `jit`; all shapes are static. An eager call compiles the loop
  for its eps_fn. Passing eps_fn as `jax.tree_util.Partial(apply_fn, params)` instead makes
  the parameters traced inputs, so later calls with new parameters reuse the compiled loop
  (apply_fn itself should not close over arrays: it stays cached).

  Args:
    eps_fn: (x_t, t) -> eps, where x_t has `shape` and `dtype` and t is an int32 (B,) array
      of ORIGINAL timesteps.
    schedule: the training schedule.
    shape: the batch shape (B, ...).
    rng: a PRNG key.
    sampler: a name from `SAMPLERS`: "ddpm" (ancestral) or "ddim".
    nfe: network evaluations, i.e. kept timesteps; see `respaced_timesteps`.
    eta: DDIM only. 0 is deterministic; 1 gives the DDPM "small" step.
    clip_x0: clip the x0 predictions to [-1, 1]. DDIM re-derives eps from the clipped x0.
    spacing: how the kept timesteps are chosen; see `respaced_timesteps`.
    variance: DDPM only. "small" is the posterior variance of the respaced schedule,
      "large" its beta'.
    respacing: "respaced" runs the sampler on `respaced_schedule`; "none" is an ablation that
      uses the original per-timestep constants at the kept timesteps as if they were
      consecutive, and leaves most of the noise in the samples.
    dtype: dtype of the state carried between steps and fed to eps_fn (e.g. jnp.bfloat16);
      each update is computed in float32. A bf16 state keeps 8 significant bits: components
      whose per-step change is below that stall, which grows with nfe (on Gaussian data,
      DDIM at 50 steps: up to 7% excess variance, 3.5% rms error against float32).

  Returns:
    The samples, of `shape` and `dtype`.
  """
  if sampler not in _SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  timesteps = respaced_timesteps(schedule.num_timesteps, nfe, spacing)
  coef = _step_coefficients(schedule, timesteps, sampler, eta, variance, respacing)
  loop_args = (rng, timesteps.astype(np.int32), coef)
  loop_kwargs = dict(shape=tuple(int(n) for n in shape), sampler=sampler,
                     clip_x0=bool(clip_x0), dtype=jnp.dtype(dtype))
  if isinstance(eps_fn, jax.tree_util.Partial):
    return _run_partial_loop(eps_fn, *loop_args, **loop_kwargs)
  return _closed_loop(eps_fn)(*loop_args, **loop_kwargs)


def to_uint8(x) -> jax.Array:
  """Maps [-1, 1] to uint8 0..255: clip, scale by (x + 1) * 127.5, round half to even.

  Clipping first means values beyond [-1, 1] saturate at 0 or 255 instead of wrapping; NaN
  maps to 0. Half-to-even is jnp.round's rule; x = 0 (127.5) is the only exact half in
  [-1, 1] and goes to 128.
  """
  x = jnp.nan_to_num(jnp.asarray(x, jnp.float32), nan=-1.0)
  return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def sample_in_batches(eps_fn, schedule: Schedule, num: int, batch_size: int, image_shape, rng,
                      **sample_kwargs) -> np.ndarray:
  """`num` uint8 samples (num, *image_shape), drawn `batch_size` at a time by `sample`.

  Every batch runs the same compiled program: the last one is drawn full-size and cut.
  Batch i uses fold_in(rng, i), so the first samples do not depend on `num`.
  """
  if num < 0 or batch_size < 1:
    raise ValueError(f"need num >= 0 and batch_size >= 1, got num={num}, batch_size={batch_size}")
  shape = (batch_size, *image_shape)

  @jax.jit
  def draw(batch_rng):
    return to_uint8(sample(eps_fn, schedule, shape, batch_rng, **sample_kwargs))

  batches = [np.asarray(draw(jax.random.fold_in(rng, i))) for i in range(-(-num // batch_size))]
  if not batches:
    return np.zeros((0, *image_shape), np.uint8)
  return np.concatenate(batches)[:num]
