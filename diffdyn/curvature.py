"""Curvature of a loss: Hessian-vector products, stochastic trace estimates, top eigenvalues.

Every estimator here touches the Hessian H only through Hessian-vector products
(forward-over-reverse differentiation), so parameters can be any pytree of any size. Beside
the trace: per-block traces from the same probes, the Gauss-Newton trace of an MSE (one JVP
per probe), the spectral density by stochastic Lanczos quadrature, Adam's preconditioned
sharpness, and a chunk size planned from XLA's memory analysis of the compiled program.

Conventions shared by the whole module:
  * `loss_fn(params)` is deterministic. Each measurement must see one fixed matrix: the batch,
    the timesteps, the noise and the dropout masks are frozen (or dropout is off) before the
    estimator runs. Randomness inside `loss_fn` adds variance to Hutchinson and silently breaks
    Hutch++ and Lanczos, which assume every matvec uses the same H.
  * Every random number comes from the `rng` argument; equal `rng` means equal probe vectors,
    whatever `chunk_size` is.
  * The estimators trace their matvecs under `jax.default_matmul_precision("float32")`. GPUs
    would otherwise run float32 matmuls in TF32, which biases single probes by up to tens of
    percent when their terms nearly cancel.
  * A trace scales linearly with the loss: tr(c H) = c tr(H). A run whose loss is weighted
    (Min-SNR-gamma multiplies each term by a factor <= 1) has a smaller trace by construction;
    compare runs with different weightings on a common reference loss (`get_curvature_fn`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from diffdyn import diffusion

ESTIMATORS = ("hutchinson", "hutch++")
OBJECTIVES = ("train", "reference", "both")

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]


# ---------------------------------------------------------------------------------------
# Matrix-free products.
# ---------------------------------------------------------------------------------------
def hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
  """Hessian-vector product H v of a scalar `loss_fn` at `params`, by forward-over-reverse.

  Args:
    loss_fn: params -> scalar.
    params: any pytree of floating arrays.
    v: a pytree with the structure, shapes and dtypes of `params`.

  Returns:
    H v, a pytree like `params`.
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _stacked_hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
  """H_j v for every output j of a (m,)-valued `loss_fn`; each leaf gains a leading m axis.

  The m objectives share one forward pass (primal and tangent); only the backward pass is
  repeated per objective, which is cheaper than m separate HVPs.
  """
  return jax.jvp(jax.jacrev(loss_fn), (params,), (v,))[1]


def _rademacher_like(rng: jax.Array, tree: PyTree) -> PyTree:
  """A pytree like `tree` with independent +-1 entries, each leaf in its own dtype.

  One draw over the flattened parameters rather than one per leaf: every random op compiles
  to its own hash kernel, and ~100 of them (a UNet's leaves) cost minutes of XLA:CPU compile.
  """
  flat, unravel = ravel_pytree(tree)
  return unravel(jax.random.rademacher(rng, flat.shape, flat.dtype))


def _leaf_quadratic_forms(hv: PyTree, v: PyTree) -> jax.Array:
  """v^l . (H_j v)^l for each objective j and leaf l, from stacked products `hv` -> (m, L).

  Summed over the leaves of a block they give that block's Hutchinson probe, whose mean is
  the trace of the block's diagonal sub-matrix of H: per-block traces at no extra matvec.
  """
  return jnp.stack([jnp.tensordot(h, x, axes=x.ndim)
                    for h, x in zip(jax.tree.leaves(hv), jax.tree.leaves(v))], axis=-1)


def _squared_norms(hv: PyTree) -> jax.Array:
  """||H_j v||^2 for each j, from stacked products `hv` -> (m,)."""
  return sum(jnp.square(h).reshape(h.shape[0], -1).sum(axis=1) for h in jax.tree.leaves(hv))


def _ggn_quadratic_forms(residual_fn: Callable, params: PyTree, v: PyTree,
                         weights: jax.Array) -> jax.Array:
  """v^T G_j v for the Gauss-Newton matrices of the objectives sum_i weights[j, i] mse_i.

  With r_i = residual_fn(params)[i] of D entries and mse_i = ||r_i||^2 / D, the Hessian of
  mse_i is (2 / D) (J_i^T J_i + sum_d r_id grad^2 r_id); G keeps the first term, so
  v^T G_j v = sum_i weights[j, i] (2 / D) ||J_i v||^2: one forward-mode pass for all j, and
  PSD whenever the weights are >= 0.

  Args:
    residual_fn: params -> (B, ...) residuals (prediction minus target).
    params, v: pytrees of the same structure.
    weights: (m, B) objective coefficients.

  Returns:
    (m,) quadratic forms.
  """
  jv = jax.jvp(residual_fn, (params,), (v,))[1]
  per_example = 2.0 * jnp.mean(jnp.square(jv).reshape(jv.shape[0], -1), axis=1)
  return weights.astype(per_example.dtype) @ per_example


def _flat_hvp_operator(loss_fn: LossFn, params: PyTree,
                       scale: jax.Array | None = None) -> tuple[Callable, jax.Array]:
  """(x -> S H S x on flattened parameters, flattened params) with S = diag(scale) or I.

  S H S with S = P^-1/2 is the symmetric form of the preconditioned Hessian P^-1 H: both
  have the same eigenvalues, and Lanczos needs a symmetric operator.
  """
  flat_params, unravel = ravel_pytree(params)

  def matvec(x):
    if scale is not None:
      x = scale * x
    hx = ravel_pytree(hvp(loss_fn, params, unravel(x)))[0]
    return hx if scale is None else scale * hx

  return matvec, flat_params


def _map_over_probes(fn: Callable, xs: Any, chunk_size: int | None) -> Any:
  """fn over the leading axis of xs: one vmap, or vmaps of `chunk_size` in sequence.

  Chunking bounds the tangent memory, which grows linearly with the probes vmapped at once.
  """
  if chunk_size is None or chunk_size >= xs.shape[0]:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=chunk_size)


# ---------------------------------------------------------------------------------------
# Trace estimators.
# ---------------------------------------------------------------------------------------
def _check_estimator(estimator: str, num_probes: int) -> None:
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
  min_probes = 3 if estimator == "hutch++" else 1
  if num_probes < min_probes:
    raise ValueError(f"{estimator} needs num_probes >= {min_probes}, got {num_probes}")


def _probe_keys(rng: jax.Array, num_probes: int) -> jax.Array:
  """The per-probe keys of a Hutchinson estimate: every estimator on `rng` shares them."""
  return jax.random.split(rng, num_probes)


def _hutchinson_probes(loss_fn: LossFn, params: PyTree, rng: jax.Array, num_probes: int,
                       chunk_size: int | None) -> tuple[jax.Array, jax.Array]:
  """Per-probe v^l . (H_j v)^l per leaf, (num_probes, m, L), and ||H_j v||^2, (num_probes, m),
  for a (m,)-valued loss."""
  def one_probe(key):
    v = _rademacher_like(key, params)
    hv = _stacked_hvp(loss_fn, params, v)
    return _leaf_quadratic_forms(hv, v), _squared_norms(hv)
  return _map_over_probes(one_probe, _probe_keys(rng, num_probes), chunk_size)


def _sample_stats(values: jax.Array) -> dict[str, jax.Array]:
  """mean, std (ddof=1) and stderr of per-probe values over their leading axis."""
  std = jnp.std(values, axis=0, ddof=1)
  return dict(mean=jnp.mean(values, axis=0), std=std, stderr=std / math.sqrt(values.shape[0]))


def _hutchpp_probes(loss_fn: LossFn, params: PyTree, rng: jax.Array, num_probes: int,
                    chunk_size: int | None) -> tuple[jax.Array, jax.Array]:
  """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) for a scalar loss, at num_probes matvecs.

  The budget splits as k = num_probes // 3 sketch products H S, k products H Q with the
  orthonormal basis Q of H S, and the remaining r = num_probes - 2k residual probes.

  Returns:
    (values, sketch_sq_norms): values[i] = tr(Q^T H Q) + g_i^T P H P g_i with P = I - Q Q^T,
    shape (r,); their mean is the Hutch++ estimate. Given Q, each g_i term is an unbiased
    estimate of tr(P H P) = tr(H) - tr(Q^T H Q) for any symmetric H, definite or not, so each
    value is unbiased for tr(H) and the spread of the values is the estimator's own noise.
    sketch_sq_norms[i] = ||H s_i||^2, shape (k,), unbiased for tr(H^2).
  """
  flat_params, unravel = ravel_pytree(params)

  def flat_probe(key):
    return jax.random.rademacher(key, flat_params.shape, flat_params.dtype)

  def flat_hvp(x):
    return ravel_pytree(hvp(loss_fn, params, unravel(x)))[0]

  num_sketch = num_probes // 3
  num_residual = num_probes - 2 * num_sketch
  sketch_rng, residual_rng = jax.random.split(rng)
  sketch = jax.vmap(flat_probe)(jax.random.split(sketch_rng, num_sketch))
  h_sketch = _map_over_probes(flat_hvp, sketch, chunk_size)
  # Householder QR returns orthonormal columns even when H S is rank deficient.
  basis = jnp.linalg.qr(h_sketch.T)[0].T
  h_basis = _map_over_probes(flat_hvp, basis, chunk_size)
  exact_part = jnp.sum(basis * h_basis)

  def residual_probe(key):
    g = flat_probe(key)
    g = g - basis.T @ (basis @ g)
    return jnp.vdot(g, flat_hvp(g))

  residual = _map_over_probes(residual_probe, jax.random.split(residual_rng, num_residual),
                              chunk_size)
  return exact_part + residual, jnp.sum(jnp.square(h_sketch), axis=1)


def hutchinson(loss_fn: LossFn, params: PyTree, rng: jax.Array, num_probes: int = 16,
               estimator: str = "hutchinson", chunk_size: int | None = None,
               per_leaf: bool = False) -> dict:
  """Stochastic estimate of the Hessian trace of `loss_fn` at `params`.

  Hutchinson: tr(H) ~ mean_i v_i^T H v_i over Rademacher probes v_i (one leaf-shaped draw per
  parameter leaf, in the leaf's dtype), vmapped over probes.
  Hutch++: the same budget of `num_probes` matvecs spent on a low-rank sketch, its exact
  trace, and Hutchinson on the deflated remainder; better when a few eigenvalues dominate.

  `loss_fn` may return a (m,) vector: m objectives measured with the same probe vectors, so
  that differences between objectives carry no probe noise of their own (common random
  numbers). Hutchinson then shares one forward pass per probe across the objectives;
  Hutch++ builds a sketch per objective (same random S and G) and costs m times the budget.

  Args:
    loss_fn: params -> scalar or (m,) vector; deterministic.
    params: any pytree of floating arrays.
    rng: PRNG key; fixes every probe vector.
    num_probes: Hutchinson probes, or the Hutch++ matvec budget (>= 3).
    estimator: "hutchinson" or "hutch++".
    chunk_size: probes vmapped at once (None: all). Bounds memory; results do not depend on it
      beyond float rounding.
    per_leaf: also return `leaf_probes` (Hutchinson only).

  Returns:
    dict with, per objective (a trailing (m,) axis when `loss_fn` is vector-valued):
      mean: the trace estimate.
      std: sample standard deviation (ddof=1) of `probes`; NaN with a single probe.
      stderr: std / sqrt(len(probes)), the standard error of `mean`.
      probes: per-probe values whose mean is `mean`. Hutchinson: v_i^T H v_i,
        (num_probes,). Hutch++: tr(Q^T H Q) + g_i^T P H P g_i, (num_probes - 2 k,) with
        k = num_probes // 3. Both are unbiased for tr(H); for Hutch++ std/stderr measure the
        noise given the sketch, which is all of its noise since its conditional mean is exact.
      tr_h2: estimate of tr(H^2) = ||H||_F^2, the mean of ||H v||^2 over the Hutchinson
        probes or over the Hutch++ sketch vectors. It predicts the Hutchinson probe spread:
        Var(v^T H v) = 2 (tr(H^2) - sum_i H_ii^2).
      leaf_probes (per_leaf): v_i^l . (H v_i)^l for each leaf l of jax.tree.leaves(params),
        (num_probes, [m,] L); summing its last axis gives `probes`. Summed over a block of
        leaves it is an unbiased probe of that block's trace (see `block_traces`).
  """
  _check_estimator(estimator, num_probes)
  if per_leaf and estimator != "hutchinson":
    raise ValueError(f"per_leaf needs estimator='hutchinson', got {estimator!r}")
  out_shape = jax.eval_shape(loss_fn, params).shape
  if len(out_shape) > 1:
    raise ValueError(f"loss_fn must return a scalar or a vector, got shape {out_shape}")
  vector_loss = loss_fn if out_shape else (lambda p: loss_fn(p)[None])

  with jax.default_matmul_precision("float32"):
    if estimator == "hutchinson":
      leaf_values, sq_norms = _hutchinson_probes(vector_loss, params, rng, num_probes,
                                                 chunk_size)
      values = leaf_values.sum(axis=-1)
    else:
      per_objective = [
          _hutchpp_probes(lambda p, j=j: vector_loss(p)[j], params, rng, num_probes, chunk_size)
          for j in range(out_shape[0] if out_shape else 1)]
      values = jnp.stack([v for v, _ in per_objective], axis=1)
      sq_norms = jnp.stack([s for _, s in per_objective], axis=1)

  stats = dict(_sample_stats(values), probes=values, tr_h2=jnp.mean(sq_norms, axis=0))
  if not out_shape:
    stats = {name: x[..., 0] for name, x in stats.items()}
  if per_leaf:
    stats["leaf_probes"] = leaf_values if out_shape else leaf_values[:, 0]
  return stats


def gauss_newton_trace(residual_fn: Callable[[PyTree], jax.Array], params: PyTree,
                       rng: jax.Array, num_probes: int = 16, weights: jax.Array | None = None,
                       chunk_size: int | None = None) -> dict:
  """Hutchinson estimate of the Gauss-Newton trace tr(J^T W J) of a (weighted) MSE.

  The objective is sum_i w_i mse_i with mse_i = mean_d r_id^2, r = residual_fn(params) of
  shape (B, ...) (prediction minus target; the target does not depend on params). Its
  Hessian is G + sum_i w_i (2 / D) sum_d r_id grad^2 r_id, with G = J^T W J, W = diag(2 w_i / D)
  over the B D residual entries: PSD for w >= 0, and equal to the Hessian where the model is
  linear in params or the residuals vanish. Each probe costs one JVP: v^T G v = ||W^1/2 J v||^2.
  With the same `rng` as `hutchinson` the probe vectors are the same, so H - G is estimated
  with common random numbers.

  Args:
    residual_fn: params -> (B, ...) residuals; deterministic.
    params: any pytree of floating arrays.
    rng: PRNG key; fixes every probe vector.
    num_probes: Hutchinson probes.
    weights: (B,) or (m, B) per-example coefficients w_i (m objectives); None is 1/B, the
      mean-reduced MSE mean_i mse_i.
    chunk_size: probes vmapped at once (None: all).

  Returns:
    dict(mean, std, stderr, probes (num_probes, [m])), as `hutchinson`.
  """
  batch_size = jax.eval_shape(residual_fn, params).shape[0]
  w = jnp.full((batch_size,), 1.0 / batch_size) if weights is None else jnp.asarray(weights)
  rows = w if w.ndim == 2 else w[None]

  def one_probe(key):
    return _ggn_quadratic_forms(residual_fn, params, _rademacher_like(key, params), rows)

  with jax.default_matmul_precision("float32"):
    values = _map_over_probes(one_probe, _probe_keys(rng, num_probes), chunk_size)
  if w.ndim == 1:
    values = values[:, 0]
  return dict(_sample_stats(values), probes=values)


# ---------------------------------------------------------------------------------------
# Extremal eigenvalues.
# ---------------------------------------------------------------------------------------
def _orthogonalize(x: jax.Array, basis: jax.Array) -> jax.Array:
  """Removes from x its components along the rows of `basis` (zero rows are inert).

  Two Gram-Schmidt passes: one pass leaves errors of order eps * cond when x is nearly in the
  span, the second brings them to rounding level ("twice is enough").
  """
  for _ in range(2):
    x = x - basis.T @ (basis @ x)
  return x


def _unit_or_zero(x: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(x)
  return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1), jnp.zeros_like(x))


def _lanczos_tridiagonal(matvec: Callable, start: jax.Array, restart_rng: jax.Array,
                         num_iters: int) -> jax.Array:
  """The (num_iters, num_iters) Lanczos tridiagonal matrix of a symmetric `matvec`.

  Starts from the unit vector `start`, so for the eigendecomposition T = U diag(theta) U^T,
  sum_k U_0k^2 f(theta_k) is the Gauss quadrature of start^T f(A) start, exact for
  polynomials f of degree <= 2 num_iters - 1.

  Full reorthogonalisation against every previous Lanczos vector keeps the basis orthonormal,
  so no spurious copies of converged eigenvalues appear; it stores (num_iters + 1) vectors.
  When the Krylov space becomes invariant (A has few distinct eigenvalues along the start
  vector) the recurrence restarts from a fresh random vector orthogonal to the basis, so T
  splits into blocks and every Ritz value stays a true Rayleigh quotient of A; the later
  blocks get zero quadrature weight, which is right: `start` has no component there.
  """
  dim = start.shape[0]
  dtype = start.dtype
  tiny = jnp.finfo(dtype).eps

  def step(j, carry):
    basis, alphas, betas = carry
    v = basis[j]
    w = matvec(v)
    alpha = jnp.vdot(v, w)
    w_norm = jnp.linalg.norm(w)
    w = _orthogonalize(w, basis)
    beta = jnp.linalg.norm(w)
    invariant = beta <= tiny * w_norm
    next_v = jnp.where(invariant, _random_unit(jax.random.fold_in(restart_rng, j), basis),
                       _unit_or_zero(w))
    return (basis.at[j + 1].set(next_v), alphas.at[j].set(alpha),
            betas.at[j].set(jnp.where(invariant, 0, beta)))

  basis = jnp.zeros((num_iters + 1, dim), dtype).at[0].set(start)
  _, alphas, betas = jax.lax.fori_loop(
      0, num_iters, step, (basis, jnp.zeros(num_iters, dtype), jnp.zeros(num_iters, dtype)))
  off_diagonal = betas[:-1]
  return jnp.diag(alphas) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)


def _random_unit(key: jax.Array, basis: jax.Array) -> jax.Array:
  """A Gaussian direction orthogonal to the rows of `basis`, normalised (or zero)."""
  x = jax.random.normal(key, basis.shape[1:], basis.dtype)
  return _unit_or_zero(_orthogonalize(x, basis))


def _operator_ritz_values(matvec: Callable, dim: int, dtype, rng: jax.Array,
                          num_iters: int) -> jax.Array:
  """Ascending Ritz values of `num_iters` Lanczos steps from a random Gaussian start."""
  start_rng, restart_rng = jax.random.split(rng)
  start = _random_unit(start_rng, jnp.zeros((1, dim), dtype))
  tridiagonal = _lanczos_tridiagonal(matvec, start, restart_rng, min(num_iters, dim))
  return jnp.linalg.eigvalsh(tridiagonal)


def lanczos_ritz_values(loss_fn: LossFn, params: PyTree, rng: jax.Array,
                        num_iters: int = 20) -> jax.Array:
  """Ritz values (ascending) of the Hessian from `num_iters` Lanczos steps.

  Full reorthogonalisation and restarts as in `_lanczos_tridiagonal`; `num_iters` is capped
  at the number of parameters.

  The extremal Ritz values converge first: the largest from below, the smallest from above.
  A repeated eigenvalue shows up once (Lanczos sees one copy per Krylov block).
  """
  with jax.default_matmul_precision("float32"):
    matvec, flat_params = _flat_hvp_operator(loss_fn, params)
    return _operator_ritz_values(matvec, flat_params.shape[0], flat_params.dtype, rng,
                                 num_iters)


def top_eigenvalue(loss_fn: LossFn, params: PyTree, rng: jax.Array,
                   num_iters: int = 20) -> jax.Array:
  """Largest algebraic Hessian eigenvalue (the "sharpness"), by Lanczos.

  Largest algebraic, not largest magnitude: a strongly negative direction does not count as
  sharp. The estimate is a Rayleigh quotient, so it never exceeds the true value (up to
  rounding) and converges from below as `num_iters` grows; ~20 steps suffice when the top
  eigenvalue is separated from the bulk.
  """
  return lanczos_ritz_values(loss_fn, params, rng, num_iters)[-1]


def top_k_eigenvalues(loss_fn: LossFn, params: PyTree, rng: jax.Array, k: int,
                      num_iters: int = 20) -> jax.Array:
  """The k largest algebraic Ritz values, descending, from one Lanczos run (k <= num_iters).

  Interior Ritz values converge more slowly than the top one: take num_iters well above k.
  """
  ritz = lanczos_ritz_values(loss_fn, params, rng, num_iters)
  if k > ritz.shape[0]:
    raise ValueError(f"k={k} exceeds the {ritz.shape[0]} Ritz values of {num_iters} Lanczos steps")
  return ritz[::-1][:k]


# ---------------------------------------------------------------------------------------
# Spectral density by stochastic Lanczos quadrature.
# ---------------------------------------------------------------------------------------
def stochastic_lanczos_quadrature(loss_fn: LossFn, params: PyTree, rng: jax.Array,
                                  num_runs: int = 4,
                                  num_steps: int = 30) -> tuple[jax.Array, jax.Array]:
  """Nodes and weights of the Hessian's spectral density by stochastic Lanczos quadrature.

  Each run starts Lanczos from a normalised Rademacher vector v (so ||v||^2 = P exactly) and
  turns its tridiagonal matrix T = U diag(theta) U^T into the Gauss quadrature
  sum_k U_0k^2 f(theta_k) = v^T f(H) v / P for polynomials f of degree <= 2 num_steps - 1.
  Averaged over runs, it is a Hutchinson estimate of tr f(H) / P: the density
  phi(l) = (1 / (R P)) sum_i delta(l - lambda_i) seen through m-point quadratures. The runs
  follow one another (each holds num_steps + 1 flattened parameter vectors).

  Args:
    loss_fn: params -> scalar; deterministic.
    params: any pytree of floating arrays.
    rng: PRNG key; fixes every start vector.
    num_runs: R, independent start vectors.
    num_steps: m, Lanczos steps per run (capped at the number of parameters).

  Returns:
    (nodes, weights), each (num_runs, m): the Ritz values of each run, ascending, and their
    quadrature weights; each run's weights sum to 1.
  """
  with jax.default_matmul_precision("float32"):
    matvec, flat_params = _flat_hvp_operator(loss_fn, params)
    dim, dtype = flat_params.shape[0], flat_params.dtype
    num_steps = min(num_steps, dim)

    def one_run(key):
      start_rng, restart_rng = jax.random.split(key)
      start = jax.random.rademacher(start_rng, (dim,), dtype) / math.sqrt(dim)
      nodes, vectors = jnp.linalg.eigh(_lanczos_tridiagonal(matvec, start, restart_rng,
                                                            num_steps))
      return nodes, jnp.square(vectors[0])

    return jax.lax.map(one_run, jax.random.split(rng, num_runs))


def density_grid(nodes: jax.Array, num_points: int = 512,
                 broadening: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """An eigenvalue grid for `spectral_density` and the Gaussian width sigma to use on it.

  sigma = broadening * (max - min node), and the grid spans the nodes with 5 sigma to spare
  on each side, so it holds all but ~6e-7 of each Gaussian's mass. The extreme Ritz values
  lie inside [lambda_min, lambda_max] and converge to them first, so the grid covers the
  spectrum once they are within 5 sigma. A degenerate spread (all nodes equal) uses
  max(|node|, 1) in place of the spread.
  """
  lo, hi = jnp.min(nodes), jnp.max(nodes)
  spread = hi - lo
  spread = jnp.where(spread > 0, spread, jnp.maximum(jnp.abs(hi), 1.0))
  sigma = broadening * spread
  return jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points), sigma


def spectral_density(nodes: jax.Array, weights: jax.Array, grid: jax.Array,
                     sigma: jax.Array | float) -> jax.Array:
  """The Gaussian-broadened density (1/R) sum_r sum_k w_rk N(grid; theta_rk, sigma^2).

  Args:
    nodes, weights: (R, m) from `stochastic_lanczos_quadrature`.
    grid: (G,) eigenvalues.
    sigma: the Gaussian width (> 0).

  Returns:
    (G,) density values; it integrates to 1 over the real line. Its mean is that of the
    nodes, its variance theirs plus sigma^2.
  """
  z = (grid[:, None, None] - nodes[None]) / sigma
  kernel = jnp.exp(-0.5 * jnp.square(z)) / (sigma * math.sqrt(2 * math.pi))
  return jnp.sum(kernel * weights[None], axis=(1, 2)) / nodes.shape[0]


# ---------------------------------------------------------------------------------------
# Adam's preconditioned sharpness.
# ---------------------------------------------------------------------------------------
class AdamPreconditioner(NamedTuple):
  """Adam's diagonal preconditioner and the stability threshold its sharpness is held to.

  diagonal: pytree like the params, sqrt(v_hat) + eps.
  threshold: 2 (1 + b1) / ((1 - b1) lr), e.g. 38 / lr for b1 = 0.9.
  """
  diagonal: PyTree
  threshold: jax.Array


def adam_preconditioner(nu: PyTree, count: jax.Array, b1: float, b2: float, eps: float,
                        learning_rate: jax.Array | float) -> AdamPreconditioner:
  """Adam's preconditioner P = diag(sqrt(v_hat) + eps) from optax's `ScaleByAdamState`.

  Adam steps by -lr m_hat / (sqrt(v_hat) + eps) = -lr P^-1 m_hat. Frozen P makes it heavy-ball
  momentum with step lr on P^-1 H, stable while lr lambda_max(P^-1 H) < 2 (1 + b1) / (1 - b1)
  (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"): lr sits in the
  threshold, so it is not also folded into P.

  Args:
    nu: the second-moment pytree (`ScaleByAdamState.nu`, i.e. opt_state[0].nu for optax.adam).
    count: `ScaleByAdamState.count`, the updates applied; v_hat = nu / (1 - b2^count), the
      bias correction of the last update. count = 0 (no update yet) gives v_hat = 0.
    b1, b2, eps: Adam's hyperparameters.
    learning_rate: lr of the last update (the schedule's value if there is one).
  """
  def corrected(n):
    dtype = jnp.promote_types(n.dtype, jnp.float32)
    steps = jnp.asarray(count, dtype)
    # 1 - b2^count by expm1: the plain difference loses ~1e-5 in float32 at small counts.
    correction = -jnp.expm1(steps * jnp.log(jnp.asarray(b2, dtype)))
    inverse = jnp.where(steps > 0, 1.0 / jnp.where(steps > 0, correction, 1.0), 0.0)
    return jnp.sqrt(n.astype(dtype) * inverse) + eps

  return AdamPreconditioner(jax.tree.map(corrected, nu),
                            adam_stability_threshold(learning_rate, b1))


def adam_stability_threshold(learning_rate: jax.Array | float, b1: float) -> jax.Array:
  """2 (1 + b1) / ((1 - b1) lr): where lambda_max(P^-1 H) equilibrates in full-batch Adam."""
  return jnp.asarray(2.0 * (1.0 + b1) / (1.0 - b1), jnp.float32) / learning_rate


def preconditioned_sharpness(loss_fn: LossFn, params: PyTree, preconditioner: PyTree,
                             rng: jax.Array, num_iters: int = 20) -> jax.Array:
  """lambda_max(P^-1 H) for a positive diagonal P (a pytree like params), by Lanczos.

  Runs on the symmetric P^-1/2 H P^-1/2, similar to P^-1 H. Largest algebraic, and a
  Rayleigh quotient: it approaches the true value from below as num_iters grows.
  """
  with jax.default_matmul_precision("float32"):
    scale = ravel_pytree(jax.tree.map(
        lambda d, p: jax.lax.rsqrt(d.astype(p.dtype)), preconditioner, params))[0]
    matvec, flat_params = _flat_hvp_operator(loss_fn, params, scale)
    return _operator_ritz_values(matvec, flat_params.shape[0], flat_params.dtype, rng,
                                 num_iters)[-1]


# ---------------------------------------------------------------------------------------
# Parameter blocks.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamBlocks:
  """Named sets of parameter leaves, as indices into `jax.tree.leaves(params)`.

  blocks: name -> leaf indices. Names are "<partition>/<block>"; the "stage" and "kind"
    partitions each hold every leaf exactly once, so their traces add up to the total.
    The "gn_fed" blocks are unions of scale-invariant groups (not a partition).
  scale_invariant: gn_fed block name -> its groups, each a set of leaves that only feeds a
    GroupNorm, so the loss is invariant to scaling the group and the group's curvature
    scales as 1 / ||w_g||^2.
  """
  num_leaves: int
  blocks: dict[str, tuple[int, ...]]
  scale_invariant: dict[str, tuple[tuple[int, ...], ...]]

  def membership(self) -> np.ndarray:
    """(num_blocks, num_leaves) 0/1 matrix, rows in the order of `blocks`."""
    rows = np.zeros((len(self.blocks), self.num_leaves))
    for row, leaves in zip(rows, self.blocks.values()):
      row[list(leaves)] = 1.0
    return rows


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _indexed(name: str) -> tuple[str, int]:
  """"ResnetBlock_3" -> ("ResnetBlock", 3); a name without an index -> (name, -1)."""
  base, _, index = name.rpartition("_")
  return (base, int(index)) if base and index.isdigit() else (name, -1)


def unet_module_stages(num_levels: int, num_res_blocks: int,
                       attention_levels) -> dict[str, list[str]]:
  """The stage of each auto-named UNet submodule, by module type, in creation order.

  Flax numbers a compact module's children of one type in the order they are created:
  `diffdyn.models.unet.UNet` creates, per down level l, num_res_blocks ResnetBlocks (each
  followed by an AttnBlock where l is an attention level) and then a Downsample (except at
  the last level); then mid ResnetBlock, AttnBlock, ResnetBlock; then per up level, from the
  deepest, num_res_blocks + 1 ResnetBlocks (AttnBlocks likewise) and an Upsample (except at
  level 0).
  """
  levels = range(num_levels)
  attention = set(attention_levels)
  down = [("down", l) for l in levels for _ in range(num_res_blocks)]
  up = [("up", l) for l in reversed(levels) for _ in range(num_res_blocks + 1)]

  def names(blocks):
    return [f"{path}{l}" for path, l in blocks]

  def attended(blocks):
    return names((path, l) for path, l in blocks if l in attention)

  return {
      "ResnetBlock": names(down) + ["mid", "mid"] + names(up),
      "AttnBlock": attended(down) + ["mid"] + attended(up),
      "Downsample": [f"down{l}" for l in levels[:-1]],
      "Upsample": [f"up{l}" for l in reversed(levels[1:])],
  }


def _unet_leaf_kind(module: str, names: list[str]) -> str:
  """The kind of a leaf inside one of the UNet's top-level submodules."""
  child = _indexed(names[1])[0]
  if child == "GroupNorm":
    return "norm"
  if module == "ResnetBlock":
    if names[1] == "Dense_0":
      return "temb"  # the projection of the time embedding into the block
    return "conv" if child == "Conv" or names[1] == "nin_shortcut" else "other"
  if module == "AttnBlock":
    return "attention" if names[1] in ("q", "k", "v", "proj_out") else "other"
  if module in ("Downsample", "Upsample"):
    return "conv" if child == "Conv" else "other"
  return "other"


# Top-level leaves outside the stages: the input conv, the time-embedding MLP, the output head.
_UNET_TOP_LEVEL = {"Conv_0": ("stem", "conv"), "Dense_0": ("temb", "temb"),
                   "Dense_1": ("temb", "temb"), "GroupNorm_0": ("head", "head"),
                   "Conv_1": ("head", "head")}


def unet_param_blocks(params: PyTree, num_levels: int, num_res_blocks: int,
                      attention_levels) -> ParamBlocks:
  """Blocks of a `diffdyn.models.unet.UNet`'s params, from their Flax names.

  Partitions:
    stage/<s>: stem (input conv), temb (time-embedding MLP), down<l>, mid, up<l>, head
      (output GroupNorm and conv); a ResnetBlock's time projection is in its stage.
    kind/<k>: conv (3x3 convs, 1x1 shortcuts, resampling convs, input conv), attention
      (q, k, v, proj_out), norm (GroupNorm scale and shift inside blocks), temb (the MLP and
      every block's projection of it), head (output GroupNorm and conv).
  A leaf the UNet's naming does not explain goes to stage/other and kind/other.
  gn_fed/<s>: per stage, each ResnetBlock's first conv and time projection (Conv_0 and
    Dense_0). Their sum only feeds the block's second GroupNorm, which removes its scale:
    loss(c w) = loss(w) up to GroupNorm's epsilon, so tr H_ww scales as 1 / c^2 and
    tr(H_ww) ||w||^2 does not. Every other weight reaches the output through a residual sum
    as well, and is not scale-invariant.

  Args:
    params: the UNet's params (or a pytree of their shapes).
    num_levels: len(channel_mult).
    num_res_blocks: ResnetBlocks per down level.
    attention_levels: the levels l with attention, those whose resolution
      image_size // 2**l is in attn_resolutions.

  Raises:
    ValueError: the params' counts of ResnetBlocks, AttnBlocks, Downsamples or Upsamples are
      not those of this architecture.
  """
  stages = unet_module_stages(num_levels, num_res_blocks, attention_levels)
  paths = [_path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for module, expected in stages.items():
    found = {_indexed(names[0])[1] for names in paths if _indexed(names[0])[0] == module}
    if found != set(range(len(expected))):
      raise ValueError(f"params have {len(found)} {module} modules; a UNet with "
                       f"{num_levels} levels, {num_res_blocks} res blocks and attention at "
                       f"levels {list(attention_levels)} has {len(expected)}")

  blocks: dict[str, list[int]] = {}
  groups: dict[str, dict[str, list[int]]] = {}
  for leaf, names in enumerate(paths):
    module, index = _indexed(names[0])
    if names[0] in _UNET_TOP_LEVEL:
      stage, kind = _UNET_TOP_LEVEL[names[0]]
    elif module in stages and len(names) > 1:
      stage, kind = stages[module][index], _unet_leaf_kind(module, names)
    else:
      stage, kind = "other", "other"
    blocks.setdefault(f"stage/{stage}", []).append(leaf)
    blocks.setdefault(f"kind/{kind}", []).append(leaf)
    if module == "ResnetBlock" and names[1] in ("Conv_0", "Dense_0"):
      groups.setdefault(f"gn_fed/{stage}", {}).setdefault(names[0], []).append(leaf)
  for name, by_module in groups.items():
    blocks[name] = [leaf for members in by_module.values() for leaf in members]
  return ParamBlocks(
      num_leaves=len(paths), blocks={name: tuple(v) for name, v in blocks.items()},
      scale_invariant={name: tuple(tuple(g) for g in by_module.values())
                       for name, by_module in groups.items()})


def unet_attention_levels(image_size: int, num_levels: int, attn_resolutions) -> list[int]:
  """The levels l whose feature maps, image_size // 2**l wide, have attention.

  The UNet's stride-2 convolutions halve even sizes exactly; the config requires image_size
  to be divisible by 2**(num_levels - 1).
  """
  return [l for l in range(num_levels) if image_size // 2 ** l in set(attn_resolutions)]


def block_traces(leaf_probes: jax.Array, params: PyTree,
                 blocks: ParamBlocks) -> dict[str, dict[str, jax.Array]]:
  """Per-block traces, parameter norms and norm-normalised traces from per-leaf probes.

  Args:
    leaf_probes: (num_probes, L) per-leaf Hutchinson values of one objective (`hutchinson`
      with per_leaf=True).
    params: the params measured (their norms normalise the scale-invariant blocks).
    blocks: the blocks.

  Returns:
    dict of name -> dict with
      mean, stderr: the block's trace tr(H_bb), estimated from the probes summed over it.
      norm: ||w_b||, the block's parameter norm.
      normalized_mean, normalized_stderr (gn_fed blocks only): sum over the block's
        scale-invariant groups g of tr(H_gg) ||w_g||^2, unchanged by scaling any group.
  """
  leaves = jax.tree.leaves(params)
  if not len(leaves) == leaf_probes.shape[-1] == blocks.num_leaves:
    raise ValueError(f"blocks describe {blocks.num_leaves} leaves, params have {len(leaves)} "
                     f"and the probes {leaf_probes.shape[-1]}")
  out = {}
  # Sums of probes can nearly cancel; TF32 sums would not be float32-accurate.
  with jax.default_matmul_precision("float32"):
    leaf_sq_norms = jnp.stack([jnp.sum(jnp.square(x)) for x in leaves]).astype(leaf_probes.dtype)
    membership = jnp.asarray(blocks.membership(), leaf_probes.dtype)
    block_probes = _sample_stats(leaf_probes @ membership.T)
    block_sq_norms = membership @ leaf_sq_norms
    for b, name in enumerate(blocks.blocks):
      out[name] = dict(mean=block_probes["mean"][b], stderr=block_probes["stderr"][b],
                       norm=jnp.sqrt(block_sq_norms[b]))
      if name in blocks.scale_invariant:
        # Each leaf of group g weighs in with ||w_g||^2: the probe is sum_g (v.Hv)_g ||w_g||^2.
        weights = jnp.zeros(blocks.num_leaves, leaf_probes.dtype)
        for group in blocks.scale_invariant[name]:
          index = jnp.asarray(group)
          weights = weights.at[index].set(jnp.sum(leaf_sq_norms[index]))
        normalized = _sample_stats(leaf_probes @ weights)
        out[name].update(normalized_mean=normalized["mean"],
                         normalized_stderr=normalized["stderr"])
  return out


# ---------------------------------------------------------------------------------------
# Memory-planned chunking.
# ---------------------------------------------------------------------------------------
class ChunkPlan(NamedTuple):
  """The largest probe chunk whose compiled program fits a memory budget.

  planned_bytes > the budget means that even chunk_size 1 does not fit.
  """
  chunk_size: int
  planned_bytes: int
  compiled: Any


def planned_bytes(compiled) -> int:
  """Device memory XLA plans for a compiled program: arguments, outputs and temporaries.

  Outputs that alias (donated) arguments are counted once. Generated code is left out.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    raise ValueError("this backend gives no memory analysis of compiled programs")
  return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes
             + stats.output_size_in_bytes - stats.alias_size_in_bytes)


def plan_chunk_size(build: Callable[[int], Callable], args: tuple, num_probes: int,
                    max_bytes: float) -> ChunkPlan:
  """Chooses probes per chunk by compiling candidates, never by running them.

  Candidates are the divisors of num_probes (no ragged last chunk). The planned memory grows
  with the chunk (tangent memory is linear in the probes mapped at once), so the largest
  chunk that fits is found by bisection from the top: one compile when all probes fit,
  about 2 + log2(number of divisors) otherwise.

  Args:
    build: chunk_size -> jitted measurement (with `.lower`), e.g.
      `lambda c: get_curvature_fn(..., chunk_size=c)`.
    args: example arguments (arrays or jax.ShapeDtypeStruct) to lower it with.
    num_probes: the probes per measurement.
    max_bytes: the budget.

  Returns:
    ChunkPlan(chunk_size, planned_bytes, compiled) of the chosen chunk; `compiled` runs it.
  """
  candidates = [c for c in range(num_probes, 0, -1) if num_probes % c == 0]
  plans: dict[int, ChunkPlan] = {}

  def plan(i):
    if i not in plans:
      compiled = build(candidates[i]).lower(*args).compile()
      plans[i] = ChunkPlan(candidates[i], planned_bytes(compiled), compiled)
    return plans[i]

  if plan(0).planned_bytes <= max_bytes:
    return plans[0]
  last = len(candidates) - 1
  if last == 0 or plan(last).planned_bytes > max_bytes:
    return plan(last)
  too_big, fits = 0, last  # invariant: candidates[too_big] does not fit, candidates[fits] does
  while fits - too_big > 1:
    middle = (too_big + fits) // 2
    if plan(middle).planned_bytes <= max_bytes:
      fits = middle
    else:
      too_big = middle
  return plans[fits]


# ---------------------------------------------------------------------------------------
# The training loop's measurement.
# ---------------------------------------------------------------------------------------
def probe_timesteps(batch_size: int, num_timesteps: int) -> np.ndarray:
  """Timesteps spread evenly over [0, T): t_i = floor((i + 0.5) T / B), ascending, int32.

  Stratifying t removes the largest source of batch-to-batch spread in the measured trace
  (the loss and its curvature vary by orders of magnitude across t).
  """
  return np.floor((np.arange(batch_size) + 0.5) * num_timesteps / batch_size).astype(np.int32)


def make_probe_batch(rng: jax.Array, images_uint8: jax.Array, batch_size: int,
                     num_timesteps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The fixed batch every curvature measurement of a run is taken on.

  Args:
    rng: PRNG key; derive it once from the run's seed so resumed runs measure the same batch.
    images_uint8: (N, ...) uint8 images.
    batch_size: examples in the probe batch; distinct images when batch_size <= N.
    num_timesteps: T of the diffusion schedule.

  Returns:
    (x0 float32 in [-1, 1], t int32 from `probe_timesteps`, noise float32 standard normal).
  """
  num_images = images_uint8.shape[0]
  index_rng, noise_rng = jax.random.split(rng)
  index = jax.random.choice(index_rng, num_images, (batch_size,),
                            replace=batch_size > num_images)
  x0 = jnp.asarray(images_uint8)[index].astype(jnp.float32) / 127.5 - 1.0
  t = jnp.asarray(probe_timesteps(batch_size, num_timesteps))
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  return x0, t, noise


def _at_least_float32(params: PyTree) -> PyTree:
  """Promotes bf16/f16 leaves to float32; float32 and float64 leaves are kept."""
  return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), params)


def _band_masks(t: jax.Array, num_timesteps: int, num_bands: int) -> jax.Array:
  """(K, B) booleans: example i has its timestep in band k of K equal bands of [0, T)."""
  bands = diffusion.timestep_bins(t, num_timesteps, num_bands)
  return bands[None, :] == jnp.arange(num_bands)[:, None]


def _stats_metrics(prefix: str, stats: dict, j: int) -> dict[str, jax.Array]:
  metrics = {f"{prefix}hutch_trace_mean": stats["mean"][j],
             f"{prefix}hutch_trace_std": stats["std"][j],
             f"{prefix}hutch_trace_stderr": stats["stderr"][j],
             f"{prefix}tr_h2": stats["tr_h2"][j]}
  for i in range(stats["probes"].shape[0]):
    metrics[f"{prefix}hutch_trace_probe/{i}"] = stats["probes"][i, j]
  return metrics


def _mean_squares(residual_fn: Callable) -> Callable:
  """(params, x0, t, noise) -> (B,) mean squared residual per example, in its own dtype."""
  def per_example_loss(params, x0, t, noise):
    r = residual_fn(params, x0, t, noise)
    return jnp.mean(jnp.square(r).reshape(r.shape[0], -1), axis=1)
  return per_example_loss


def _measurement_setup(per_example_loss_fn: Callable | None, residual_fn: Callable | None,
                       loss_weights, num_timesteps: int, objective: str,
                       t_bands: int = 0) -> tuple[Callable, list[str], Callable]:
  """Checks the objectives' arguments; returns (per-example loss, metric prefixes, rows).

  rows(t) -> ((m, B) coefficients c_j with objective_j = c_j . l, band counts or None): the
  train and/or reference rows in the order of the prefixes, then the band rows.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
  weights = np.asarray(loss_weights)
  if weights.shape != (num_timesteps,):
    raise ValueError(f"loss_weights must have shape ({num_timesteps},), got {weights.shape}")
  if t_bands < 0:
    raise ValueError(f"t_bands must be >= 0, got {t_bands}")
  if per_example_loss_fn is None:
    if residual_fn is None:
      raise ValueError("give per_example_loss_fn or residual_fn")
    per_example_loss_fn = _mean_squares(residual_fn)
  prefixes = {"train": ["curvature/"], "reference": ["curvature/ref/"],
              "both": ["curvature/", "curvature/ref/"]}[objective]

  def rows(t):
    batch_size = t.shape[0]
    out = []
    if objective in ("train", "both"):
      out.append(jnp.asarray(weights)[t] / batch_size)
    if objective in ("reference", "both"):
      out.append(jnp.full((batch_size,), 1.0 / batch_size))
    out = jnp.stack(out)
    if not t_bands:
      return out, None
    masks = _band_masks(t, num_timesteps, t_bands)
    counts = masks.sum(axis=1)
    band_rows = masks / jnp.maximum(counts, 1)[:, None]
    return jnp.concatenate([out, band_rows.astype(out.dtype)]), counts

  return per_example_loss_fn, prefixes, rows


def _batch_objectives(per_example_loss_fn: Callable, coefficients: jax.Array,
                      probe_batch) -> Callable:
  """params -> (m,) objectives c_j . l on the fixed probe batch."""
  x0, t, noise = probe_batch

  def objectives(p):
    losses = per_example_loss_fn(p, x0, t, noise)
    return coefficients.astype(losses.dtype) @ losses

  return objectives


def _ggn_metrics(residual_fn: Callable, params: PyTree, probe_batch, rows: jax.Array,
                 prefixes: list[str], rng: jax.Array, num_probes: int,
                 chunk_size: int | None) -> dict[str, jax.Array]:
  x0, t, noise = probe_batch
  stats = gauss_newton_trace(lambda p: residual_fn(p, x0, t, noise), params, rng, num_probes,
                             rows[:len(prefixes)], chunk_size)
  metrics = {}
  for j, prefix in enumerate(prefixes):
    metrics[f"{prefix}ggn_trace_mean"] = stats["mean"][j]
    metrics[f"{prefix}ggn_trace_stderr"] = stats["stderr"][j]
  return metrics


def _map_over_objectives(measure: Callable[[LossFn], Any], objectives: Callable,
                         count: int) -> Any:
  """measure(objective j) for j < count, stacked: one mapped loop over the objectives.

  A Python loop would trace and compile the measurement (Lanczos around an HVP) once per
  objective; mapped, a "both" measurement compiles it once, with the same start vectors.
  """
  return jax.lax.map(lambda j: measure(lambda p: objectives(p)[j]), jnp.arange(count))


def _precond_metrics(objectives: Callable, params: PyTree, prefixes: list[str],
                     preconditioner: AdamPreconditioner, rng: jax.Array,
                     num_iters: int) -> dict[str, jax.Array]:
  sharpness = _map_over_objectives(
      lambda loss_fn: preconditioned_sharpness(loss_fn, params, preconditioner.diagonal, rng,
                                               num_iters), objectives, len(prefixes))
  metrics = {}
  for j, prefix in enumerate(prefixes):
    metrics[f"{prefix}precond_sharpness"] = sharpness[j]
    metrics[f"{prefix}precond_threshold"] = jnp.asarray(preconditioner.threshold, jnp.float32)
  return metrics


def _block_metrics(prefix: str, leaf_probes: jax.Array, params: PyTree, blocks: ParamBlocks,
                   with_norms: bool) -> dict[str, jax.Array]:
  metrics = {}
  for name, b in block_traces(leaf_probes, params, blocks).items():
    metrics[f"{prefix}block/{name}/hutch_trace_mean"] = b["mean"]
    metrics[f"{prefix}block/{name}/hutch_trace_stderr"] = b["stderr"]
    if "normalized_mean" in b:
      metrics[f"{prefix}block/{name}/normalized_trace"] = b["normalized_mean"]
      metrics[f"{prefix}block/{name}/normalized_trace_stderr"] = b["normalized_stderr"]
    if with_norms:
      metrics[f"curvature/param_norm/{name}"] = b["norm"]
  return metrics


def get_curvature_fn(per_example_loss_fn: Callable | None, loss_weights, num_timesteps: int, *,
                     num_probes: int = 16, estimator: str = "hutchinson",
                     objective: str = "both", t_bands: int = 0, chunk_size: int | None = None,
                     top_eig_iters: int = 0, blocks: ParamBlocks | None = None,
                     residual_fn: Callable | None = None,
                     precond_iters: int = 0) -> Callable:
  """Builds the jitted curvature measurement `fn(params, probe_batch, rng) -> metrics`.

  Objectives, with l_i = per_example_loss_fn(params, x0, t, noise)[i] over the B examples:
    train:     mean_i w[t_i] l_i, the run's own weighted loss (what the seed harness measured).
    reference: mean_i l_i, unweighted; comparable across runs with different weightings.
    band k:    mean of l_i over the examples whose t lies in the k-th of `t_bands` equal
               bands of [0, T); the reference loss is sum_k (n_k / B) band_k.
  All objectives use the same probe vectors, so their differences are low-variance.

  Args:
    per_example_loss_fn: (params, x0, t, noise) -> (B,) unweighted eps-space MSE per example;
      deterministic (dropout off) and computed in float32 (build the model in float32 even if
      training runs in bfloat16; the params are promoted to float32 here). None: the mean
      square of `residual_fn` per example.
    loss_weights: (T,) per-timestep weights, e.g. `diffusion.loss_weight(...)`.
    num_timesteps: T.
    num_probes: Hutchinson probes, or the Hutch++ matvec budget, per objective.
    estimator: "hutchinson" or "hutch++".
    objective: "train", "reference" or "both".
    t_bands: K > 0 adds the reference trace restricted to each of K timestep bands.
    chunk_size: probes vmapped at once (None: all); bounds memory. `plan_chunk_size` picks
      it from a memory budget.
    top_eig_iters: Lanczos steps for the top Hessian eigenvalue; 0 skips it.
    blocks: per-block traces from the same probes (Hutchinson only), their parameter norms,
      the normalised traces of the scale-invariant blocks and tr/P; e.g. `unet_param_blocks`.
    residual_fn: (params, x0, t, noise) -> (B, ...) prediction minus target, with
      per_example_loss = mean of its square over all but the batch axis; adds the
      Gauss-Newton trace on the same probe vectors (Hutchinson only).
    precond_iters: Lanczos steps for Adam's preconditioned sharpness lambda_max(P^-1 H);
      then fn takes a fourth argument, the `AdamPreconditioner` of the params measured.

  Returns:
    fn(params, probe_batch=(x0, t, noise), rng[, preconditioner]) -> dict of scalars:
      curvature/hutch_trace_{mean,std,stderr}, curvature/hutch_trace_probe/{i},
      curvature/tr_h2 [, curvature/top_eig]                         (train objective)
      curvature/ref/... with the same names                         (reference objective)
      curvature/band/{k}/hutch_trace_{mean,stderr}                  (t_bands > 0; NaN if empty)
      with blocks, per objective prefix:
        block/<name>/hutch_trace_{mean,stderr} for every block, which add up to
        hutch_trace_mean within each of the stage/ and kind/ partitions;
        block/gn_fed/<stage>/normalized_trace[_stderr]: sum_g tr(H_gg) ||w_g||^2;
        trace_per_param: hutch_trace_mean / P, the mean eigenvalue;
      and once, curvature/param_norm/<name> (objective-independent).
      with residual_fn, per prefix: ggn_trace_{mean,stderr}.
      with precond_iters, per prefix: precond_sharpness, precond_threshold.
    Keys name the objective, so objective="reference" writes only curvature/ref/... (and
    curvature/param_norm/...).

  Cost, with m = (1 or 2) + t_bands objectives: Hutchinson runs num_probes HVPs over the
  probe batch, each one forward and m backward passes; Hutch++ runs m * num_probes full
  HVPs; Lanczos adds top_eig_iters HVPs per train/reference objective and stores
  top_eig_iters + 1 flattened parameter vectors, and precond_iters likewise. Blocks cost no
  matvec; the Gauss-Newton trace adds num_probes JVPs. Each per-probe key is one output of
  the compiled function (a few ms of compile time each on CPU).
  """
  _check_estimator(estimator, num_probes)
  per_example_loss_fn, prefixes, objective_rows = _measurement_setup(
      per_example_loss_fn, residual_fn, loss_weights, num_timesteps, objective, t_bands)
  if top_eig_iters < 0 or precond_iters < 0:
    raise ValueError(f"top_eig_iters and precond_iters must be >= 0, got {top_eig_iters}, "
                     f"{precond_iters}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
  if (blocks is not None or residual_fn is not None) and estimator != "hutchinson":
    raise ValueError(f"per-block and Gauss-Newton traces need estimator='hutchinson', "
                     f"got {estimator!r}")

  def curvature_fn(params, probe_batch, rng, preconditioner=None):
    if precond_iters and preconditioner is None:
      raise ValueError("precond_iters > 0: pass the AdamPreconditioner of these params")
    t = probe_batch[1]
    params = _at_least_float32(params)
    trace_rng, eig_rng = jax.random.split(rng)
    coefficients, band_counts = objective_rows(t)
    objectives = _batch_objectives(per_example_loss_fn, coefficients, probe_batch)

    stats = hutchinson(objectives, params, trace_rng, num_probes, estimator, chunk_size,
                       per_leaf=blocks is not None)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    if top_eig_iters:
      top_eigs = _map_over_objectives(
          lambda loss_fn: top_eigenvalue(loss_fn, params, eig_rng, top_eig_iters), objectives,
          len(prefixes))
    metrics = {}
    for j, prefix in enumerate(prefixes):
      metrics.update(_stats_metrics(prefix, stats, j))
      if top_eig_iters:
        metrics[f"{prefix}top_eig"] = top_eigs[j]
      if blocks is not None:
        metrics.update(_block_metrics(prefix, stats["leaf_probes"][:, j], params, blocks,
                                      with_norms=j == 0))
        metrics[f"{prefix}trace_per_param"] = stats["mean"][j] / num_params
    for k in range(t_bands):
      j = len(prefixes) + k
      nonempty = band_counts[k] > 0
      for name in ("mean", "stderr"):
        metrics[f"curvature/band/{k}/hutch_trace_{name}"] = jnp.where(
            nonempty, stats[name][j], jnp.nan)
    if residual_fn is not None:
      metrics.update(_ggn_metrics(residual_fn, params, probe_batch, coefficients, prefixes,
                                  trace_rng, num_probes, chunk_size))
    if precond_iters:
      metrics.update(_precond_metrics(objectives, params, prefixes, preconditioner, eig_rng,
                                      precond_iters))
    return metrics

  return jax.jit(curvature_fn)


def get_ggn_trace_fn(residual_fn: Callable, loss_weights, num_timesteps: int, *,
                     num_probes: int = 16, objective: str = "both",
                     chunk_size: int | None = None) -> Callable:
  """The Gauss-Newton part of `get_curvature_fn` alone, to time it against a train step.

  fn(params, probe_batch, rng) -> {prefix + "ggn_trace_mean", ...}: the same probe vectors
  and values as get_curvature_fn(..., residual_fn=residual_fn) for the same rng.
  """
  _, prefixes, objective_rows = _measurement_setup(None, residual_fn, loss_weights,
                                                   num_timesteps, objective)

  def ggn_fn(params, probe_batch, rng):
    params = _at_least_float32(params)
    trace_rng, _ = jax.random.split(rng)
    coefficients, _ = objective_rows(probe_batch[1])
    return _ggn_metrics(residual_fn, params, probe_batch, coefficients, prefixes, trace_rng,
                        num_probes, chunk_size)

  return jax.jit(ggn_fn)


def get_precond_sharpness_fn(per_example_loss_fn: Callable | None, loss_weights,
                             num_timesteps: int, *, num_iters: int = 20,
                             objective: str = "both",
                             residual_fn: Callable | None = None) -> Callable:
  """Adam's preconditioned sharpness alone (the precond part of `get_curvature_fn`).

  fn(params, probe_batch, rng, preconditioner: AdamPreconditioner) ->
    {prefix + "precond_sharpness", prefix + "precond_threshold"}, equal to get_curvature_fn's
    values for the same rng.
  """
  per_example_loss_fn, prefixes, objective_rows = _measurement_setup(
      per_example_loss_fn, residual_fn, loss_weights, num_timesteps, objective)

  def precond_fn(params, probe_batch, rng, preconditioner):
    params = _at_least_float32(params)
    _, eig_rng = jax.random.split(rng)
    coefficients, _ = objective_rows(probe_batch[1])
    objectives = _batch_objectives(per_example_loss_fn, coefficients, probe_batch)
    return _precond_metrics(objectives, params, prefixes, preconditioner, eig_rng, num_iters)

  return jax.jit(precond_fn)


DENSITY_OBJECTIVE_NAMES = {"curvature/": "train", "curvature/ref/": "ref"}


def get_spectral_density_fn(per_example_loss_fn: Callable | None, loss_weights,
                            num_timesteps: int, *, objective: str = "both", num_runs: int = 4,
                            num_steps: int = 30, num_points: int = 512,
                            broadening: float = 0.01,
                            residual_fn: Callable | None = None) -> Callable:
  """The Hessian's spectral density by SLQ, a separate program for its lower frequency.

  fn(params, probe_batch, rng) -> dict of arrays, per objective name N ("train", "ref"):
    N_nodes, N_weights: (num_runs, m) quadrature nodes and weights
      (`stochastic_lanczos_quadrature`), enough to redraw the density on any grid;
    N_grid: (num_points,) eigenvalues; N_density: (num_points,) the broadened density on
      it (`density_grid`, `spectral_density`); N_sigma: the Gaussian width.
  The run loop saves them as curvature_density/step_XXXXXX.npz.

  Cost: num_runs * num_steps HVPs per objective, one run after another, each holding
  num_steps + 1 flattened parameter vectors.
  """
  per_example_loss_fn, prefixes, objective_rows = _measurement_setup(
      per_example_loss_fn, residual_fn, loss_weights, num_timesteps, objective)
  if num_runs < 1 or num_steps < 1 or num_points < 2 or not broadening > 0:
    raise ValueError(f"need num_runs, num_steps >= 1, num_points >= 2 and broadening > 0, got "
                     f"{num_runs}, {num_steps}, {num_points}, {broadening}")

  def density_fn(params, probe_batch, rng):
    params = _at_least_float32(params)
    _, eig_rng = jax.random.split(rng)
    coefficients, _ = objective_rows(probe_batch[1])
    objectives = _batch_objectives(per_example_loss_fn, coefficients, probe_batch)
    all_nodes, all_weights = _map_over_objectives(
        lambda loss_fn: stochastic_lanczos_quadrature(loss_fn, params, eig_rng, num_runs,
                                                      num_steps), objectives, len(prefixes))
    out = {}
    for j, prefix in enumerate(prefixes):
      name = DENSITY_OBJECTIVE_NAMES[prefix]
      nodes, weights = all_nodes[j], all_weights[j]
      grid, sigma = density_grid(nodes, num_points, broadening)
      out.update({f"{name}_nodes": nodes, f"{name}_weights": weights, f"{name}_grid": grid,
                  f"{name}_density": spectral_density(nodes, weights, grid, sigma),
                  f"{name}_sigma": sigma})
    return out

  return jax.jit(density_fn)
