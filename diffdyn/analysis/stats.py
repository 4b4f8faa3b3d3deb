"""Confidence intervals and tests for seed means, differences between seed groups, correlations.

Every interval is two-sided at level `confidence`. With one seed there is no spread to
estimate, so the functions return the point estimate with `method == SINGLE_SEED` and NaN
bounds rather than inventing an interval; replicates with identical values get a
`no spread: ...` method and NaN bounds too, never a zero-width interval.

Differences carry a two-sided p-value (`Interval.p_value`, NaN where there is no test):
Welch's t for independent groups; for two groups that share their seeds (each seed's runs
share the initialisation, data stream, noise and probe batch) the paired differences, with a
t interval and, for n <= `EXACT_SIGN_FLIP_MAX_N` pairs, the exact sign-flip permutation test.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np
from scipy import stats as sps

SINGLE_SEED = "single seed: no interval"
# Pairs up to which the paired test enumerates all 2^n sign patterns (1024 at 10) instead of
# relying on the t distribution, which small n cannot check.
EXACT_SIGN_FLIP_MAX_N = 10
# 1.4826 * MAD estimates the standard deviation of normal data (1 / Phi^-1(3/4)).
MAD_TO_SD = 1.0 / float(sps.norm.ppf(0.75))


def no_spread(n: int, what: str = "runs") -> str:
  return f"no spread: {n} {what}, identical values"


def _identical(x: np.ndarray) -> bool:
  """All values equal up to float round-off (x - 0.3 for x = 0..7 is not exactly equal)."""
  return float(np.ptp(x)) <= 1e-12 * float(np.max(np.abs(x)))

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
  p_value: float = math.nan
  test: str = ""

  @property
  def has_interval(self) -> bool:
    return math.isfinite(self.low) and math.isfinite(self.high)

  @property
  def has_test(self) -> bool:
    return math.isfinite(self.p_value)

  def includes(self, value: float) -> bool:
    """True when `value` lies inside the interval; False when there is no interval."""
    return self.has_interval and self.low <= value <= self.high

  def to_json(self) -> dict:
    return dict(estimate=self.estimate, low=self.low, high=self.high, n=list(self.sizes),
                method=self.method, confidence=self.confidence, p_value=self.p_value,
                test=self.test)


def _finite_array(values: Sequence[float], what: str) -> np.ndarray:
  x = np.asarray(values, dtype=np.float64).ravel()
  if x.size == 0:
    raise ValueError(f"{what}: no values")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: non-finite value in {x.tolist()}")
  return x


def _t_quantile(confidence: float, df: float) -> float:
  return float(sps.t.ppf(0.5 + confidence / 2.0, df))


def _two_sided_t(t: float, df: float) -> float:
  return float(2.0 * sps.t.sf(abs(t), df))


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """Mean of per-seed values with a Student-t interval (n >= 2 values that differ)."""
  x = _finite_array(values, "mean_interval")
  mean = float(x.mean())
  if x.size < 2:
    return Interval(mean, confidence=confidence)
  if _identical(x):
    return Interval(mean, sizes=(x.size,), method=no_spread(x.size), confidence=confidence)
  half = _t_quantile(confidence, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
  return Interval(mean, mean - half, mean + half, (x.size,), f"t, df={x.size - 1}", confidence)


def _welch(var_a: float, n_a: int, var_b: float, n_b: int) -> tuple[float, float]:
  """Standard error of a difference of means and its Welch-Satterthwaite df (se > 0)."""
  se2 = var_a / n_a + var_b / n_b
  df = se2 ** 2 / ((var_a / n_a) ** 2 / (n_a - 1) + (var_b / n_b) ** 2 / (n_b - 1))
  return math.sqrt(se2), df


def _no_spread_in_groups(sizes: Sequence[int]) -> str:
  return f"no spread: {' and '.join(map(str, sizes))} runs, identical values in each group"


def welch_difference(a: Sequence[float], b: Sequence[float],
                     confidence: float = 0.95) -> Interval:
  """mean(b) - mean(a) with a Welch t interval and test; needs 2+ seeds each."""
  xa = _finite_array(a, "welch_difference (first group)")
  xb = _finite_array(b, "welch_difference (second group)")
  diff = float(xb.mean() - xa.mean())
  sizes = (xa.size, xb.size)
  if min(sizes) < 2:
    return Interval(diff, sizes=sizes, confidence=confidence)
  if _identical(xa) and _identical(xb):
    return Interval(diff, sizes=sizes, method=_no_spread_in_groups(sizes),
                    confidence=confidence)
  se, df = _welch(float(xa.var(ddof=1)), xa.size, float(xb.var(ddof=1)), xb.size)
  half = _t_quantile(confidence, df) * se
  return Interval(diff, diff - half, diff + half, sizes, f"Welch t, df={df:.1f}", confidence,
                  _two_sided_t(diff / se, df), "Welch t")


def sign_flip_p_value(differences: Sequence[float]) -> float:
  """Exact two-sided p of the sign-flip permutation test of mean(differences) = 0.

  Under the null each paired difference is as likely to have either sign, so all 2^n sign
  patterns are equally likely; p is the share of them whose |mean| reaches the observed one
  (the observed pattern included, so p >= 2 / 2^n for differences that are not all zero).
  """
  d = _finite_array(differences, "sign_flip_p_value")
  observed = abs(float(d.sum()))
  signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
  sums = np.abs(signs @ d)
  # Patterns that tie the observed sum in exact arithmetic may differ from it by round-off.
  tol = 1e-9 * max(float(np.abs(d).sum()), 1e-300)
  return float(np.mean(sums >= observed - tol))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                      exact_max_n: int = EXACT_SIGN_FLIP_MAX_N) -> Interval:
  """mean(b_i - a_i) over pairs i, with a paired t interval and a test.

  The test is the exact sign-flip test for n <= exact_max_n pairs, else the paired t test.
  Identical differences have no spread and so no interval, but the sign-flip test still
  applies: n pairs all shifted the same way give p = 2 / 2^n.
  """
  xa = _finite_array(a, "paired_difference (first group)")
  xb = _finite_array(b, "paired_difference (second group)")
  if xa.size != xb.size:
    raise ValueError(f"paired_difference: {xa.size} and {xb.size} values do not pair")
  d = xb - xa
  n, diff = d.size, float(d.mean())
  if n < 2:
    return Interval(diff, sizes=(n,), confidence=confidence)
  sd = float(d.std(ddof=1))
  spread = not _identical(d)
  if n <= exact_max_n:
    p, test = sign_flip_p_value(d), f"exact sign-flip test over 2^{n} = {2 ** n} patterns"
  elif spread:
    p, test = _two_sided_t(diff / (sd / math.sqrt(n)), n - 1), "paired t"
  else:
    p, test = (0.0 if diff != 0 else 1.0), "paired t (no spread)"
  if not spread:
    return Interval(diff, sizes=(n,), method=no_spread(n, "pairs"), confidence=confidence,
                    p_value=p, test=test)
  half = _t_quantile(confidence, n - 1) * sd / math.sqrt(n)
  return Interval(diff, diff - half, diff + half, (n,), f"paired t, df={n - 1}", confidence,
                  p, test)


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values, in the input order.

  Rejecting every hypothesis whose adjusted p is <= alpha controls the chance of any false
  rejection at alpha, as criteria joined by OR need.
  """
  p = np.asarray(p_values, dtype=np.float64)
  order = np.argsort(p, kind="stable")
  m = p.size
  adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
  out = np.empty(m)
  out[order] = np.minimum(adjusted, 1.0)
  return out.tolist()


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
  if _identical(xa) and _identical(xb):
    return Interval(estimate, sizes=sizes, method=_no_spread_in_groups(sizes),
                    confidence=confidence)
  se, df = _welch(var_a, xa.size, var_b, xb.size)
  half = _t_quantile(confidence, df) * se
  log_ratio = math.log(mean_b / mean_a)
  return Interval(estimate, math.expm1(log_ratio - half), math.expm1(log_ratio + half), sizes,
                  f"delta method on log ratio, Welch df={df:.1f}", confidence)


def paired_relative_change(a: Sequence[float], b: Sequence[float],
                           confidence: float = 0.95) -> Interval:
  """mean(b) / mean(a) - 1 for paired values, with a delta-method interval on the log ratio.

  To first order log(mean b) - log(mean a) is the mean of u_i = b_i / mean(b) - a_i / mean(a),
  so its standard error is sd(u) / sqrt(n), with n - 1 df: the pairing's covariance enters.
  """
  xa = _finite_array(a, "paired_relative_change (baseline)")
  xb = _finite_array(b, "paired_relative_change (treatment)")
  if xa.size != xb.size:
    raise ValueError(f"paired_relative_change: {xa.size} and {xb.size} values do not pair")
  mean_a, mean_b, n = float(xa.mean()), float(xb.mean()), xa.size
  estimate = mean_b / mean_a - 1.0 if mean_a != 0.0 else math.nan
  if n < 2:
    return Interval(estimate, sizes=(n,), confidence=confidence)
  if mean_a <= 0.0 or mean_b <= 0.0:
    return Interval(estimate, sizes=(n,), method="no interval: a mean is not positive",
                    confidence=confidence)
  u = xb / mean_b - xa / mean_a
  sd = float(u.std(ddof=1))
  if float(np.ptp(u)) <= 1e-12:
    return Interval(estimate, sizes=(n,), method=no_spread(n, "pairs"), confidence=confidence)
  half = _t_quantile(confidence, n - 1) * sd / math.sqrt(n)
  log_ratio = math.log(mean_b / mean_a)
  return Interval(estimate, math.expm1(log_ratio - half), math.expm1(log_ratio + half), (n,),
                  f"paired delta method on log ratio, df={n - 1}", confidence)


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


def rolling_median(values: Sequence[float], window: int) -> np.ndarray:
  """Median of each point's centred neighbourhood of up to `window` points (odd window).

  Near the ends the neighbourhood shrinks symmetrically (to the point alone at either end),
  so a monotone stretch of a curve is its own rolling median: the residuals there are 0.
  """
  x = np.asarray(values, dtype=np.float64)
  if window < 1 or window % 2 == 0:
    raise ValueError(f"rolling_median: window must be an odd integer >= 1, got {window}")
  half, n = window // 2, x.size
  out = np.empty(n)
  for i in range(n):
    h = min(half, i, n - 1 - i)
    out[i] = np.median(x[i - h:i + h + 1])
  return out


def robust_sd(values: Sequence[float]) -> float:
  """MAD_TO_SD times the median absolute deviation from the median: an outlier-proof SD."""
  x = np.asarray(values, dtype=np.float64)
  if x.size == 0:
    raise ValueError("robust_sd: no values")
  return MAD_TO_SD * float(np.median(np.abs(x - np.median(x))))


def noise_sd(values: Sequence[float]) -> float:
  """The point-to-point noise SD of a curve: robust_sd of its second differences / sqrt(6).

  x[i-1] - 2 x[i] + x[i+1] cancels a locally linear trend and has variance 6 sigma^2 for
  independent noise of SD sigma; the MAD ignores the few second differences a spike
  touches. Residuals from a rolling median cannot give this: where the noise is smaller
  than the trend's step the curve stays monotone and they are exactly 0.
  """
  x = np.asarray(values, dtype=np.float64)
  if x.size < 3:
    return 0.0
  return robust_sd(x[:-2] - 2.0 * x[1:-1] + x[2:]) / math.sqrt(6.0)
