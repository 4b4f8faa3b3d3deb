"""Confidence intervals for seed means, differences between seed groups and correlations.

Every interval is two-sided at level `confidence`. With one seed there is no spread to
estimate, so the functions return the point estimate with `method == SINGLE_SEED` and NaN
bounds rather than inventing an interval.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as sps

SINGLE_SEED = "single seed: no interval"

# Fieller, Hartley & Pearson (1957): var(atanh(rho_s)) ~= 1.06 / (n - 3) for Spearman's rho.
_SPEARMAN_VARIANCE_FACTOR = 1.06


@dataclasses.dataclass(frozen=True)
class Interval:
  """A point estimate with its confidence interval (NaN bounds when there is none)."""
  estimate: float
  low: float = math.nan
  high: float = math.nan
  sizes: tuple[int, ...] = (1,)
  method: str = SINGLE_SEED
  confidence: float = 0.95

  @property
  def has_interval(self) -> bool:
    return math.isfinite(self.low) and math.isfinite(self.high)

  def includes(self, value: float) -> bool:
    """True when `value` lies inside the interval; False when there is no interval."""
    return self.has_interval and self.low <= value <= self.high

  def to_json(self) -> dict:
    return dict(estimate=self.estimate, low=self.low, high=self.high, n=list(self.sizes),
                method=self.method, confidence=self.confidence)


def _finite_array(values: Sequence[float], what: str) -> np.ndarray:
  x = np.asarray(values, dtype=np.float64).ravel()
  if x.size == 0:
    raise ValueError(f"{what}: no values")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: non-finite value in {x.tolist()}")
  return x


def _t_quantile(confidence: float, df: float) -> float:
  return float(sps.t.ppf(0.5 + confidence / 2.0, df))


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """Mean of per-seed values with a Student-t interval (n >= 2)."""
  x = _finite_array(values, "mean_interval")
  mean = float(x.mean())
  if x.size < 2:
    return Interval(mean, confidence=confidence)
  half = _t_quantile(confidence, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
  return Interval(mean, mean - half, mean + half, (x.size,), f"t, df={x.size - 1}", confidence)


def _welch(var_a: float, n_a: int, var_b: float, n_b: int) -> tuple[float, float]:
  """Standard error of a difference of means and its Welch-Satterthwaite df."""
  se2 = var_a / n_a + var_b / n_b
  if se2 == 0.0:
    # Identical replicates: the spread is zero and the df formula is 0/0.
    return 0.0, float(n_a + n_b - 2)
  df = se2 ** 2 / ((var_a / n_a) ** 2 / (n_a - 1) + (var_b / n_b) ** 2 / (n_b - 1))
  return math.sqrt(se2), df


def welch_difference(a: Sequence[float], b: Sequence[float],
                     confidence: float = 0.95) -> Interval:
  """mean(b) - mean(a) with a Welch t interval (unequal variances); needs 2+ seeds each."""
  xa = _finite_array(a, "welch_difference (first group)")
  xb = _finite_array(b, "welch_difference (second group)")
  diff = float(xb.mean() - xa.mean())
  sizes = (xa.size, xb.size)
  if min(sizes) < 2:
    return Interval(diff, sizes=sizes, confidence=confidence)
  se, df = _welch(float(xa.var(ddof=1)), xa.size, float(xb.var(ddof=1)), xb.size)
  half = _t_quantile(confidence, df) * se
  return Interval(diff, diff - half, diff + half, sizes, f"Welch t, df={df:.1f}", confidence)


def relative_change(a: Sequence[float], b: Sequence[float],
                    confidence: float = 0.95) -> Interval:
  """mean(b) / mean(a) - 1, with an interval from the delta method on the log ratio.

  The log scale keeps the interval inside (-1, inf) for positive quantities (curvature
  traces, FID); the df follow Welch-Satterthwaite on the two log-scale variance terms.
  """
  xa = _finite_array(a, "relative_change (baseline)")
  xb = _finite_array(b, "relative_change (treatment)")
  mean_a, mean_b = float(xa.mean()), float(xb.mean())
  sizes = (xa.size, xb.size)
  estimate = mean_b / mean_a - 1.0 if mean_a != 0.0 else math.nan
  if min(sizes) < 2:
    return Interval(estimate, sizes=sizes, confidence=confidence)
  if mean_a <= 0.0 or mean_b <= 0.0:
    return Interval(estimate, sizes=sizes, method="no interval: a mean is not positive",
                    confidence=confidence)
  var_a = float(xa.var(ddof=1)) / mean_a ** 2
  var_b = float(xb.var(ddof=1)) / mean_b ** 2
  se, df = _welch(var_a, xa.size, var_b, xb.size)
  half = _t_quantile(confidence, df) * se
  log_ratio = math.log(mean_b / mean_a)
  return Interval(estimate, math.expm1(log_ratio - half), math.expm1(log_ratio + half), sizes,
                  f"delta method on log ratio, Welch df={df:.1f}", confidence)


def _fisher_interval(r: float, n: int, num_controls: int, name: str, rank_based: bool,
                     confidence: float) -> Interval:
  """Fisher-z interval for a (partial) correlation; none when n is too small."""
  dof = n - 3 - num_controls
  label = f"{name}, Fisher z"
  if not math.isfinite(r):
    return Interval(r, sizes=(n,), method=f"{name}: undefined (constant input)",
                    confidence=confidence)
  if dof < 1:
    return Interval(r, sizes=(n,), method=f"{name}: no interval (n={n} too small)",
                    confidence=confidence)
  if abs(r) >= 1.0:
    return Interval(r, r, r, (n,), label, confidence)
  factor = _SPEARMAN_VARIANCE_FACTOR if rank_based else 1.0
  half = sps.norm.ppf(0.5 + confidence / 2.0) * math.sqrt(factor / dof)
  z = math.atanh(r)
  return Interval(r, math.tanh(z - half), math.tanh(z + half), (n,), label, confidence)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  xc, yc = x - x.mean(), y - y.mean()
  denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
  return float(xc @ yc) / denom if denom > 0.0 else math.nan


def _ranked(x: np.ndarray, method: str) -> np.ndarray:
  if method == "spearman":
    return sps.rankdata(x)
  if method == "pearson":
    return x
  raise ValueError(f"unknown correlation method {method!r}; expected 'pearson' or 'spearman'")


def correlation(x: Sequence[float], y: Sequence[float], method: str = "pearson",
                confidence: float = 0.95) -> Interval:
  """Pearson or Spearman correlation with a Fisher-z interval."""
  xs, ys = _finite_array(x, "correlation x"), _finite_array(y, "correlation y")
  if xs.size != ys.size:
    raise ValueError(f"correlation: x has {xs.size} values, y has {ys.size}")
  r = _pearson(_ranked(xs, method), _ranked(ys, method))
  return _fisher_interval(r, xs.size, 0, method, method == "spearman", confidence)


def _residuals(v: np.ndarray, control: np.ndarray) -> np.ndarray:
  design = np.stack([np.ones_like(control), control], axis=1)
  coef, *_ = np.linalg.lstsq(design, v, rcond=None)
  return v - design @ coef


def partial_correlation(x: Sequence[float], y: Sequence[float], control: Sequence[float],
                        method: str = "pearson", confidence: float = 0.95) -> Interval:
  """Correlation of x and y after removing what a straight line in `control` explains.

  For "spearman" all three are ranked first (the rank partial correlation).
  """
  xs, ys = _finite_array(x, "partial x"), _finite_array(y, "partial y")
  cs = _finite_array(control, "partial control")
  if not xs.size == ys.size == cs.size:
    raise ValueError(f"partial_correlation: sizes {xs.size}, {ys.size}, {cs.size} differ")
  xr, yr, cr = _ranked(xs, method), _ranked(ys, method), _ranked(cs, method)
  r = _pearson(_residuals(xr, cr), _residuals(yr, cr))
  return _fisher_interval(r, xs.size, 1, f"partial {method}", method == "spearman",
                          confidence)
