"""Tests for diffdyn.curvature against exact Hessians of small problems.

Most tests run in float64 (scoped to the test by the `x64` fixture) so that identities which
hold exactly in real arithmetic can be checked at rounding level; statistical checks use
tolerances derived from the estimators' known variances, stated next to each assertion.
"""
import math

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


def test_hvp_matches_gradient_differences_on_unet():
  unet = pytest.importorskip("diffdyn.models.unet")
  model = unet.UNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(8,), dropout=0.0)
  rs = np.random.RandomState(0)
  x0 = jnp.asarray(rs.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  noise = jnp.asarray(rs.randn(2, 16, 16, 3), jnp.float32)
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
  # (measured ~1e-4 relative at eps=1e-3, falling 10x per 3x smaller eps) plus float32
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
