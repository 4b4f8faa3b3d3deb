"""Tests for diffdyn.curvature against exact Hessians of small problems.

Most tests run in float64 (scoped to the test by the `x64` fixture) so that identities which
hold exactly in real arithmetic can be checked at rounding level; statistical checks use
tolerances derived from the estimators' known variances, stated next to each assertion.
"""
import math
import types

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from diffdyn import curvature
from diffdyn import diffusion


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _mlp_problem(seed=0, width=5):
  """A tanh MLP regression loss with pytree params (32 parameters) and its exact Hessian."""
  rs = np.random.RandomState(seed)
  params = {"dense1": {"kernel": rs.randn(3, width), "bias": 0.1 * rs.randn(width)},
            "dense2": {"kernel": rs.randn(width, 2), "bias": 0.1 * rs.randn(2)}}
  params = jax.tree.map(jnp.asarray, params)
  x, y = jnp.asarray(rs.randn(16, 3)), jnp.asarray(rs.randn(16, 2))

  def loss(p):
    h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
    return jnp.mean(jnp.square(h @ p["dense2"]["kernel"] + p["dense2"]["bias"] - y))

  flat, unravel = ravel_pytree(params)
  hessian = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat))
  return loss, params, hessian


def _quadratic_problem(eigenvalues, seed=0):
  """0.5 x^T A x over a two-leaf pytree, with A = U diag(eigenvalues) U^T, U random orthogonal."""
  dim = len(eigenvalues)
  rs = np.random.RandomState(seed)
  u = np.linalg.qr(rs.randn(dim, dim))[0]
  a = (u * np.asarray(eigenvalues)) @ u.T
  params = {"a": jnp.asarray(rs.randn(10)), "b": jnp.asarray(rs.randn(dim - 10))}

  def loss(p):
    x = ravel_pytree(p)[0]
    return 0.5 * x @ jnp.asarray(a) @ x

  return loss, params, a


def _hutchinson_variance(h):
  """Var(v^T H v) for a Rademacher v: 2 (||H||_F^2 - sum_i H_ii^2)."""
  return 2.0 * (np.sum(h * h) - np.sum(np.diag(h) ** 2))


# ---------------------------------------------------------------------------------------
# hvp
# ---------------------------------------------------------------------------------------
def test_hvp_matches_explicit_hessian_on_mlp(x64):
  loss, params, hessian = _mlp_problem()
  flat, unravel = ravel_pytree(params)
  v = np.random.RandomState(1).randn(flat.size)
  got = ravel_pytree(jax.jit(curvature.hvp, static_argnums=0)(loss, params, unravel(v)))[0]
  # Reference: the dense jax.hessian times v. Both are exact in real arithmetic and differ
  # only by float64 rounding (~1e-16 times a few dozen operations).
  np.testing.assert_allclose(got, hessian @ v, rtol=0, atol=1e-12 * np.linalg.norm(hessian @ v))


@pytest.mark.slow  # a UNet HVP against finite differences
def test_hvp_matches_gradient_differences_on_unet():
  unet = pytest.importorskip("diffdyn.models.unet")
  model = unet.UNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(4,), dropout=0.0)
  rs = np.random.RandomState(0)
  # 8x8: both levels, the down- and upsampling and the attention block of a real UNet.
  x0 = jnp.asarray(rs.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  noise = jnp.asarray(rs.randn(2, 8, 8, 3), jnp.float32)
  t = jnp.array([100, 700], jnp.int32)
  schedule = diffusion.make_schedule("linear", 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x0, t, train=False)["params"])

  def random_leaf(shape):
    # Fan-in scaled weights instead of the DDPM init, whose zero-initialised output layers
    # would make the Hessian nearly vanish away from the last layer.
    fan_in = np.prod(shape[:-1]) if len(shape) > 1 else 100.0
    return jnp.asarray(rs.randn(*shape) / np.sqrt(fan_in), jnp.float32)

  params = jax.tree.map(lambda s: random_leaf(s.shape), shapes)
  v = jax.tree.map(lambda s: jnp.asarray(rs.randn(*s.shape), jnp.float32), shapes)

  def loss(p):
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    out = model.apply({"params": p}, x_t, t, train=False)
    return diffusion.per_example_mse(out, noise).mean()

  # One compiled function returns the gradient (primal) and curvature.hvp (tangent); the
  # gradient at p +- eps v gives the finite-difference reference without another compile.
  @jax.jit
  def grad_and_hvp(p):
    return jax.grad(loss)(p), curvature.hvp(loss, p, v)

  eps = 1e-3
  hv = ravel_pytree(grad_and_hvp(params)[1])[0]
  g_plus = ravel_pytree(grad_and_hvp(jax.tree.map(lambda a, b: a + eps * b, params, v))[0])[0]
  g_minus = ravel_pytree(grad_and_hvp(jax.tree.map(lambda a, b: a - eps * b, params, v))[0])[0]
  finite_difference = (g_plus - g_minus) / (2 * eps)
  # The model computes in float32 (GroupNorm and the output are float32 whatever the
  # params), so this runs in float32. Central differences err by O(eps^2) truncation
  # (measured 1.4e-4 relative at eps=1e-3, falling 10x per 3x smaller eps) plus float32
  # rounding ~1e-7 * |g| / eps ~ 1e-4; 2e-3 leaves a 10x margin while a wrong product (a
  # dropped term or sign) is off by O(1).
  rel_err = np.linalg.norm(finite_difference - hv) / np.linalg.norm(hv)
  assert rel_err < 2e-3, rel_err


# ---------------------------------------------------------------------------------------
# Hutchinson
# ---------------------------------------------------------------------------------------
def test_hutchinson_is_unbiased_with_the_theoretical_variance(x64):
  loss, params, h = _mlp_problem()
  num_probes = 2000
  stats = jax.jit(lambda p, rng: curvature.hutchinson(loss, p, rng, num_probes, chunk_size=500))(
      params, jax.random.key(0))
  probes = np.asarray(stats["probes"])
  assert probes.shape == (num_probes,)
  assert np.min(np.linalg.eigvalsh(h)) < 0 < np.max(np.linalg.eigvalsh(h))  # indefinite

  # Mean: within 4 standard errors of the exact trace, the standard error computed from the
  # exact per-probe variance. By the CLT a correct estimator fails this with p ~ 6e-5.
  sigma2 = _hutchinson_variance(h)
  assert abs(stats["mean"] - np.trace(h)) < 4 * math.sqrt(sigma2 / num_probes)

  # Variance: the sample variance s^2 has standard error sqrt((m4 - s^4) / n) (delta method,
  # m4 the fourth central moment, estimated from the probes since Rademacher quadratic forms
  # are not Gaussian); 4 of them again.
  s2 = float(stats["std"]) ** 2
  m4 = np.mean((probes - probes.mean()) ** 4)
  assert abs(s2 - sigma2) < 4 * math.sqrt((m4 - s2 ** 2) / num_probes), (s2, sigma2)
  np.testing.assert_allclose(stats["stderr"], stats["std"] / math.sqrt(num_probes), rtol=1e-12)

  # tr(H^2): ||H v||^2 = v^T H^2 v is itself a Hutchinson probe of H^2, so its variance is
  # 2 (||H^2||_F^2 - sum diag(H^2)^2); 4 standard errors.
  h2 = h @ h
  assert abs(stats["tr_h2"] - np.trace(h2)) < 4 * math.sqrt(_hutchinson_variance(h2) / num_probes)


def test_hutchinson_probes_are_rademacher(x64):
  # With +-1 probes, v^T H v = sum_i H_ii v_i^2 = tr(H) for a diagonal H: every probe is
  # exact. Gaussian probes would still be unbiased but scatter by sqrt(2 sum H_ii^2).
  scales = {"a": jnp.linspace(0.5, 2.0, 6), "b": jnp.linspace(-1.0, 1.0, 4).reshape(2, 2)}
  params = {"a": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones((2, 2))}
  separable = lambda p: sum(jnp.sum(s * jnp.cosh(x)) for s, x in
                            zip(jax.tree.leaves(scales), jax.tree.leaves(p)))
  exact = sum(jnp.sum(s * jnp.cosh(x)) for s, x in
              zip(jax.tree.leaves(scales), jax.tree.leaves(params)))
  stats = jax.jit(lambda rng: curvature.hutchinson(separable, params, rng, 8))(jax.random.key(7))
  np.testing.assert_allclose(stats["probes"], exact, rtol=1e-12)


def test_hutchpp_has_lower_variance_than_hutchinson_on_decaying_spectrum(x64):
  eigenvalues = 1.0 / np.arange(1, 41) ** 2
  loss, params, a = _quadratic_problem(eigenvalues)
  num_probes, num_seeds = 12, 300
  keys = jax.random.split(jax.random.key(0), num_seeds)

  def estimates(estimator):
    fn = lambda rng: curvature.hutchinson(loss, params, rng, num_probes, estimator)
    return jax.jit(jax.vmap(fn))(keys)

  plain, plus = estimates("hutchinson"), estimates("hutch++")
  var_plain, var_plus = np.var(plain["mean"], ddof=1), np.var(plus["mean"], ddof=1)
  # Reference: Hutchinson's exact variance at 12 probes, 2 (||A||_F^2 - sum A_ii^2) / 12.
  # Across 300 seeds the sample variance is within ~15% of it (relative sd sqrt(2/299) times
  # a kurtosis factor), so a factor 1.5 either way is a loose but failing-capable check.
  exact_plain = _hutchinson_variance(a) / num_probes
  assert exact_plain / 1.5 < var_plain < 1.5 * exact_plain, (var_plain, exact_plain)
  # Hutch++ deflates the top ~4 eigenvalues, which hold ~99% of ||A||_F^2 here, so its
  # variance is smaller by well over an order of magnitude; requiring 10x leaves room for the
  # ~15% noise of each sample variance.
  assert var_plus < var_plain / 10, (var_plus, var_plain)
  # Both remain unbiased: 4 standard errors of the across-seed mean.
  for est, var in ((plain, var_plain), (plus, var_plus)):
    assert abs(np.mean(est["mean"]) - np.trace(a)) < 4 * math.sqrt(var / num_seeds)


def test_hutchpp_is_unbiased_on_indefinite_matrix_and_reports_its_noise(x64):
  # Large eigenvalues of both signs: a deflation that assumed a PSD matrix would be biased.
  eigenvalues = np.concatenate([[-6.0, 5.0, -4.0, 3.0], 0.5 * np.cos(np.arange(36))])
  loss, params, a = _quadratic_problem(eigenvalues, seed=3)
  num_probes, num_seeds = 9, 400
  keys = jax.random.split(jax.random.key(1), num_seeds)
  fn = lambda rng: curvature.hutchinson(loss, params, rng, num_probes, "hutch++")
  stats = jax.jit(jax.vmap(fn))(keys)
  assert stats["probes"].shape == (num_seeds, num_probes - 2 * (num_probes // 3))
  means = np.asarray(stats["mean"])
  var = np.var(means, ddof=1)
  # Unbiased: the across-seed mean is within 4 standard errors of tr(A).
  assert abs(means.mean() - np.trace(a)) < 4 * math.sqrt(var / num_seeds)
  # The reported stderr is honest: Hutch++ is exact in conditional mean given its sketch, so
  # E[stderr^2] = Var(estimate). Both sides are averages over 400 seeds of noisy quantities
  # (relative sd ~10-20% each with 3 residual probes per seed); a factor 1.5 either way.
  ratio = np.mean(np.square(stats["stderr"])) / var
  assert 1 / 1.5 < ratio < 1.5, ratio


# ---------------------------------------------------------------------------------------
# Eigenvalues
# ---------------------------------------------------------------------------------------
def test_top_eigenvalue_matches_eigh(x64):
  # Most negative eigenvalue has the largest magnitude: top_eigenvalue is largest algebraic.
  eigenvalues = np.concatenate([[-20.0, 10.0, 5.0, 4.5], np.linspace(-2, 2, 26)])
  loss, params, a = _quadratic_problem(eigenvalues, seed=4)
  rng = jax.random.key(3)

  @jax.jit
  def lanczos_estimates():
    return (curvature.lanczos_ritz_values(loss, params, rng, 30),
            curvature.top_k_eigenvalues(loss, params, rng, 3, num_iters=30),
            curvature.top_eigenvalue(loss, params, rng, num_iters=20))

  ritz_full, top3, top = lanczos_estimates()
  exact = np.linalg.eigvalsh(a)
  # 30 steps on a 30-dim matrix: the Krylov space is everything, so the Ritz values are the
  # eigenvalues up to float64 rounding scaled by ||A|| = 20.
  np.testing.assert_allclose(ritz_full, exact, rtol=0, atol=1e-9)
  np.testing.assert_allclose(top3, exact[::-1][:3], rtol=0, atol=1e-9)

  # 20 steps < 30 dims. Kaniel-Paige: error <= (l1 - ln) (tan(phi) / T_19(1 + 2 g))^2 with
  # g = (l1 - l2) / (l2 - ln) = 0.2, T_19(1.4) ~ 7e6, tan^2(phi) ~ 30 for a random start:
  # ~2e-11, so 1e-8 relative holds with room; a Rayleigh quotient never exceeds the truth.
  assert top <= exact[-1] + 1e-9
  np.testing.assert_allclose(top, exact[-1], rtol=1e-8)


def test_top_eigenvalue_on_mlp_hessian(x64):
  loss, params, h = _mlp_problem(seed=5)
  top = jax.jit(lambda rng: curvature.top_eigenvalue(loss, params, rng, 32))(jax.random.key(4))
  # 32 steps on 32 parameters: exact up to rounding (see above).
  np.testing.assert_allclose(top, np.linalg.eigvalsh(h)[-1], rtol=1e-9)


def test_lanczos_restarts_on_invariant_subspace(x64):
  # H = -I: H v = -v exactly, so after one step the residual is exactly zero. Without a
  # restart the remaining steps would add spurious zero Ritz values, and 0 > -1 would be
  # reported as the top eigenvalue.
  minus_identity = lambda p: -0.5 * sum(jnp.sum(x * x) for x in jax.tree.leaves(p))
  identity_params = {"a": jnp.ones(10), "b": jnp.ones((2, 3))}
  # Two distinct eigenvalues: the Krylov space is 2-dimensional and the residual after two
  # steps is rounding noise rather than zero.
  two_levels, two_level_params, _ = _quadratic_problem(np.repeat([-1.0, -4.0], 6), seed=5)
  rng = jax.random.key(5)
  for loss, params, top, bottom in ((minus_identity, identity_params, -1.0, -1.0),
                                    (two_levels, two_level_params, -1.0, -4.0)):
    ritz = jax.jit(lambda: curvature.lanczos_ritz_values(loss, params, rng, num_iters=6))()
    assert np.all(np.isfinite(ritz))
    # Every Ritz value is a Rayleigh quotient of H, so it lies in [bottom, top] up to rounding.
    assert np.all(ritz <= top + 1e-9) and np.all(ritz >= bottom - 1e-9), ritz
    np.testing.assert_allclose(ritz[-1], top, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Loss scaling (the Min-SNR confound)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["hutchinson", "hutch++"])
def test_scaling_the_loss_scales_every_estimate(x64, estimator):
  # Min-SNR-gamma multiplies eps-MSE terms by min(SNR, gamma)/SNR <= 1: a weighted loss has a
  # proportionally smaller trace without any change in the model's geometry.
  loss, params, _ = _mlp_problem()
  c = 0.3

  @jax.jit
  def measure(scale, rng):
    scaled_loss = lambda p: scale * loss(p)
    stats = curvature.hutchinson(scaled_loss, params, rng, 9, estimator)
    stats["top_eig"] = curvature.top_eigenvalue(scaled_loss, params, rng, 10)
    return stats

  rng = jax.random.key(6)
  base, scaled = measure(1.0, rng), measure(c, rng)
  # Same rng -> same probes; scaling only changes float64 rounding.
  for name in ("mean", "std", "stderr", "probes", "top_eig"):
    np.testing.assert_allclose(scaled[name], c * base[name], rtol=1e-9, err_msg=name)
  np.testing.assert_allclose(scaled["tr_h2"], c ** 2 * base["tr_h2"], rtol=1e-9)


# ---------------------------------------------------------------------------------------
# get_curvature_fn / make_probe_batch
# ---------------------------------------------------------------------------------------
NUM_TIMESTEPS = 20
BATCH = 8
BANDS = 4


def _toy_setup():
  """A per-pixel tanh eps-model with 8 parameters on a fixed probe batch."""
  schedule = diffusion.make_schedule("linear", NUM_TIMESTEPS, beta_end=0.2)
  rs = np.random.RandomState(7)
  images = rs.randint(0, 256, (12, 4, 4, 2)).astype(np.uint8)
  batch = curvature.make_probe_batch(jax.random.key(8), images, BATCH, NUM_TIMESTEPS)
  # float64 under the x64 fixture, float32 otherwise.
  float_dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
  batch = tuple(x.astype(float_dtype) if x.dtype == jnp.float32 else x for x in batch)
  params = {"w": rs.randn(2, 2), "b": 0.1 * rs.randn(2), "s": rs.randn(2)}
  params = jax.tree.map(lambda x: jnp.asarray(x, float_dtype), params)

  def per_example_loss(p, x0, t, noise):
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    time = (t.astype(x0.dtype) / NUM_TIMESTEPS)[:, None, None, None]
    pred = jnp.tanh(x_t @ p["w"] + p["b"] + p["s"] * time)
    # float64 MSE (diffusion.per_example_mse would round to float32).
    return jnp.mean(jnp.square(pred - noise), axis=(1, 2, 3))

  return schedule, batch, params, per_example_loss


def _exact_hessians(per_example_loss, params, batch, coefficients):
  """(m, P, P) Hessians of the objectives coefficients[j] . per_example_loss."""
  flat, unravel = ravel_pytree(params)
  objectives = lambda f: jnp.asarray(coefficients) @ per_example_loss(unravel(f), *batch)
  return np.asarray(jax.jit(jax.hessian(objectives))(flat))


def _metric_keys(prefix, num_probe_values, top_eig):
  keys = {f"{prefix}hutch_trace_{n}" for n in ("mean", "std", "stderr")} | {f"{prefix}tr_h2"}
  keys |= {f"{prefix}hutch_trace_probe/{i}" for i in range(num_probe_values)}
  return keys | ({f"{prefix}top_eig"} if top_eig else set())


def test_curvature_fn_matches_exact_weighted_and_reference_traces(x64):
  schedule, batch, params, per_example_loss = _toy_setup()
  weights = diffusion.loss_weight(schedule, "minsnr", gamma=1.0)
  assert np.ptp(weights) > 0.5  # the weighting really differs from the reference loss
  num_probes = 64
  fn = curvature.get_curvature_fn(per_example_loss, weights, NUM_TIMESTEPS, num_probes=num_probes,
                                  objective="both", t_bands=BANDS, top_eig_iters=8)
  metrics = fn(params, batch, jax.random.key(9))

  band_keys = {f"curvature/band/{k}/hutch_trace_{n}" for k in range(BANDS)
               for n in ("mean", "stderr")}
  assert set(metrics) == (_metric_keys("curvature/", num_probes, True)
                          | _metric_keys("curvature/ref/", num_probes, True) | band_keys)

  t = np.asarray(batch[1])
  bands = np.asarray(diffusion.timestep_bins(t, NUM_TIMESTEPS, BANDS))
  counts = np.bincount(bands, minlength=BANDS)
  band_rows = (bands[None, :] == np.arange(BANDS)[:, None]) / counts[:, None]
  h_train, h_ref, *h_bands = _exact_hessians(
      per_example_loss, params, batch,
      np.concatenate([[weights[t] / BATCH, np.full(BATCH, 1.0 / BATCH)], band_rows]))
  # Traces: within 4 exact standard errors sqrt(Var(v^T H v) / n) of the exact traces of the
  # weighted and unweighted objectives (CLT; a correct estimator fails with p ~ 1e-4).
  for prefix, h in (("curvature/", h_train), ("curvature/ref/", h_ref)):
    err = abs(metrics[f"{prefix}hutch_trace_mean"] - np.trace(h))
    assert err < 4 * math.sqrt(_hutchinson_variance(h) / num_probes), (prefix, err)
    # 8 Lanczos steps on 8 parameters: exact up to float64 rounding.
    np.testing.assert_allclose(metrics[f"{prefix}top_eig"], np.linalg.eigvalsh(h)[-1], rtol=1e-9)
  # The setup is only a test of the weighting if the two objectives differ.
  assert abs(np.trace(h_train) - np.trace(h_ref)) > 0.1 * abs(np.trace(h_ref))

  # Bands: the reference loss is sum_k (n_k / B) band_k and the probes are shared, so the
  # identity holds probe by probe, hence for the means, up to float64 rounding. The evenly
  # spread timesteps put n_k = B / K examples in each band.
  np.testing.assert_array_equal(counts, BATCH // BANDS)
  band_means = [metrics[f"curvature/band/{k}/hutch_trace_mean"] for k in range(BANDS)]
  np.testing.assert_allclose(np.dot(counts / BATCH, band_means),
                             metrics["curvature/ref/hutch_trace_mean"], rtol=1e-10)
  for k, h_band in enumerate(h_bands):
    err = abs(band_means[k] - np.trace(h_band))
    assert err < 4 * math.sqrt(_hutchinson_variance(h_band) / num_probes), (k, err)


def test_lanczos_measurements_of_both_objectives_match_each_exact_hessian(x64):
  # One mapped Lanczos program serves both objectives; each must see its own Hessian.
  schedule, batch, params, per_example_loss = _toy_setup()
  weights = diffusion.loss_weight(schedule, "minsnr", gamma=1.0)
  t = np.asarray(batch[1])
  hessians = _exact_hessians(per_example_loss, params, batch,
                             [weights[t] / BATCH, np.full(BATCH, 1.0 / BATCH)])
  nu = jax.tree.map(lambda x: 1e-4 + 1e-5 * x ** 2, params)
  pre = curvature.adam_preconditioner(nu, 10, 0.9, 0.999, 1e-8, 2e-4)
  p_diag = np.asarray(ravel_pytree(pre.diagonal)[0])
  num_params = p_diag.size
  rng = jax.random.key(35)
  sharpness = curvature.get_precond_sharpness_fn(per_example_loss, weights, NUM_TIMESTEPS,
                                                 num_iters=num_params)(params, batch, rng, pre)
  density = curvature.get_spectral_density_fn(per_example_loss, weights, NUM_TIMESTEPS,
                                              num_runs=1, num_steps=num_params)(
                                                  params, batch, rng)
  # Reference: numpy's eigh of each objective's exact Hessian (and of P^-1/2 H P^-1/2). As many
  # Lanczos steps as parameters span everything: the extreme Ritz values are the extreme
  # eigenvalues up to float64 rounding (scaled by P's condition number, ~10): 1e-9.
  for (prefix, name), h in zip((("curvature/", "train"), ("curvature/ref/", "ref")), hessians):
    exact = np.linalg.eigvalsh(h / np.sqrt(np.outer(p_diag, p_diag)))[-1]
    np.testing.assert_allclose(sharpness[f"{prefix}precond_sharpness"], exact, rtol=1e-9)
    nodes = np.asarray(density[f"{name}_nodes"])
    eigenvalues = np.linalg.eigvalsh(h)
    np.testing.assert_allclose([nodes.min(), nodes.max()], eigenvalues[[0, -1]], rtol=1e-9)
  # The two objectives' spectra differ, so an objective measured in place of the other fails.
  assert not np.allclose(np.linalg.eigvalsh(hessians[0]), np.linalg.eigvalsh(hessians[1]),
                         rtol=1e-3)


def test_curvature_fn_unit_weights_and_chunking(x64):
  _, batch, params, per_example_loss = _toy_setup()
  ones = np.ones(NUM_TIMESTEPS)
  kwargs = dict(num_probes=8, objective="both", t_bands=BANDS)
  whole = curvature.get_curvature_fn(per_example_loss, ones, NUM_TIMESTEPS, **kwargs)
  chunked = curvature.get_curvature_fn(per_example_loss, ones, NUM_TIMESTEPS, chunk_size=3,
                                       **kwargs)
  rng = jax.random.key(10)
  a, b = whole(params, batch, rng), chunked(params, batch, rng)
  assert set(a) == set(b)
  # Same rng -> same probe vectors whatever the chunking; only float64 rounding differs.
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-10, atol=1e-14, err_msg=key)
  # With unit weights the train objective is the reference objective, probe by probe.
  for key in _metric_keys("curvature/", 8, False):
    np.testing.assert_allclose(a[key], a[key.replace("curvature/", "curvature/ref/")],
                               rtol=1e-12, atol=1e-14, err_msg=key)


def test_curvature_fn_hutchpp_and_reference_only(x64):
  schedule, batch, params, per_example_loss = _toy_setup()
  weights = diffusion.loss_weight(schedule, "minsnr", gamma=1.0)
  # 26 matvecs: 8 sketch vectors for 8 parameters make Q a full orthogonal matrix, whatever
  # the rank of H S, so the exact part is tr(H), the deflated residual is zero and all 10
  # residual probe values equal the trace up to float64 rounding (1e-10 is generous for an
  # 8x8 QR). Chunks of 5 exercise chunking with a remainder (8 = 5 + 3).
  fn = curvature.get_curvature_fn(per_example_loss, weights, NUM_TIMESTEPS, num_probes=26,
                                  estimator="hutch++", objective="reference", chunk_size=5)
  metrics = fn(params, batch, jax.random.key(11))
  assert set(metrics) == _metric_keys("curvature/ref/", 10, False)
  (h_ref,) = _exact_hessians(per_example_loss, params, batch, np.full((1, BATCH), 1.0 / BATCH))
  for i in range(10):
    np.testing.assert_allclose(metrics[f"curvature/ref/hutch_trace_probe/{i}"], np.trace(h_ref),
                               rtol=1e-10)
  assert metrics["curvature/ref/hutch_trace_stderr"] < 1e-10 * abs(np.trace(h_ref))


def _equations(jaxpr):
  """Every equation of a jaxpr, including those of nested jaxprs (jit, loops, vmapped maps)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns"):
          yield from _equations(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _equations(sub.jaxpr)


def test_curvature_fn_measures_in_float32_at_full_matmul_precision():
  # bfloat16 training params must be promoted to float32, and every matmul traced with
  # HIGHEST precision (GPUs would otherwise use TF32). Checked on the jaxpr: no GPU and no
  # compile needed.
  _, batch, params, per_example_loss = _toy_setup()
  params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  fn = curvature.get_curvature_fn(per_example_loss, np.ones(NUM_TIMESTEPS), NUM_TIMESTEPS,
                                  num_probes=4, objective="train", top_eig_iters=3)
  closed = jax.make_jaxpr(fn)(params_bf16, batch, jax.random.key(13))
  dots = [e for e in _equations(closed.jaxpr) if e.primitive.name == "dot_general"]
  assert dots
  for eqn in dots:
    assert eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2, eqn
    assert all(x.aval.dtype == jnp.float32 for x in eqn.invars), eqn
  assert all(aval.dtype == jnp.float32 for aval in closed.out_avals)


def test_make_probe_batch():
  images = np.broadcast_to(np.arange(50, dtype=np.uint8)[:, None, None, None], (50, 4, 4, 3))
  rng = jax.random.key(12)
  x0, t, noise = curvature.make_probe_batch(rng, images, 16, 1000)
  again = curvature.make_probe_batch(rng, images, 16, 1000)
  for first, second in zip((x0, t, noise), again):
    np.testing.assert_array_equal(first, second)  # a pure function of rng
  assert x0.dtype == jnp.float32 and noise.dtype == jnp.float32 and t.dtype == jnp.int32
  assert x0.shape == noise.shape == (16, 4, 4, 3)
  assert -1.0 <= float(x0.min()) and float(x0.max()) <= 1.0
  # Every image carries its own index, so distinct rows mean distinct images.
  index = np.round((np.asarray(x0[:, 0, 0, 0]) + 1.0) * 127.5).astype(int)
  assert len(set(index)) == 16
  np.testing.assert_array_equal(t, np.floor((np.arange(16) + 0.5) * 1000 / 16))
  assert np.all(np.bincount(np.asarray(diffusion.timestep_bins(t, 1000, 8)), minlength=8) == 2)


def test_bad_arguments_raise():
  loss = lambda p: jnp.sum(p ** 2)
  with pytest.raises(ValueError, match="estimator"):
    curvature.hutchinson(loss, jnp.ones(3), jax.random.key(0), estimator="xtrace")
  with pytest.raises(ValueError, match="num_probes"):
    curvature.hutchinson(loss, jnp.ones(3), jax.random.key(0), 2, "hutch++")
  per_example = lambda p, x0, t, noise: jnp.sum(p) * jnp.ones(x0.shape[0])
  with pytest.raises(ValueError, match="objective"):
    curvature.get_curvature_fn(per_example, np.ones(10), 10, objective="weighted")
  with pytest.raises(ValueError, match="loss_weights"):
    curvature.get_curvature_fn(per_example, np.ones(9), 10)


# ---------------------------------------------------------------------------------------
# Per-block traces
# ---------------------------------------------------------------------------------------
def _mlp_blocks():
  """Two partitions of the MLP's leaves (bias, kernel of dense1, then of dense2)."""
  blocks = {"layer/dense1": (0, 1), "layer/dense2": (2, 3), "kind/bias": (0, 2),
            "kind/kernel": (1, 3)}
  return curvature.ParamBlocks(num_leaves=4, blocks=blocks, scale_invariant={})


def _flat_index(params, leaves):
  """Positions in ravel_pytree(params) of the entries of the given leaves."""
  sizes = [x.size for x in jax.tree.leaves(params)]
  offsets = np.cumsum([0] + sizes)
  return np.concatenate([np.arange(offsets[l], offsets[l + 1]) for l in leaves])


def test_block_traces_add_up_and_match_exact_block_traces(x64):
  loss, params, h = _mlp_problem(seed=8)
  blocks = _mlp_blocks()
  num_probes = 1000
  stats = jax.jit(lambda rng: curvature.hutchinson(loss, params, rng, num_probes,
                                                   per_leaf=True))(jax.random.key(20))
  traces = curvature.block_traces(stats["leaf_probes"], params, blocks)
  # Each partition splits every probe into its blocks, so the block means add up to the
  # total probe by probe; only the float64 summation order differs.
  for partition in ("layer/", "kind/"):
    total = sum(traces[n]["mean"] for n in blocks.blocks if n.startswith(partition))
    np.testing.assert_allclose(total, stats["mean"], rtol=1e-12)
  for name, leaves in blocks.blocks.items():
    index = _flat_index(params, leaves)
    # Reference: the block's diagonal sub-matrix of the dense jax.hessian. The block probe is
    # v^T D H v = v^T M v with D the block's 0/1 diagonal and M = (D H + H D) / 2, so its
    # exact Rademacher variance is 2 (||M||_F^2 - sum_i M_ii^2); 4 exact standard errors
    # (CLT; a correct estimator fails with p ~ 6e-5).
    d = np.zeros(h.shape[0])
    d[index] = 1.0
    m = 0.5 * (d[:, None] * h + h * d[None, :])
    exact = np.trace(h[np.ix_(index, index)])
    err = abs(traces[name]["mean"] - exact)
    assert err < 4 * math.sqrt(_hutchinson_variance(m) / num_probes), (name, err, exact)
    # The stderr is the sample std of the block probes over sqrt(n); with 1000 probes it is
    # within ~10% of the exact one (kurtosis of a Rademacher quadratic form is small).
    np.testing.assert_allclose(traces[name]["stderr"],
                               math.sqrt(_hutchinson_variance(m) / num_probes), rtol=0.15)
    np.testing.assert_allclose(traces[name]["norm"],
                               np.linalg.norm(ravel_pytree(params)[0][index]), rtol=1e-12)


def _tiny_unet(channel_mult=(1,), attn_resolutions=(), base_channels=4):
  unet = pytest.importorskip("diffdyn.models.unet")
  return unet.UNet(base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=1,
                   attn_resolutions=attn_resolutions, dropout=0.0)


def test_unet_param_blocks_follow_the_forward_pass():
  import flax.linen as nn
  channel_mult, image_size, attn_resolutions = (1, 2, 2), 16, (4,)
  model = _tiny_unet(channel_mult, attn_resolutions)
  levels = curvature.unet_attention_levels(image_size, len(channel_mult), attn_resolutions)
  assert levels == [2]
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and len(context.module.path) == 1:
      calls.append((context.module.path[0], args[0].shape))
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, image_size, image_size, 3))
  with nn.intercept_methods(record):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32)))
  params = shapes["params"]
  blocks = curvature.unet_param_blocks(params, len(channel_mult), 1, levels)
  paths = [tuple(curvature._path_names(p))
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

  # Each partition holds every leaf exactly once, and the UNet's naming explains every leaf.
  for partition in ("stage/", "kind/"):
    members = sorted(i for n, v in blocks.blocks.items() if n.startswith(partition) for i in v)
    assert members == list(range(len(paths))), partition
  assert "stage/other" not in blocks.blocks and "kind/other" not in blocks.blocks
  assert {n for n in blocks.blocks if n.startswith("kind/")} == {
      "kind/conv", "kind/attention", "kind/norm", "kind/temb", "kind/head"}

  # Reference: the forward pass itself. A module of stage down<l>, mid or up<l> runs on
  # feature maps of size image_size / 2**l (mid at the deepest level), and the stages run in
  # the order down0, ..., mid, ..., up0.
  stage_of = {}
  for name, leaves in blocks.blocks.items():
    if name.startswith("stage/"):
      for leaf in leaves:
        stage_of.setdefault(paths[leaf][0], name[len("stage/"):])
  deepest = len(channel_mult) - 1
  order = []
  for module, shape in calls:
    stage = stage_of[module]
    if stage in ("stem", "temb", "head"):
      continue
    level = deepest if stage == "mid" else int(stage.lstrip("downup"))
    assert shape[1] == image_size // 2 ** level, (module, stage, shape)
    order.append(level if stage.startswith("down") else
                 deepest + 1 if stage == "mid" else 2 * deepest + 2 - level)
  assert order == sorted(order), calls
  assert stage_of["Dense_0"] == "temb" and stage_of["Conv_1"] == "head"
  # The attention blocks sit where the resolution is listed: 4 = 16 / 2**2.
  assert {stage_of[m] for m, _ in calls if m.startswith("AttnBlock")} == {"down2", "mid", "up2"}
  # One scale-invariant group per ResnetBlock, its first conv and time projection.
  num_res = sum(m.startswith("ResnetBlock") for m, _ in calls)
  groups = [g for gs in blocks.scale_invariant.values() for g in gs]
  assert len(groups) == num_res
  for group in groups:
    assert {paths[l][1] for l in group} == {"Conv_0", "Dense_0"}

  with pytest.raises(ValueError, match="ResnetBlock"):
    curvature.unet_param_blocks(params, len(channel_mult), 2, levels)


def _random_unet_params(shapes, rs, dtype=jnp.float32):
  # Fan-in scaled weights instead of the DDPM init, whose zero-initialised output layers
  # would make the Hessian nearly vanish away from the last layer. GroupNorm scales stay
  # near 1, as trained ones do, so activations are O(1) against GroupNorm's epsilon.
  def leaf(path, s):
    if curvature._path_names(path)[-1] == "scale":
      return jnp.asarray(1.0 + 0.1 * rs.randn(*s.shape), dtype)
    fan_in = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 100.0
    return jnp.asarray(rs.randn(*s.shape) / np.sqrt(fan_in), dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.mark.slow
def test_scaling_a_groupnorm_fed_block_scales_its_trace_and_not_the_normalised_one():
  # A real UNet (GroupNorm included) on 4x4 images; float32, as the model computes.
  model = _tiny_unet()
  schedule = diffusion.make_schedule("linear", 100)
  rs = np.random.RandomState(21)
  x0 = jnp.asarray(rs.uniform(-1, 1, (4, 4, 4, 3)), jnp.float32)
  noise = jnp.asarray(rs.randn(4, 4, 4, 3), jnp.float32)
  t = jnp.array([5, 30, 55, 80], jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x0, t)["params"])
  params = _random_unet_params(shapes, rs)
  blocks = curvature.unet_param_blocks(params, 1, 1, [])
  (group,) = blocks.scale_invariant["gn_fed/down0"]  # ResnetBlock_0's Conv_0 and Dense_0

  def per_example(p, x0, t, noise):
    out = model.apply({"params": p}, diffusion.q_sample(schedule, x0, t, noise), t)
    return diffusion.per_example_mse(out, noise)

  def scaled(c):
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([c * x if i in group else x for i, x in enumerate(leaves)])

  def group_hessian_trace(p):
    """Reference: the trace of jax.hessian of the loss in the group's entries alone."""
    flat, unravel = ravel_pytree(p)
    index = jnp.asarray(_flat_index(p, group))
    def loss_of_group(w):
      return per_example(unravel(flat.at[index].set(w)), x0, t, noise).mean()
    return jnp.trace(jax.hessian(loss_of_group)(flat[index]))

  num_probes = 256
  fn = curvature.get_curvature_fn(per_example, np.ones(100), 100, num_probes=num_probes,
                                  objective="reference", blocks=blocks, chunk_size=64)
  exact_trace = jax.jit(group_hessian_trace)
  # Shrinking the group sharpens it (c < 1): the block probe's noise is mostly its cross
  # terms with the other blocks, which grow only as 1/c against the trace's 1/c^2.
  c = 1.0 / 3.0
  batch = (x0, t, noise)
  base, small = fn(params, batch, jax.random.key(22)), fn(scaled(c), batch, jax.random.key(23))
  exact_base, exact_small = float(exact_trace(params)), float(exact_trace(scaled(c)))
  norm_sq = float(base["curvature/param_norm/gn_fed/down0"]) ** 2
  # loss(c w) = loss(w) except for GroupNorm's epsilon (1e-6 against activation variances
  # ~1e-1 here): tr H(c w) = tr H(w) / c^2 to ~1e-5, plus float32 rounding of the Hessian
  # (~1e-5 relative); 1e-3 separates this from any other power of c by orders of magnitude.
  np.testing.assert_allclose(exact_small * c ** 2, exact_base, rtol=1e-3)
  np.testing.assert_allclose(small["curvature/param_norm/gn_fed/down0"] ** 2, c ** 2 * norm_sq,
                             rtol=1e-5)
  # The estimates: the block trace follows 1/c^2 and the normalised trace stays put, each
  # within 4 of its own standard errors (256 probes: the normal tail at 4 is ~6e-5).
  prefix = "curvature/ref/block/gn_fed/down0/"
  for metrics, exact in ((base, exact_base), (small, exact_small)):
    err = abs(metrics[prefix + "hutch_trace_mean"] - exact)
    assert err < 4 * metrics[prefix + "hutch_trace_stderr"], (err, exact)
    err = abs(metrics[prefix + "normalized_trace"] - exact_base * norm_sq)
    assert err < 4 * metrics[prefix + "normalized_trace_stderr"], (err, exact_base * norm_sq)
  # The test discriminates: the two raw traces differ by over 4 standard errors of their
  # difference (measured: 15), so an estimate that ignored the scaling would fail the checks
  # above (whose errors measured 0.3 and 0.7 standard errors).
  se_diff = math.hypot(base[prefix + "hutch_trace_stderr"], small[prefix + "hutch_trace_stderr"])
  assert abs(exact_small - exact_base) > 4 * se_diff, (exact_small, exact_base, se_diff)


# ---------------------------------------------------------------------------------------
# Gauss-Newton trace
# ---------------------------------------------------------------------------------------
def _toy_residual(schedule, linear=False):
  """pred - noise of the per-pixel eps-model of `_toy_setup` (tanh, or linear in params)."""
  def residual(p, x0, t, noise):
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    time = (t.astype(x0.dtype) / NUM_TIMESTEPS)[:, None, None, None]
    pre = x_t @ p["w"] + p["b"] + p["s"] * time
    return (pre if linear else jnp.tanh(pre)) - noise
  return residual


def _exact_ggns(residual, params, batch, coefficients):
  """(m, P, P) matrices J^T W_j J, W_j = diag(2 c_ji / D), from the dense Jacobian."""
  flat, unravel = ravel_pytree(params)
  jac = np.asarray(jax.jit(jax.jacfwd(lambda f: residual(unravel(f), *batch)))(flat))
  jac = jac.reshape(jac.shape[0], -1, flat.size)  # (B, D, P)
  per_example = np.einsum("idp,idq->ipq", jac, jac) * 2.0 / jac.shape[1]
  return np.einsum("ji,ipq->jpq", np.asarray(coefficients), per_example)


@pytest.mark.slow
def test_ggn_trace_matches_exact_gauss_newton_trace(x64):
  schedule, batch, params, _ = _toy_setup()
  residual = _toy_residual(schedule)
  weights = diffusion.loss_weight(schedule, "minsnr", gamma=1.0)
  num_probes = 256
  fn = curvature.get_curvature_fn(None, weights, NUM_TIMESTEPS, num_probes=num_probes,
                                  objective="both", residual_fn=residual)
  metrics = fn(params, batch, jax.random.key(30))
  t = np.asarray(batch[1])
  coefficients = np.stack([weights[t] / BATCH, np.full(BATCH, 1.0 / BATCH)])
  ggns = _exact_ggns(residual, params, batch, coefficients)
  flat, unravel = ravel_pytree(params)
  h_train = np.asarray(jax.hessian(
      lambda f: coefficients[0] @ jnp.mean(jnp.square(residual(unravel(f), *batch)),
                                           axis=(1, 2, 3)))(flat))
  for prefix, g in zip(("curvature/", "curvature/ref/"), ggns):
    assert np.linalg.eigvalsh(g).min() > -1e-12  # PSD, as J^T W J with W >= 0 must be
    # Reference: trace(J^T W J) from the dense Jacobian; 4 exact standard errors
    # sqrt(2 (||G||_F^2 - sum G_ii^2) / n) (CLT; fails a correct estimator with p ~ 6e-5).
    err = abs(metrics[f"{prefix}ggn_trace_mean"] - np.trace(g))
    sigma = math.sqrt(_hutchinson_variance(g) / num_probes)
    assert err < 4 * sigma, (prefix, err)
    np.testing.assert_allclose(metrics[f"{prefix}ggn_trace_stderr"], sigma, rtol=0.3)
  # The tanh model is far from linear here: the residual term is a large part of tr H, so
  # a "GGN" that returned the Hessian trace would fail the checks above.
  assert abs(np.trace(h_train) - np.trace(ggns[0])) > 20 * math.sqrt(
      _hutchinson_variance(ggns[0]) / num_probes)


def test_hessian_equals_ggn_for_a_model_linear_in_its_params(x64):
  schedule, batch, params, _ = _toy_setup()
  residual = _toy_residual(schedule, linear=True)
  weights = diffusion.loss_weight(schedule, "minsnr", gamma=1.0)
  fn = curvature.get_curvature_fn(None, weights, NUM_TIMESTEPS, num_probes=8, objective="both",
                                  residual_fn=residual)
  metrics = fn(params, batch, jax.random.key(31))
  # A model linear in params has no second derivative, so H = G exactly; the probes are the
  # same vectors, so mean and stderr agree up to float64 rounding.
  for prefix in ("curvature/", "curvature/ref/"):
    for stat in ("mean", "stderr"):
      np.testing.assert_allclose(metrics[f"{prefix}ggn_trace_{stat}"],
                                 metrics[f"{prefix}hutch_trace_{stat}"], rtol=1e-10)
    assert abs(metrics[f"{prefix}hutch_trace_mean"]) > 1e-3


# ---------------------------------------------------------------------------------------
# Spectral density (SLQ)
# ---------------------------------------------------------------------------------------
def test_slq_density_moments_and_support(x64):
  eigenvalues = np.concatenate([[-3.0, 10.0], np.linspace(0.0, 2.0, 58)])
  loss, params, a = _quadratic_problem(eigenvalues, seed=9)
  num_runs, num_steps = 200, 20
  nodes, weights = jax.jit(lambda rng: curvature.stochastic_lanczos_quadrature(
      loss, params, rng, num_runs, num_steps))(jax.random.key(32))
  nodes, weights = np.asarray(nodes), np.asarray(weights)
  assert nodes.shape == weights.shape == (num_runs, num_steps)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
  # Nodes are Rayleigh quotients; the extremes are isolated (gaps 8 and 3 against a width 13
  # spectrum), so 20 steps converge them to ~1e-10 by Kaniel-Paige; 1e-6 is loose.
  assert nodes.min() >= -3.0 - 1e-9 and nodes.max() <= 10.0 + 1e-9
  np.testing.assert_allclose(nodes.min(axis=1), -3.0, atol=1e-6)
  np.testing.assert_allclose(nodes.max(axis=1), 10.0, atol=1e-6)

  grid, sigma = curvature.density_grid(jnp.asarray(nodes), 2048, 0.01)
  density = np.asarray(curvature.spectral_density(jnp.asarray(nodes), jnp.asarray(weights),
                                                  grid, sigma))
  grid, sigma = np.asarray(grid), float(sigma)
  assert grid[0] <= eigenvalues.min() and grid[-1] >= eigenvalues.max()  # support covered
  # The density integrates to 1: the grid spans 5 sigma beyond every node (mass lost ~6e-7)
  # and the trapezoid rule is exact to ~1e-12 for a Gaussian sampled at ~9 points per sigma.
  np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, atol=1e-5)
  # Reference: the spectrum's moments tr(A^p) / P. Each run's Gauss quadrature is exactly
  # v^T A^p v / P (degree p <= 2 m - 1) for its Rademacher start v, a Hutchinson probe of
  # A^p / P with exact variance 2 (||A^p||_F^2 - sum diag(A^p)^2) / P^2; the runs average
  # them, so 4 exact standard errors (CLT; p ~ 6e-5 per moment for a correct estimator).
  dim = len(eigenvalues)
  node_moments = [np.mean(np.sum(weights * nodes ** p, axis=1)) for p in (1, 2, 3)]
  for p, got in enumerate(node_moments, start=1):
    exact = np.mean(eigenvalues ** p)
    stderr = math.sqrt(_hutchinson_variance(np.linalg.matrix_power(a, p)) / dim ** 2 / num_runs)
    assert abs(got - exact) < 4 * stderr, (p, got, exact, stderr)
  # The density's moments are the nodes' convolved with N(0, sigma^2): m1, m2 + sigma^2,
  # m3 + 3 sigma^2 m1. Reference: those closed forms; the trapezoid rule on this grid is
  # accurate to ~1e-12 and the tails beyond 5 sigma hold ~6e-7 of the mass, so 1e-5
  # relative. sigma^2 = 0.017 is 1e-3 of m2, so a density without (or with a wrong)
  # broadening fails.
  mu1, mu2, mu3 = node_moments
  expected = [mu1, mu2 + sigma ** 2, mu3 + 3 * sigma ** 2 * mu1]
  for p, e in enumerate(expected, start=1):
    np.testing.assert_allclose(np.trapezoid(grid ** p * density, grid), e, rtol=1e-5,
                               err_msg=str(p))


# ---------------------------------------------------------------------------------------
# Adam's preconditioned sharpness
# ---------------------------------------------------------------------------------------
def test_preconditioned_sharpness_matches_eigh(x64):
  loss, params, h = _mlp_problem(seed=10)
  rs = np.random.RandomState(11)
  # Second moments over four orders of magnitude, so P reorders the spectrum.
  nu = jax.tree.map(lambda x: jnp.asarray(10.0 ** rs.uniform(-6, -2, x.shape)), params)
  count, b1, b2, eps, lr = 7, 0.9, 0.999, 1e-8, 1e-4
  pre = curvature.adam_preconditioner(nu, jnp.asarray(count), b1, b2, eps, lr)
  sharpness = jax.jit(lambda p, rng: curvature.preconditioned_sharpness(
      loss, params, p, rng, num_iters=32))(pre.diagonal, jax.random.key(33))
  # Reference: numpy's eigh of P^-1/2 H P^-1/2 with P = sqrt(nu / (1 - b2^count)) + eps built
  # here. 32 Lanczos steps on 32 parameters span everything, so the Ritz value is the top
  # eigenvalue up to float64 rounding (scaled by a condition number ~1e4 from P): 1e-9.
  p_diag = np.sqrt(np.asarray(ravel_pytree(nu)[0]) / (1 - b2 ** count)) + eps
  scaled = h / np.sqrt(np.outer(p_diag, p_diag))
  np.testing.assert_allclose(sharpness, np.linalg.eigvalsh(scaled)[-1], rtol=1e-9)
  assert abs(np.linalg.eigvalsh(scaled)[-1] - np.linalg.eigvalsh(h)[-1] / p_diag.min()) > 1
  # 2 (1 + b1) / ((1 - b1) lr) = 38 / lr for b1 = 0.9.
  np.testing.assert_allclose(pre.threshold, 38.0 / lr, rtol=1e-6)


def test_adam_preconditioner_reads_optax_state():
  optax = pytest.importorskip("optax")
  b1, b2, eps = 0.9, 0.99, 1e-8
  tx = optax.adam(1e-3, b1=b1, b2=b2, eps=eps)
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  state = tx.init(params)
  rs = np.random.RandomState(12)
  grads = [jax.tree.map(lambda x: jnp.asarray(rs.randn(*x.shape), jnp.float32), params)
           for _ in range(3)]
  for g in grads:
    _, state = tx.update(g, state, params)
  adam_state = state[0]
  pre = curvature.adam_preconditioner(adam_state.nu, adam_state.count, b1, b2, eps, 1e-3)
  # Reference: Adam's bias-corrected second moment after 3 updates, written out:
  # nu_3 = (1 - b2) sum_k b2^(3 - k) g_k^2 and v_hat = nu_3 / (1 - b2^3), float32 rounding.
  for name in params:
    nu = sum((1 - b2) * b2 ** (3 - k) * np.square(np.asarray(g[name]))
             for k, g in enumerate(grads, start=1))
    np.testing.assert_allclose(pre.diagonal[name], np.sqrt(nu / (1 - b2 ** 3)) + eps, rtol=1e-5)
  # Before any update count is 0 and v_hat is 0: P = eps, finite.
  fresh = curvature.adam_preconditioner(tx.init(params)[0].nu, 0, b1, b2, eps, 1e-3)
  np.testing.assert_allclose(fresh.diagonal["a"], eps)


# ---------------------------------------------------------------------------------------
# The whole measurement: chunking, memory planning, separate pieces
# ---------------------------------------------------------------------------------------
def _toy_blocks():
  """The toy's leaves b, s, w split two ways; s alone as a "scale-invariant" group."""
  return curvature.ParamBlocks(
      num_leaves=3,
      blocks={"stage/bias": (0, 1), "stage/kernel": (2,), "kind/all": (0, 1, 2),
              "gn_fed/s": (1,)},
      scale_invariant={"gn_fed/s": ((1,),)})


def _full_toy_measurement(chunk_size, num_probes=4):
  schedule, batch, params, _ = _toy_setup()
  weights = diffusion.loss_weight(schedule, "minsnr", gamma=1.0)
  fn = curvature.get_curvature_fn(
      None, weights, NUM_TIMESTEPS, num_probes=num_probes, objective="both", t_bands=2,
      chunk_size=chunk_size, top_eig_iters=4, blocks=_toy_blocks(),
      residual_fn=_toy_residual(schedule), precond_iters=5)
  nu = jax.tree.map(lambda x: jnp.full(x.shape, 1e-4, x.dtype) + 1e-5 * x ** 2, params)
  pre = curvature.adam_preconditioner(nu, 10, 0.9, 0.999, 1e-8, 2e-4)
  return fn, (params, batch, jax.random.key(34), pre)


@pytest.fixture(scope="module")
def full_toy_reference():
  """The toy's full measurement with every option, all probes at once (float64)."""
  with jax.enable_x64(True):
    fn, args = _full_toy_measurement(None)
    yield jax.device_get(fn(*args))


@pytest.mark.slow
def test_measurement_does_not_depend_on_chunking(x64, full_toy_reference):
  reference = full_toy_reference
  expected_new = {f"{p}{k}" for p in ("curvature/", "curvature/ref/") for k in (
      "ggn_trace_mean", "ggn_trace_stderr", "trace_per_param", "precond_sharpness",
      "precond_threshold", "block/gn_fed/s/normalized_trace",
      "block/gn_fed/s/normalized_trace_stderr")}
  expected_new |= {f"curvature/param_norm/{b}" for b in _toy_blocks().blocks}
  expected_new |= {f"{p}block/{b}/hutch_trace_{s}" for p in ("curvature/", "curvature/ref/")
                   for b in _toy_blocks().blocks for s in ("mean", "stderr")}
  assert expected_new <= set(reference)
  for chunk in (1, 2):
    fn, args = _full_toy_measurement(chunk)
    got = fn(*args)
    assert set(got) == set(reference)
    # Same rng -> same probe vectors, whatever the chunking; only float64 summation order
    # differs, ~1e-15 relative, so 1e-10 is generous.
    for key, value in reference.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-10, atol=1e-14, err_msg=key)


@pytest.mark.slow
def test_separate_pieces_reproduce_the_combined_measurement(x64, full_toy_reference):
  schedule, _, _, _ = _toy_setup()
  weights = diffusion.loss_weight(schedule, "minsnr", gamma=1.0)
  _, args = _full_toy_measurement(None)
  residual = _toy_residual(schedule)
  ggn = curvature.get_ggn_trace_fn(residual, weights, NUM_TIMESTEPS, num_probes=4)(*args[:3])
  precond = curvature.get_precond_sharpness_fn(None, weights, NUM_TIMESTEPS, num_iters=5,
                                               residual_fn=residual)(*args)
  # The same keys from the same rng: identical computations, so equal to float64 rounding.
  for key, value in {**ggn, **precond}.items():
    np.testing.assert_allclose(value, full_toy_reference[key], rtol=1e-12, err_msg=key)
  assert len(ggn) == 4 and len(precond) == 4

  density = curvature.get_spectral_density_fn(None, weights, NUM_TIMESTEPS, num_runs=3,
                                              num_steps=4, num_points=64,
                                              residual_fn=residual)(*args[:3])
  assert set(density) == {f"{o}_{a}" for o in ("train", "ref")
                          for a in ("nodes", "weights", "grid", "density", "sigma")}
  assert density["train_nodes"].shape == (3, 4) and density["ref_density"].shape == (64,)
  # Each run's Gauss weights sum to 1 (float64 rounding).
  np.testing.assert_allclose(density["ref_weights"].sum(axis=1), 1.0, rtol=1e-12)


class _FakeProgram:
  """Stands in for build(c): .lower(*args).compile().memory_analysis() of a given size."""

  def __init__(self, size, compiles):
    self.size, self.compiles = size, compiles

  def lower(self, *args):
    del args
    return self

  def compile(self):
    self.compiles.append(self.size)
    return self

  def memory_analysis(self):
    return types.SimpleNamespace(temp_size_in_bytes=self.size, argument_size_in_bytes=10,
                                 output_size_in_bytes=5, alias_size_in_bytes=5)


@pytest.mark.parametrize("num_probes", [1, 12, 16, 7])
def test_plan_chunk_size_bisects_to_the_largest_chunk_that_fits(num_probes):
  size = lambda chunk: 1000 + 100 * chunk  # + 10 argument + 5 output - 5 aliased bytes
  divisors = [c for c in range(1, num_probes + 1) if num_probes % c == 0]
  for budget in range(900, size(num_probes) + 200, 50):
    compiles = []
    plan = curvature.plan_chunk_size(lambda c: _FakeProgram(size(c), compiles), (),
                                     num_probes, budget)
    # Reference: the largest divisor whose plan fits, by exhaustive search; chunk 1 when
    # none does (its plan then exceeds the budget, for the caller to report).
    fitting = [c for c in divisors if size(c) + 10 <= budget]
    assert plan.chunk_size == (max(fitting) if fitting else 1), budget
    assert plan.planned_bytes == size(plan.chunk_size) + 10
    # Largest first, then bisection: 1 compile when everything fits, else at most
    # 2 + ceil(log2(number of divisors)).
    limit = 1 if size(num_probes) + 10 <= budget else 2 + math.ceil(math.log2(len(divisors)))
    assert len(compiles) <= limit, (budget, compiles)


@pytest.mark.slow
def test_plan_chunk_size_reads_xla_memory_analysis():
  loss, params, _ = _mlp_problem(width=64)
  num_probes = 16

  def build(chunk):
    return jax.jit(lambda p, rng: curvature.hutchinson(loss, p, rng, num_probes,
                                                       chunk_size=chunk)["mean"])

  args = (params, jax.random.key(35))
  whole = build(num_probes).lower(*args).compile()
  # Every probe vmapped at once plans more memory than one at a time (tangents are linear
  # in the probes), so a budget just under the whole program forces a smaller chunk.
  plan = curvature.plan_chunk_size(build, args, num_probes, curvature.planned_bytes(whole) - 1)
  assert plan.chunk_size < num_probes
  assert plan.planned_bytes < curvature.planned_bytes(whole)
  # The planned program is the measurement: same probes, so the same trace up to float32
  # summation order.
  np.testing.assert_allclose(plan.compiled(*args), whole(*args), rtol=1e-5)


def test_new_measurements_reject_bad_arguments():
  _, batch, params, per_example = _toy_setup()
  with pytest.raises(ValueError, match="hutchinson"):
    curvature.get_curvature_fn(per_example, np.ones(NUM_TIMESTEPS), NUM_TIMESTEPS,
                               estimator="hutch++", blocks=_toy_blocks())
  with pytest.raises(ValueError, match="per_example_loss_fn or residual_fn"):
    curvature.get_curvature_fn(None, np.ones(NUM_TIMESTEPS), NUM_TIMESTEPS)
  fn = curvature.get_curvature_fn(per_example, np.ones(NUM_TIMESTEPS), NUM_TIMESTEPS,
                                  num_probes=2, precond_iters=2)
  with pytest.raises(ValueError, match="AdamPreconditioner"):
    fn(params, batch, jax.random.key(0))
  with pytest.raises(ValueError, match="leaves"):
    curvature.block_traces(jnp.zeros((2, 5)), params, _toy_blocks())
