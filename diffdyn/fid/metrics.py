"""Inception features -> statistics, Frechet distance and KID; the reference-statistics cache.

Everything here runs on the host in float64: the matrices are at most 2048 x 2048.
"""
from __future__ import annotations

import hashlib
import logging
import os
import zipfile

import numpy as np

from diffdyn.errors import UserError
from diffdyn.fid import inception
from diffdyn.fid import weights as weights_lib

log = logging.getLogger("diffdyn")


def _as_features(features, what="features") -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise UserError(f"{what} must be an (N, D) array with N >= 2, got shape {features.shape}; "
                    "pass more than one image")
  return features


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of (N, D) features: float64 mean and covariance with ddof=1."""
  features = _as_features(features)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _covariance_factor(sigma: np.ndarray) -> np.ndarray:
  """F with F F^T = sigma, for a symmetric positive semi-definite sigma (D, D) -> (D, r).

  Cholesky where sigma is definite (a third of an eigendecomposition's work); otherwise the
  eigenvectors of the positive eigenvalues, scaled: rounding leaves tiny negative eigenvalues
  on singular covariances, and they are zeros.
  """
  try:
    return np.linalg.cholesky(sigma)
  except np.linalg.LinAlgError:
    w, v = np.linalg.eigh(sigma)
    keep = w > 0
    return v[:, keep] * np.sqrt(w[keep])


def _trace_sqrt_of_factored(factor1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((F F^T sigma2)^(1/2)) for F (D, r) and a symmetric PSD sigma2 (D, D).

  The nonzero eigenvalues of F F^T sigma2 are those of the symmetric PSD r x r matrix
  F^T sigma2 F, so the trace is the sum of their square roots: no complex sqrtm, no
  ill-conditioned solve, and singular covariances need no offset.
  """
  m = factor1.T @ sigma2 @ factor1
  eig = np.linalg.eigvalsh((m + m.T) / 2.0)
  return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr((sigma1 sigma2)^(1/2)) for symmetric positive semi-definite sigma1, sigma2."""
  return _trace_sqrt_of_factored(_covariance_factor(sigma1), sigma2)


def _as_stats(mu, sigma) -> tuple[np.ndarray, np.ndarray]:
  return np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))


def _check_dimensions(mu1_shape, sigma1_shape, mu2_shape, sigma2_shape) -> None:
  d = mu1_shape[0]
  if (len(mu1_shape), sigma1_shape, mu2_shape, sigma2_shape) != (1, (d, d), (d,), (d, d)):
    raise UserError(f"Frechet distance needs mu (D,) and sigma (D, D) of one D; got "
                    f"{mu1_shape}, {sigma1_shape}, {mu2_shape}, {sigma2_shape}: compute both "
                    "statistics from features of the same network")


def _symmetric(sigma: np.ndarray) -> np.ndarray:
  return (sigma + sigma.T) / 2.0


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

  Not clipped at 0: a tiny negative value is rounding on (near-)identical statistics.
  """
  (mu1, sigma1), (mu2, sigma2) = _as_stats(mu1, sigma1), _as_stats(mu2, sigma2)
  _check_dimensions(mu1.shape, sigma1.shape, mu2.shape, sigma2.shape)
  sigma1, sigma2 = _symmetric(sigma1), _symmetric(sigma2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_of_features(features, mu2, sigma2) -> float:
  """`frechet_distance(*feature_stats(features), mu2, sigma2)`, cheaper for N <= D features.

  The covariance of N centred features X is F F^T with F = X^T / sqrt(N - 1), an exact
  factor of rank < N: with fewer samples than dimensions (a milestone FID of a few hundred
  samples in Inception's 2048), the trace needs an N x N eigenvalue problem, not a D x D one.
  """
  features = _as_features(features)
  n, d = features.shape
  if n > d:
    return frechet_distance(*feature_stats(features), mu2, sigma2)
  mu2, sigma2 = _as_stats(mu2, sigma2)
  _check_dimensions((d,), (d, d), mu2.shape, sigma2.shape)
  sigma2 = _symmetric(sigma2)
  mu1 = features.mean(axis=0)
  factor1 = (features - mu1).T / np.sqrt(n - 1)
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(np.square(factor1)) + np.trace(sigma2)
               - 2.0 * _trace_sqrt_of_factored(factor1, sigma2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """k(x, y) = (x . y / d + 1)^3, the KID kernel."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 between equal-size samples x, y under the KID kernel."""
  m = x.shape[0]
  kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  return float(within - 2.0 * kxy.mean())


def kid(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: (mean, std) of unbiased MMD^2 over random subsets.

  Each subset draws min(subset_size, N1, N2) rows of each set without replacement; `seed`
  makes the draw repeatable.
  """
  f1, f2 = _as_features(features1, "features1"), _as_features(features2, "features2")
  if f1.shape[1] != f2.shape[1]:
    raise UserError(f"KID needs features of one dimension, got {f1.shape[1]} and {f2.shape[1]}")
  if num_subsets < 1:
    raise UserError(f"KID num_subsets must be >= 1, got {num_subsets}")
  m = min(subset_size, f1.shape[0], f2.shape[0])
  if m < 2:
    raise UserError(f"KID subset_size must be >= 2, got {subset_size}")
  rng = np.random.default_rng(seed)
  values = np.array([
      mmd2_unbiased(f1[rng.choice(f1.shape[0], m, replace=False)],
                    f2[rng.choice(f2.shape[0], m, replace=False)])
      for _ in range(num_subsets)])
  return float(values.mean()), float(values.std())


def dataset_fingerprint(images: np.ndarray) -> str:
  """sha1 of a uint8 image array's shape and bytes."""
  h = hashlib.sha1(f"{images.dtype.str}|{images.shape}|".encode())
  h.update(np.ascontiguousarray(images).tobytes())
  return h.hexdigest()


def load_stats(path: str) -> dict:
  """{'mu', 'sigma'} (and 'features' if stored) from an .npz; UserError if unusable."""
  if not os.path.isfile(path):
    raise UserError(f"FID statistics file {path} does not exist; pass an .npz with 'mu' and "
                    "'sigma' (python -m diffdyn.fid stats makes one)")
  try:
    with np.load(path, allow_pickle=False) as f:
      stats = {k: f[k] for k in ("mu", "sigma", "features") if k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f"cannot read {path} as an .npz ({type(e).__name__}); pass an .npz with "
                    "'mu' and 'sigma'") from e
  if "mu" not in stats or "sigma" not in stats:
    raise UserError(f"{path} lacks 'mu' or 'sigma'; pass an .npz with both "
                    "(python -m diffdyn.fid stats makes one)")
  mu, sigma = stats["mu"], stats["sigma"]
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together; "
                    "mu must be (D,) and sigma (D, D)")
  stats["mu"], stats["sigma"] = mu.astype(np.float64), sigma.astype(np.float64)
  return stats


def save_stats(path: str, stats: dict, **meta) -> None:
  """Writes stats (and string metadata) as an .npz, atomically."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **stats, **{k: np.asarray(v) for k, v in meta.items()})
  os.replace(tmp, path)


def reference_stats(params, images_uint8, *, cache_dir: str | None = None,
                    weights_hash: str | None = None, batch_size: int = 500,
                    keep_features: bool = False, precision=None) -> dict:
  """{'mu', 'sigma'} of a dataset's Inception features, computed once and cached.

  The cache file is keyed by the weights' hash, the preprocessing version, `precision`
  and the dataset's fingerprint, so any change to one of them computes afresh. With
  `keep_features`, the (N, 2048) features are kept too (float32), for KID.
  """
  images = inception.check_images(images_uint8)
  cache_dir = cache_dir or weights_lib.default_cache_dir()
  key = "|".join([weights_hash or weights_lib.weights_hash(params),
                  inception.PREPROCESSING_VERSION, str(precision), dataset_fingerprint(images)])
  path = os.path.join(cache_dir, "fid_stats",
                      f"ref_{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz")
  if os.path.isfile(path):
    stats = load_stats(path)
    if not keep_features or "features" in stats:
      log.info("FID reference statistics from %s", path)
      return stats
  features = inception.inception_features(params, images, batch_size, precision=precision)
  mu, sigma = feature_stats(features)
  stats = {"mu": mu, "sigma": sigma}
  if keep_features:
    stats["features"] = features.astype(np.float32)
  save_stats(path, stats, key=key, num_images=images.shape[0])
  log.info("FID reference statistics of %d images cached in %s", images.shape[0], path)
  return stats
