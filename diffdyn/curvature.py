"""Curvature of a loss: Hessian-vector products, stochastic trace estimates, top eigenvalues.

Every estimator here touches the Hessian H only through Hessian-vector products
(forward-over-reverse differentiation), so parameters can be any pytree of any size.

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

import math
from typing import Any, Callable

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


def _quadratic_forms(hv: PyTree, v: PyTree) -> jax.Array:
  """v . (H_j v) for each j, from stacked products `hv` (leaves (m, ...)) -> (m,)."""
  return sum(jnp.tensordot(h, x, axes=x.ndim)
             for h, x in zip(jax.tree.leaves(hv), jax.tree.leaves(v)))


def _squared_norms(hv: PyTree) -> jax.Array:
  """||H_j v||^2 for each j, from stacked products `hv` -> (m,)."""
  return sum(jnp.square(h).reshape(h.shape[0], -1).sum(axis=1) for h in jax.tree.leaves(hv))


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


def _hutchinson_probes(loss_fn: LossFn, params: PyTree, rng: jax.Array, num_probes: int,
                       chunk_size: int | None) -> tuple[jax.Array, jax.Array]:
  """Per-probe v^T H_j v and ||H_j v||^2, each (num_probes, m), for a (m,)-valued loss."""
  def one_probe(key):
    v = _rademacher_like(key, params)
    hv = _stacked_hvp(loss_fn, params, v)
    return _quadratic_forms(hv, v), _squared_norms(hv)
  return _map_over_probes(one_probe, jax.random.split(rng, num_probes), chunk_size)


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
               estimator: str = "hutchinson", chunk_size: int | None = None) -> dict:
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
  """
  _check_estimator(estimator, num_probes)
  out_shape = jax.eval_shape(loss_fn, params).shape
  if len(out_shape) > 1:
    raise ValueError(f"loss_fn must return a scalar or a vector, got shape {out_shape}")
  vector_loss = loss_fn if out_shape else (lambda p: loss_fn(p)[None])

  with jax.default_matmul_precision("float32"):
    if estimator == "hutchinson":
      values, sq_norms = _hutchinson_probes(vector_loss, params, rng, num_probes, chunk_size)
    else:
      per_objective = [
          _hutchpp_probes(lambda p, j=j: vector_loss(p)[j], params, rng, num_probes, chunk_size)
          for j in range(out_shape[0] if out_shape else 1)]
      values = jnp.stack([v for v, _ in per_objective], axis=1)
      sq_norms = jnp.stack([s for _, s in per_objective], axis=1)

  std = jnp.std(values, axis=0, ddof=1)
  stats = dict(mean=jnp.mean(values, axis=0), std=std, stderr=std / math.sqrt(values.shape[0]),
               probes=values, tr_h2=jnp.mean(sq_norms, axis=0))
  if not out_shape:
    stats = {name: x[..., 0] for name, x in stats.items()}
  return stats


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


def lanczos_ritz_values(loss_fn: LossFn, params: PyTree, rng: jax.Array,
                        num_iters: int = 20) -> jax.Array:
  """Ritz values (ascending) of the Hessian from `num_iters` Lanczos steps.

  Full reorthogonalisation against every previous Lanczos vector keeps the basis orthonormal,
  so no spurious copies of converged eigenvalues appear; it stores (num_iters + 1) flattened
  parameter vectors. When the Krylov space becomes invariant (H has few distinct eigenvalues
  along the start vector) the recurrence restarts from a fresh random vector orthogonal to the
  basis, so the tridiagonal matrix splits into blocks and every Ritz value stays a true
  Rayleigh quotient of H. `num_iters` is capped at the number of parameters.

  The extremal Ritz values converge first: the largest from below, the smallest from above.
  A repeated eigenvalue shows up once (Lanczos sees one copy per Krylov block).
  """
  flat_params, unravel = ravel_pytree(params)
  dim = flat_params.shape[0]
  num_iters = min(num_iters, dim)
  dtype = flat_params.dtype
  tiny = jnp.finfo(dtype).eps

  def flat_hvp(x):
    return ravel_pytree(hvp(loss_fn, params, unravel(x)))[0]

  def random_unit(key, basis):
    return _unit_or_zero(_orthogonalize(jax.random.normal(key, (dim,), dtype), basis))

  def step(j, carry):
    basis, alphas, betas = carry
    v = basis[j]
    w = flat_hvp(v)
    alpha = jnp.vdot(v, w)
    w_norm = jnp.linalg.norm(w)
    w = _orthogonalize(w, basis)
    beta = jnp.linalg.norm(w)
    invariant = beta <= tiny * w_norm
    next_v = jnp.where(invariant, random_unit(jax.random.fold_in(restart_rng, j), basis),
                       _unit_or_zero(w))
    return (basis.at[j + 1].set(next_v), alphas.at[j].set(alpha),
            betas.at[j].set(jnp.where(invariant, 0, beta)))

  start_rng, restart_rng = jax.random.split(rng)
  with jax.default_matmul_precision("float32"):
    basis = jnp.zeros((num_iters + 1, dim), dtype)
    basis = basis.at[0].set(random_unit(start_rng, basis))
    _, alphas, betas = jax.lax.fori_loop(
        0, num_iters, step, (basis, jnp.zeros(num_iters, dtype), jnp.zeros(num_iters, dtype)))
    off_diagonal = betas[:-1]
    tridiagonal = jnp.diag(alphas) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)
    return jnp.linalg.eigvalsh(tridiagonal)


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


def get_curvature_fn(per_example_loss_fn: Callable, loss_weights, num_timesteps: int, *,
                     num_probes: int = 16, estimator: str = "hutchinson",
                     objective: str = "both", t_bands: int = 0, chunk_size: int | None = None,
                     top_eig_iters: int = 0) -> Callable:
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
      training runs in bfloat16; the params are promoted to float32 here).
    loss_weights: (T,) per-timestep weights, e.g. `diffusion.loss_weight(...)`.
    num_timesteps: T.
    num_probes: Hutchinson probes, or the Hutch++ matvec budget, per objective.
    estimator: "hutchinson" or "hutch++".
    objective: "train", "reference" or "both".
    t_bands: K > 0 adds the reference trace restricted to each of K timestep bands.
    chunk_size: probes vmapped at once (None: all); bounds memory.
    top_eig_iters: Lanczos steps for the top Hessian eigenvalue; 0 skips it.

  Returns:
    fn(params, probe_batch=(x0, t, noise), rng) -> dict of scalars:
      curvature/hutch_trace_{mean,std,stderr}, curvature/hutch_trace_probe/{i},
      curvature/tr_h2 [, curvature/top_eig]                         (train objective)
      curvature/ref/... with the same names                         (reference objective)
      curvature/band/{k}/hutch_trace_{mean,stderr}                  (t_bands > 0; NaN if empty)
    Keys name the objective, so objective="reference" writes only curvature/ref/... .

  Cost, with m = (1 or 2) + t_bands objectives: Hutchinson runs num_probes HVPs over the
  probe batch, each one forward and m backward passes; Hutch++ runs m * num_probes full
  HVPs; Lanczos adds top_eig_iters HVPs per train/reference objective and stores
  top_eig_iters + 1 flattened parameter vectors. Each per-probe key is one output of the
  compiled function (a few ms of compile time each on CPU).
  """
  _check_estimator(estimator, num_probes)
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
  weights = np.asarray(loss_weights)
  if weights.shape != (num_timesteps,):
    raise ValueError(f"loss_weights must have shape ({num_timesteps},), got {weights.shape}")
  if t_bands < 0 or top_eig_iters < 0:
    raise ValueError(f"t_bands and top_eig_iters must be >= 0, got {t_bands}, {top_eig_iters}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
  prefixes = {"train": ["curvature/"], "reference": ["curvature/ref/"],
              "both": ["curvature/", "curvature/ref/"]}[objective]

  def objective_coefficients(t):
    """(m, B) rows c_j with objective_j = c_j . l; band rows come last."""
    batch_size = t.shape[0]
    rows = []
    if objective in ("train", "both"):
      rows.append(jnp.asarray(weights)[t] / batch_size)
    if objective in ("reference", "both"):
      rows.append(jnp.full((batch_size,), 1.0 / batch_size))
    rows = jnp.stack(rows)
    if not t_bands:
      return rows, None
    masks = _band_masks(t, num_timesteps, t_bands)
    counts = masks.sum(axis=1)
    band_rows = masks / jnp.maximum(counts, 1)[:, None]
    return jnp.concatenate([rows, band_rows.astype(rows.dtype)]), counts

  def curvature_fn(params, probe_batch, rng):
    x0, t, noise = probe_batch
    params = _at_least_float32(params)
    trace_rng, eig_rng = jax.random.split(rng)
    coefficients, band_counts = objective_coefficients(t)

    def objectives(p):
      losses = per_example_loss_fn(p, x0, t, noise)
      return coefficients.astype(losses.dtype) @ losses

    stats = hutchinson(objectives, params, trace_rng, num_probes, estimator, chunk_size)
    metrics = {}
    for j, prefix in enumerate(prefixes):
      metrics.update(_stats_metrics(prefix, stats, j))
      if top_eig_iters:
        metrics[f"{prefix}top_eig"] = top_eigenvalue(
            lambda p, j=j: objectives(p)[j], params, eig_rng, top_eig_iters)
    for k in range(t_bands):
      j = len(prefixes) + k
      nonempty = band_counts[k] > 0
      for name in ("mean", "stderr"):
        metrics[f"curvature/band/{k}/hutch_trace_{name}"] = jnp.where(
            nonempty, stats[name][j], jnp.nan)
    return metrics

  return jax.jit(curvature_fn)
