"""Schedules, loss weights, the forward process, respacing and the samplers.

Reference values are computed here from the formulas in the papers (plain numpy, float64),
never by calling the function under test. The sampler checks use a Gaussian data set, for
which the optimal eps is known in closed form and every sampler step is linear.
"""
import gc
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdyn import diffusion

T = 1000
# Ho et al. (2020): beta rises linearly from 1e-4 to 0.02 over T = 1000 steps.
LINEAR_BETAS = np.linspace(1e-4, 0.02, T)
LINEAR_ABAR = np.cumprod(1.0 - LINEAR_BETAS)
F32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def linear():
  return diffusion.make_schedule("linear", num_timesteps=T)


# --- schedules ----------------------------------------------------------------------------


def test_linear_schedule_endpoints(linear):
  # Reference: Ho et al.'s constants. linspace hits both ends exactly, so 1 ulp tolerance.
  assert linear.betas.dtype == np.float64 and linear.betas.shape == (T,)
  assert linear.betas[0] == pytest.approx(1e-4, rel=1e-15)
  assert linear.betas[-1] == pytest.approx(0.02, rel=1e-15)
  np.testing.assert_allclose(np.diff(linear.betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)


def test_scaling_leaves_the_seeds_t1000_schedule_unchanged():
  # The seeds' numbers: betas exactly numpy's linspace(1e-4, 0.02, 1000), scaled or not
  # (1000 / 1000 = 1), and alpha_bar_T = prod(1 - beta) = 4.04e-5.
  for scaled in (False, True):
    sch = diffusion.make_schedule("linear", num_timesteps=1000, scale_betas=scaled)
    np.testing.assert_array_equal(sch.betas, LINEAR_BETAS)
  assert diffusion.make_schedule("linear", 1000).alphas_cumprod[-1] == pytest.approx(
      np.prod(1.0 - LINEAR_BETAS), rel=1e-12)


def test_short_linear_schedule_reaches_noise_only_when_scaled():
  # T = 100 with DDPM's range ends at alpha_bar_T = prod(1 - linspace(1e-4, 0.02, 100)) =
  # 0.36: x_T is far from N(0, I). Scaled by 1000/T = 10 the range is 1e-3 ... 0.2 and
  # alpha_bar_T = 2.0e-5, as close to noise as T = 1000's 4.0e-5.
  plain = diffusion.make_schedule("linear", 100)
  assert plain.alphas_cumprod[-1] == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 100)),
                                                   rel=1e-12)
  assert plain.alphas_cumprod[-1] > 0.3
  scaled = diffusion.make_schedule("linear", 100, scale_betas=True)
  np.testing.assert_allclose(scaled.betas, np.linspace(1e-3, 0.2, 100), rtol=1e-14)
  assert scaled.alphas_cumprod[-1] < 1e-4
  with pytest.raises(ValueError, match="not < 1"):
    diffusion.make_schedule("linear", 20, scale_betas=True)  # 0.02 x 50 = 1.0


def test_cosine_schedule_matches_closed_form_and_caps_beta():
  # Reference: Nichol & Dhariwal (2021), eq. 17 with s = 0.008:
  # alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2); index i holds
  # t = i + 1. f(T) = 0, so the last beta would be 1: the cap 0.999 must apply there.
  s = 0.008
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  closed = f(np.arange(1, T + 1) / T) / f(0.0)
  betas = diffusion.make_schedule("cosine", num_timesteps=T).betas
  assert betas.max() == 0.999 and betas[-1] == 0.999
  uncapped = betas < 0.999
  assert uncapped[:-1].all()
  # The product of T ratios of cosines telescopes; float64 round-off grows ~ T ulp.
  np.testing.assert_allclose(np.cumprod(1.0 - betas)[:-1], closed[:-1], rtol=1e-12)


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match="quadratic"):
    diffusion.make_schedule("quadratic")


# --- loss weights --------------------------------------------------------------------------


def test_constant_weight_is_one(linear):
  np.testing.assert_array_equal(diffusion.loss_weight(linear, "constant"), np.ones(T))


@pytest.mark.parametrize("t", [0, 60, 300, 999])
def test_minsnr_weights_by_hand(linear, t):
  # Reference: Hang et al. (2023), min(SNR, gamma) in x0-space, rewritten for each target:
  # eps: min(SNR, g) / SNR, v: min(SNR, g) / (SNR + 1), x0: min(SNR, g). SNR comes from a
  # plain cumprod of the Ho et al. betas; only float64 round-off separates the two paths.
  snr = LINEAR_ABAR[t] / (1.0 - LINEAR_ABAR[t])
  gamma = 5.0
  expected = {"eps": min(snr, gamma) / snr, "v": min(snr, gamma) / (snr + 1.0),
              "x0": min(snr, gamma)}
  for prediction, want in expected.items():
    got = diffusion.loss_weight(linear, "minsnr", gamma=gamma, prediction=prediction)[t]
    assert got == pytest.approx(want, rel=1e-12), prediction


def test_minsnr_eps_weight_limits(linear):
  # At t = 0, alpha_bar = 1 - 1e-4, SNR = 0.9999 / 1e-4 = 9999: weight 5 / 9999. Where SNR
  # < gamma (t = 999, SNR ~ 4e-5) the clamp is inactive and the eps weight is exactly 1.
  w = diffusion.loss_weight(linear, "minsnr", gamma=5.0, prediction="eps")
  assert w[0] == pytest.approx(5.0 / 9999.0, rel=1e-9)
  assert w[-1] == 1.0
  assert np.all(np.diff(w) >= 0)  # SNR falls with t, so the eps weight rises to 1.


def test_minsnr_weight_is_one_where_snr_is_zero():
  # beta = 1 at the last step makes alpha_bar exactly 0 there; the docstring's convention
  # is weight 1 (for eps, 0/0; for v and x0 it overrides the formula's 0).
  sch = diffusion.Schedule(np.array([0.1, 0.5, 1.0]))
  for prediction in diffusion.PREDICTIONS:
    w = diffusion.loss_weight(sch, "minsnr", gamma=5.0, prediction=prediction)
    assert np.all(np.isfinite(w)) and w[-1] == 1.0, prediction
  # alpha_bar = (0.9, 0.45, 0): SNR 9 and 0.45/0.55; eps weights 5/9 and 1 by hand.
  np.testing.assert_allclose(
      diffusion.loss_weight(sch, "minsnr", gamma=5.0, prediction="eps"), [5 / 9, 1, 1],
      rtol=1e-14)


@pytest.mark.parametrize("kwargs", [dict(weighting="snr"), dict(weighting="minsnr", gamma=0.0),
                                    dict(weighting="minsnr", gamma=-1.0),
                                    dict(weighting="minsnr", prediction="score")])
def test_invalid_weighting_raises(linear, kwargs):
  with pytest.raises(ValueError):
    diffusion.loss_weight(linear, **kwargs)


# --- forward process -----------------------------------------------------------------------


def test_q_sample_matches_formula(linear):
  # Reference: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps with ab from the plain cumprod.
  # Both sides are float32 products of O(1) values: a few ulp of |x| <= ~5.
  x0 = jax.random.uniform(jax.random.key(0), (6, 4, 4, 3), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 1, 250, 500, 998, 999])
  ab = LINEAR_ABAR[np.asarray(t)].reshape(-1, 1, 1, 1)
  want = np.sqrt(ab) * np.asarray(x0) + np.sqrt(1.0 - ab) * np.asarray(noise)
  np.testing.assert_allclose(diffusion.q_sample(linear, x0, t, noise), want, atol=3e-6)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_round_trip(linear, prediction):
  # The target of each parameterisation, converted back, must give the noise. x0 is the
  # hard case: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab) divides a float32 difference of
  # O(1) terms by sqrt(1 - ab_0) = 0.01, so errors reach ~100 ulp of |x_t| (~4): 1e-4.
  x0 = jax.random.uniform(jax.random.key(2), (64, 8), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(3), x0.shape)
  t = jnp.arange(64) * (T - 1) // 63
  x_t = diffusion.q_sample(linear, x0, t, noise)
  target = diffusion.prediction_target(linear, x0, t, noise, prediction)
  eps = diffusion.eps_from_prediction(linear, target, x_t, t, prediction)
  np.testing.assert_allclose(eps, noise, atol=1e-4)
  if prediction == "v":
    # Reference: Salimans & Ho (2022), v = sqrt(ab) eps - sqrt(1 - ab) x0.
    ab = LINEAR_ABAR[np.asarray(t)][:, None]
    want = np.sqrt(ab) * np.asarray(noise) - np.sqrt(1.0 - ab) * np.asarray(x0)
    np.testing.assert_allclose(target, want, atol=3e-6)


# --- respacing -----------------------------------------------------------------------------


def test_respaced_timesteps_small_cases_by_hand():
  # T = 10, nfe = 4. linspace(0, 9, 4) = 0, 3, 6, 9. leading: stride 10 // 4 = 2.
  # trailing: 10 - 2.5 i = 10, 7.5, 5, 2.5 -> numpy rounds half to even: 10, 8, 5, 2 -> -1.
  np.testing.assert_array_equal(diffusion.respaced_timesteps(10, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(diffusion.respaced_timesteps(10, 4, "leading"), [0, 2, 4, 6])
  np.testing.assert_array_equal(diffusion.respaced_timesteps(10, 4, "trailing"), [1, 4, 7, 9])
  # T = 20: linspace(0, 19, 4) = 0, 6.33, 12.67, 19 -> 0, 6, 13, 19 (rounded, not floored);
  # leading stride 20 // 3 = 6; trailing 20, 13.33, 6.67 -> 20, 13, 7 -> minus 1.
  np.testing.assert_array_equal(diffusion.respaced_timesteps(20, 4), [0, 6, 13, 19])
  np.testing.assert_array_equal(diffusion.respaced_timesteps(20, 3, "leading"), [0, 6, 12])
  np.testing.assert_array_equal(diffusion.respaced_timesteps(20, 3, "trailing"), [6, 12, 19])


@pytest.mark.parametrize("spacing", diffusion.SPACINGS)
@pytest.mark.parametrize("nfe", [20, 50, 333, T])
def test_respaced_timesteps_are_distinct_and_in_range(spacing, nfe):
  steps = diffusion.respaced_timesteps(T, nfe, spacing)
  assert steps.shape == (nfe,) and np.all(np.diff(steps) > 0)
  assert steps[0] >= 0 and steps[-1] <= T - 1
  if spacing != "leading":
    assert steps[-1] == T - 1
  if spacing != "trailing":
    assert steps[0] == 0
  if nfe == T:
    np.testing.assert_array_equal(steps, np.arange(T))


@pytest.mark.parametrize("nfe,spacing", [(0, "linspace"), (T + 1, "leading"), (1, "linspace"),
                                         (10, "quadratic")])
def test_respaced_timesteps_rejects_bad_arguments(nfe, spacing):
  with pytest.raises(ValueError):
    diffusion.respaced_timesteps(T, nfe, spacing)


def test_full_respacing_is_identity(linear):
  # beta'_t = 1 - ab_t / ab_{t-1} undoes a float64 cumprod: |error| <= ~2 ulp of alpha,
  # ~5e-16 absolute, i.e. <= 5e-12 relative to the smallest beta (1e-4).
  kept = diffusion.respaced_schedule(linear, np.arange(T))
  np.testing.assert_allclose(kept.betas, LINEAR_BETAS, rtol=1e-10)


def test_respaced_schedule_keeps_alpha_bar(linear):
  # The defining property: the respaced chain's alpha_bar equals the original at the kept
  # steps (the cumprod of ratios telescopes; ~50 float64 roundings).
  steps = diffusion.respaced_timesteps(T, 50)
  kept = diffusion.respaced_schedule(linear, steps)
  np.testing.assert_allclose(kept.alphas_cumprod, LINEAR_ABAR[steps], rtol=1e-13)
  # ... and its betas are not the original ones at those steps (the seed's suspected bug).
  assert kept.betas[-1] > 10 * LINEAR_BETAS[steps[-1]]


# --- samplers: exactness against independent loops ----------------------------------------


def _wiggly_eps(xp):
  """A smooth, nonlinear stand-in for a network, written for numpy or jax.numpy."""
  def eps(x, t):
    scale = 1.0 + t.reshape((-1,) + (1,) * (x.ndim - 1)) / T
    return 0.9 * x + 0.2 * xp.tanh(scale * x) - 0.05
  return eps


def _sampler_noise(rng, shape, num_steps):
  """x_T and the per-step noise, drawn as `diffusion.sample`'s docstring specifies."""
  init_rng, step_rng = jax.random.split(rng)
  x_init = jax.random.normal(init_rng, shape, jnp.float32)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(step_rng, k), shape,
                                               jnp.float32))(jnp.arange(num_steps))
  return np.asarray(x_init, np.float64), np.asarray(noise, np.float64)


# linspace(0, 999, 10) = 111 k exactly, so the kept steps are known without rounding.
@pytest.mark.parametrize("nfe,kept", [(T, np.arange(T)), (10, 111 * np.arange(10))])
def test_ddpm_equals_plain_ddpm_loop(linear, nfe, kept):
  # Reference: Ho et al. (2020), Algorithm 2 (eq. 11), in float64, on the chain of kept
  # steps with beta_k = 1 - ab[kept_k] / ab[kept_{k-1}] (for nfe = T, the original betas),
  # and the noise drawn as `sample`'s docstring specifies:
  # x_{k-1} = (x_k - beta_k / sqrt(1 - ab_k) eps) / sqrt(1 - beta_k) + sqrt(beta~_k) z_k.
  # Clipping is off, so Algorithm 2 and the posterior-mean form are the same map; eps_fn
  # depends on t, so passing anything but the original timestep shows.
  # Tolerance: the sampler runs in float32 and the step map is not expanding for this eps
  # (|d eps / dx| ~ 1), so up to 1000 steps of ~1e-7 round-off on |x| ~ 1 add up like a
  # random walk to ~3e-6 (measured 8e-7); 3e-5 leaves 10x, while a coefficient wrong by
  # 1e-4 relative in a single step already moves x by more.
  shape = (16, 8)
  rng = jax.random.key(7)
  x, noise = _sampler_noise(rng, shape, nfe)
  eps_np = _wiggly_eps(np)
  ab = LINEAR_ABAR[kept]
  ab_prev = np.append(1.0, ab[:-1])
  betas = 1.0 - ab / ab_prev
  if nfe == T:
    betas = LINEAR_BETAS
  for k in range(nfe - 1, -1, -1):
    eps = eps_np(x, np.full(shape[0], kept[k], np.float64))
    x = (x - betas[k] / np.sqrt(1.0 - ab[k]) * eps) / np.sqrt(1.0 - betas[k])
    if k > 0:
      x += np.sqrt(betas[k] * (1.0 - ab_prev[k]) / (1.0 - ab[k])) * noise[k]
  got = diffusion.sample(_wiggly_eps(jnp), linear, shape, rng, sampler="ddpm", nfe=nfe,
                         clip_x0=False)
  np.testing.assert_allclose(got, x, atol=3e-5)


@pytest.mark.parametrize("clip_x0", [True, False])
def test_ddim_eta_one_equals_ddpm_small(linear, clip_x0):
  # Reference: Song et al. (2021), eq. 16: with eta = 1, sigma_k^2 is the posterior variance
  # and the DDIM step is q's posterior step. The two samplers use different formulas (DDIM
  # re-derives eps from the clipped x0) and the same noise, so they agree up to float32
  # round-off: 50 steps of a few ulp on |x| <= ~1.2, ~1e-6 as a random walk (measured
  # 3e-7); allowed 1e-5.
  shape = (32, 8)
  eps_fn = _wiggly_eps(jnp)
  kwargs = dict(nfe=50, clip_x0=clip_x0, rng=jax.random.key(11))
  ddpm = diffusion.sample(eps_fn, linear, shape, sampler="ddpm", variance="small", **kwargs)
  ddim = diffusion.sample(eps_fn, linear, shape, sampler="ddim", eta=1.0, **kwargs)
  np.testing.assert_allclose(ddim, ddpm, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(sampler="ddpm"), dict(sampler="ddim", eta=0.5),
                                    dict(sampler="ddpm", variance="large"),
                                    dict(sampler="ddpm", respacing="none", spacing="trailing")])
def test_clipped_output_stays_in_range(linear, kwargs):
  # An eps that drives x0 far out of range: with clipping, the last step returns the
  # clipped x0 and adds no noise, so the output must lie in [-1, 1] exactly. "large" has a
  # nonzero beta' at the last step and "none" with trailing spacing does not end at t = 0:
  # both would leave the range if the last step were not the x0 prediction.
  wild = lambda x, t: -5.0 * x + 3.0
  x = diffusion.sample(wild, linear, (8, 16), jax.random.key(0), nfe=10, **kwargs)
  assert float(jnp.max(jnp.abs(x))) <= 1.0


def test_unclipped_output_leaves_range(linear):
  # The control for the test above: without clipping the same eps leaves [-1, 1].
  wild = lambda x, t: -5.0 * x + 3.0
  x = diffusion.sample(wild, linear, (8, 16), jax.random.key(0), nfe=10, clip_x0=False)
  assert float(jnp.max(jnp.abs(x))) > 1.0


def test_unknown_sampler_and_options_raise(linear):
  with pytest.raises(ValueError, match="ddpm.*ddim"):
    diffusion.get_sampler("euler")
  eps_fn = lambda x, t: x
  for kwargs in (dict(sampler="euler"), dict(variance="fixed"), dict(respacing="strided"),
                 dict(sampler="ddim", eta=1.5), dict(spacing="quad")):
    with pytest.raises(ValueError):
      diffusion.sample(eps_fn, linear, (2, 3), jax.random.key(0), nfe=10, **kwargs)


def test_sample_under_jit_with_traced_params_matches_eager(linear):
  # The training loop closes eps_fn over traced parameters inside its own jit; the inner
  # jitted loop must accept that and give the same numbers as the eager call.
  def eps_from(scale):
    return lambda x, t: scale * x
  rng = jax.random.key(5)
  jitted = jax.jit(lambda s, r: diffusion.sample(eps_from(s), linear, (4, 6), r, nfe=20))
  eager = diffusion.sample(eps_from(0.7), linear, (4, 6), rng, nfe=20)
  np.testing.assert_allclose(jitted(0.7, rng), eager, atol=1e-6)


def test_partial_eps_fn_reuses_the_compiled_loop(linear):
  # A jax.tree_util.Partial carries its arguments as traced inputs, so new parameters must
  # not retrace eps_fn (each trace runs the Python body once).
  traces = []
  def apply(scale, x, t):
    traces.append(None)
    return scale * x
  for scale in (0.5, 0.6, 0.7):
    diffusion.sample(jax.tree_util.Partial(apply, jnp.float32(scale)), linear, (2, 3),
                     jax.random.key(0), nfe=10)
  assert len(traces) == 1


def test_eager_sample_does_not_keep_the_closure(linear):
  # Arrays a closure captures are baked into the compiled program; a cache that outlived the
  # call would keep both (with network parameters: the whole model, once per call).
  scale = jnp.ones(3)
  eps_fn = lambda x, t: x * scale
  ref = weakref.ref(eps_fn)
  diffusion.sample(eps_fn, linear, (2, 3), jax.random.key(0), nfe=10)
  del eps_fn
  gc.collect()
  assert ref() is None


# --- to_uint8 and batches ------------------------------------------------------------------


def test_to_uint8_saturates_and_rounds():
  # (x + 1) * 127.5 rounded half to even: -1 -> 0, 1 -> 255, 0 (127.5, the only exact half
  # in [-1, 1]) -> 128; beyond +-1 saturates instead of wrapping (a plain cast of 256 would
  # give 0, of -1.5 -> 255); NaN -> 0 by the documented choice.
  x = jnp.array([-1.0, 1.0, 0.0, -1e-6, 1e-6, 1.0001, 3.0, 1e9, -1.0001, -7.0, -jnp.inf,
                 jnp.inf, jnp.nan])
  np.testing.assert_array_equal(
      diffusion.to_uint8(x), [0, 255, 128, 127, 128, 255, 255, 255, 0, 0, 0, 255, 0])
  # Every level survives the round trip: level n sits at n / 127.5 - 1, half a level
  # (~0.004) from each rounding boundary, far beyond float32 error.
  levels = np.arange(256)
  np.testing.assert_array_equal(diffusion.to_uint8(levels / 127.5 - 1.0), levels)
  assert diffusion.to_uint8(x).dtype == jnp.uint8


def test_sample_in_batches_compiles_once_and_matches_sample(linear):
  traces = []
  def eps_fn(x, t):
    traces.append(None)
    return 0.8 * x
  rng = jax.random.key(3)
  image_shape = (4, 4, 3)
  out = diffusion.sample_in_batches(eps_fn, linear, 5, 2, image_shape, rng, nfe=10,
                                    sampler="ddim", eta=0.5)
  assert out.shape == (5, *image_shape) and out.dtype == np.uint8
  assert len(traces) == 1  # three batches, one trace of the loop
  reference_fn = jax.tree_util.Partial(eps_fn)  # one compile for the three references
  for i in range(3):
    want = diffusion.to_uint8(diffusion.sample(reference_fn, linear, (2, *image_shape),
                                               jax.random.fold_in(rng, i), nfe=10,
                                               sampler="ddim", eta=0.5))
    np.testing.assert_array_equal(out[2 * i:2 * i + 2], np.asarray(want)[:len(out[2 * i:])])


# --- Gaussian oracle -------------------------------------------------------------------------
#
# Data x0 ~ N(0, diag(lam)). The marginal of x_t is N(0, v_t), v_t = ab_t lam + 1 - ab_t,
# and the optimal eps is E[eps | x_t] = sqrt(1 - ab_t) x_t / v_t. Every sampler step is then
# x_prev = m_k x + s_k z per component, so the output variance follows exactly from
# var_prev = m_k^2 var + s_k^2 with var = 1 at the start: `_propagated_variance` below, in
# float64, from the papers' formulas. The sampler's empirical variance is compared with that
# tightly (only Monte-Carlo error), and the propagation with lam through derived bounds.

NUM_SAMPLES = 4000
LAM = np.logspace(0.0, -3.0, 32)
# Relative standard error of a variance estimated from n Gaussian draws: sqrt(2 / (n - 1)).
VAR_SE = math.sqrt(2.0 / (NUM_SAMPLES - 1))


def _oracle_eps(x, t):
  ab = jnp.asarray(LINEAR_ABAR, jnp.float32)[t][:, None]
  sqrt_1m = jnp.asarray(np.sqrt(1.0 - LINEAR_ABAR), jnp.float32)[t][:, None]
  one_minus = jnp.asarray(1.0 - LINEAR_ABAR, jnp.float32)[t][:, None]
  lam = jnp.asarray(LAM, jnp.float32)
  return (sqrt_1m * x.astype(jnp.float32) / (ab * lam + one_minus)).astype(x.dtype)


def _step_levels(nfe, respacing):
  """alpha_bar at each kept linspace step and at the level the step moves to."""
  steps = np.round(np.linspace(0, T - 1, nfe)).astype(int)
  ab = LINEAR_ABAR[steps]
  if respacing == "respaced":
    return ab, np.append(1.0, ab[:-1])
  # The ablation: one original step, tau -> tau - 1 (the data at the very end).
  ab_prev = np.append(1.0, LINEAR_ABAR)[steps]
  ab_prev[0] = 1.0
  return ab, ab_prev


def _propagated_variance(sampler, nfe, respacing="respaced", variance="small"):
  """Exact output variance per component of the sampler on the Gaussian oracle."""
  ab, ab_prev = _step_levels(nfe, respacing)
  var = np.ones_like(LAM)
  for a, ap in zip(ab[::-1], ab_prev[::-1]):
    v = a * LAM + 1.0 - a
    eps_gain = np.sqrt(1.0 - a) / v
    x0_gain = np.sqrt(a) * LAM / v   # E[x0 | x_t] = sqrt(ab) lam x_t / v
    beta = 1.0 - a / ap
    if sampler == "ddpm":
      # Ho et al. eq. 7: mean = sqrt(ab') beta / (1 - ab) x0 + sqrt(alpha) (1 - ab') / (1 - ab) x_t.
      gain = (np.sqrt(ap) * beta / (1.0 - a) * x0_gain
              + np.sqrt(1.0 - beta) * (1.0 - ap) / (1.0 - a))
      noise_var = beta * (1.0 - ap) / (1.0 - a) if variance == "small" else beta
    else:
      # Song et al. eq. 12 with eta = 0.
      gain = np.sqrt(ap) * x0_gain + np.sqrt(1.0 - ap) * eps_gain
      noise_var = 0.0
    noise_var = noise_var if ap < 1.0 else 0.0  # no noise at the last step
    var = gain**2 * var + noise_var
  return var


_ORACLE_CONFIGS = {
    "ddpm-20": dict(sampler="ddpm", nfe=20),
    "ddpm-50": dict(sampler="ddpm", nfe=50),
    "ddim-20": dict(sampler="ddim", nfe=20, eta=0.0),
    "ddim-50": dict(sampler="ddim", nfe=50, eta=0.0),
    "ddpm-50-large": dict(sampler="ddpm", nfe=50, variance="large"),
    "ddpm-50-none": dict(sampler="ddpm", nfe=50, respacing="none"),
}


@pytest.fixture(scope="module")
def oracle_variances():
  """Empirical output variance per component for every config: one compile each."""
  out = {}
  for i, (name, kwargs) in enumerate(_ORACLE_CONFIGS.items()):
    x = diffusion.sample(_oracle_eps, diffusion.make_schedule("linear", T),
                         (NUM_SAMPLES, LAM.size), jax.random.key(100 + i), clip_x0=False,
                         **kwargs)
    out[name] = np.var(np.asarray(x, np.float64), axis=0, ddof=1)
  return out


def _assert_matches_propagation(empirical, exact):
  # The sampler's output is exactly Gaussian with the propagated variance, so the ratio
  # minus 1 is a Monte-Carlo error with SE VAR_SE = 0.022 per component, independent across
  # the 32 components. Per component 5 SE (P(any of 32 beyond) ~ 2e-5); their mean has SE
  # VAR_SE / sqrt(32) = 0.004, allowed 4 SE. float32 arithmetic adds ~1e-5 at most.
  rel = empirical / exact - 1.0
  assert np.max(np.abs(rel)) < 5 * VAR_SE, rel
  assert abs(np.mean(rel)) < 4 * VAR_SE / math.sqrt(LAM.size), np.mean(rel)


@pytest.mark.parametrize("name", ["ddpm-20", "ddpm-50", "ddim-20", "ddim-50", "ddpm-50-large"])
def test_oracle_sampler_matches_exact_propagation(oracle_variances, name):
  cfg = _ORACLE_CONFIGS[name]
  exact = _propagated_variance(cfg["sampler"], cfg["nfe"], variance=cfg.get("variance", "small"))
  _assert_matches_propagation(oracle_variances[name], exact)


def test_oracle_bf16_state_tracks_float32():
  # Same rng, bf16 vs float32 state (paired, so no Monte-Carlo term). Each step rounds the
  # state and the oracle's eps to bf16: 8 significant bits, round-off uniform within half
  # an ulp, i.e. rms <= 2^-8 / sqrt(3) = 0.23% relative. Propagating ~41 such independent
  # errors through the step gains (done in float64 while writing this test) predicts a
  # relative rms error of 1.1% (lam = 1) to 2.8% (lam = 1e-3) at 20 steps; measured 2.0%
  # at most. 5% leaves room for the partly coherent part (a state whose per-step change is
  # below bf16 resolution stalls rather than rounding randomly).
  traced_dtypes = []
  def eps_fn(x, t):
    traced_dtypes.append(x.dtype)
    return _oracle_eps(x, t)
  kwargs = dict(sampler="ddim", nfe=20, eta=0.0, clip_x0=False, rng=jax.random.key(9))
  shape = (NUM_SAMPLES, LAM.size)
  linear = diffusion.make_schedule("linear", T)
  x32 = np.asarray(diffusion.sample(eps_fn, linear, shape, **kwargs), np.float64)
  x16 = diffusion.sample(eps_fn, linear, shape, dtype=jnp.bfloat16, **kwargs)
  assert x16.dtype == jnp.bfloat16 and traced_dtypes[-1] == jnp.bfloat16
  err = np.sqrt(np.mean((np.asarray(x16, np.float64) - x32) ** 2, axis=0) / np.var(x32, axis=0))
  assert np.all(err < 0.05), err


def _ddim_variance_closed_form(nfe):
  """Output variance / lam of DDIM(eta=0) with the optimal eps, without a step recursion.

  Put sqrt(ab lam) = sqrt(v) sin(th), sqrt(1 - ab) = sqrt(v) cos(th). A DDIM step maps x to
  sqrt(v'/v) cos(th' - th) x, so var / v shrinks by cos^2(th' - th) per step, starting from
  1 / v_T (x_T has variance 1).
  """
  ab, ab_prev = _step_levels(nfe, "respaced")
  angle = lambda a: np.arctan2(np.sqrt(np.outer(a, LAM)), np.sqrt(1.0 - a)[:, None])
  dth = angle(ab_prev) - angle(ab)
  v_start = ab[-1] * LAM + 1.0 - ab[-1]
  return np.prod(np.cos(dth) ** 2, axis=0) / v_start, np.sum(dth**2, axis=0)


@pytest.mark.parametrize("nfe", [20, 50])
def test_oracle_ddim_propagation_matches_closed_form_and_bound(nfe):
  # The recursion and the angle product are two derivations of the same number: agreement to
  # float64 round-off (1e-10) checks the propagation itself. Bound: cos^2(d) >= 1 - d^2, so
  # 1 - sum(dth^2) <= ratio * v_T <= 1; the deficit is discretisation (finite angle steps).
  ratio_closed, sum_dth2 = _ddim_variance_closed_form(nfe)
  ratio = _propagated_variance("ddim", nfe) / LAM
  np.testing.assert_allclose(ratio, ratio_closed, rtol=1e-10)
  v_start = LINEAR_ABAR[-1] * LAM + 1.0 - LINEAR_ABAR[-1]
  assert np.all(ratio * v_start <= 1.0 + 1e-12)
  assert np.all(ratio * v_start >= 1.0 - sum_dth2)


@pytest.mark.parametrize("nfe", [20, 50])
def test_oracle_ddpm_propagation_within_derived_bound(nfe):
  # Under the true process, x_prev = c0 x0 + ct x_t + sqrt(beta~) z exactly; the sampler uses
  # E[x0 | x_t] for x0 and so misses c0^2 Var[x0 | x_t] = c0^2 lam (1 - ab) / v per step.
  # With the gain m^2 <= v' / v, the relative deficit r = 1 - var / v obeys
  # min(r, 0) <= r' <= max(r, 0) + c0^2 lam (1 - ab) / (v v'), and r starts at
  # 1 - 1 / v_T = -ab_T (1 - lam) / v_T. Hence
  #   -ab_T (1 - lam) / v_T <= 1 - ratio <= sum_k c0_k^2 lam (1 - ab_k) / (v_k v'_k).
  ab, ab_prev = _step_levels(nfe, "respaced")
  v = np.outer(ab, LAM) + (1.0 - ab)[:, None]
  v_prev = np.outer(ab_prev, LAM) + (1.0 - ab_prev)[:, None]
  c0 = np.sqrt(ab_prev) * (1.0 - ab / ab_prev) / (1.0 - ab)
  upper = np.sum((c0**2 * (1.0 - ab))[:, None] * LAM / (v * v_prev), axis=0)
  lower = -ab[-1] * (1.0 - LAM) / (ab[-1] * LAM + 1.0 - ab[-1])
  deficit = 1.0 - _propagated_variance("ddpm", nfe) / LAM
  assert np.all(deficit <= upper + 1e-12) and np.all(deficit >= lower - 1e-12)
  # The bound is not vacuous: it allows well under 100% deficit for the large components.
  assert upper[0] < 0.5


@pytest.mark.parametrize("name", ["ddpm-20", "ddpm-50", "ddim-20", "ddim-50"])
def test_oracle_reproduces_data_variance_within_bounds(oracle_variances, name):
  # Sampler vs lam directly, with the bounds above widened by 5 SE of Monte-Carlo error.
  # What the bounds allow is large at small lam: a linspace step over linear betas jumps from
  # t ~ 20 (nfe 50) or ~53 (nfe 20) straight to 0, across the whole range where a component
  # with std 0.03 emerges from the noise, and the posterior mean there has less variance.
  cfg = _ORACLE_CONFIGS[name]
  ratio = oracle_variances[name] / LAM
  v_start = LINEAR_ABAR[-1] * LAM + 1.0 - LINEAR_ABAR[-1]
  if cfg["sampler"] == "ddim":
    _, sum_dth2 = _ddim_variance_closed_form(cfg["nfe"])
    low, high = (1.0 - sum_dth2) / v_start, 1.0 / v_start
  else:
    ab, ab_prev = _step_levels(cfg["nfe"], "respaced")
    v = np.outer(ab, LAM) + (1.0 - ab)[:, None]
    v_prev = np.outer(ab_prev, LAM) + (1.0 - ab_prev)[:, None]
    c0 = np.sqrt(ab_prev) * (1.0 - ab / ab_prev) / (1.0 - ab)
    low = 1.0 - np.sum((c0**2 * (1.0 - ab))[:, None] * LAM / (v * v_prev), axis=0)
    high = 1.0 / v_start
  assert np.all(ratio >= np.maximum(low, 0.0) * (1 - 5 * VAR_SE)), ratio
  assert np.all(ratio <= high * (1 + 5 * VAR_SE)), ratio


def test_oracle_no_respacing_leaves_noise(oracle_variances):
  # The ablation moves x by one original step (tau -> tau - 1) per kept step: the mean keeps
  # a fraction ct ~ 1 of x_t and almost none of the unit noise of x_T is removed over 50
  # steps. The last step's x0 prediction (gain lam / (lam + 1e-4) ~ 0.9 at lam = 1e-3)
  # passes it through, so every component comes out with variance O(0.1 - 1) whatever its
  # lam: hundreds of times lam at lam ~ 1e-3 -- the speckle of the seed grids. The sampler
  # must match the exact propagation of the ablation, and miss lam by > 100x there.
  empirical = oracle_variances["ddpm-50-none"]
  _assert_matches_propagation(empirical, _propagated_variance("ddpm", 50, respacing="none"))
  small = LAM < 2e-3
  assert np.all(empirical[small] / LAM[small] > 100.0), empirical / LAM
  assert np.all(empirical > 0.1)
  # The respaced sampler on the same components stays below lam (bound above, + 5 SE).
  assert np.all(oracle_variances["ddpm-50"][small] / LAM[small] < 1.0 + 5 * VAR_SE)
