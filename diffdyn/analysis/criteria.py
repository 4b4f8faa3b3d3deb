"""The seed studies' success criteria, computed from runs and replicate groups.

- `e6_vs_e5`: Min-SNR vs constant weighting (seed w1-e6_minsnr_hutchinson.md).
- `e7_steps_vs_capacity`: more steps vs more width (seed w1-e7_steps_vs_capacity_plan.md).
- `curvature_fid_association`: the E7 report's "negative curvature-FID correlation".

Each criterion works on per-run numbers (each run's own logged points; step windows are
fractions of each run's own length) and compares groups by their seed means. Two groups that
share their seed list (config.json's `seed`) are compared pair by pair (`seed_pairing`);
otherwise as independent groups (Welch). Results are plain dicts of numbers,
`stats.Interval`s and verdict strings, ready for JSON and markdown. A criterion that lacks
data returns {"verdict": SKIPPED, "reason": ...} instead of failing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from diffdyn import errors
from diffdyn.analysis import runs as runs_lib
from diffdyn.analysis import stats

CURVATURE = "curvature/hutch_trace_mean"
REF_CURVATURE = "curvature/ref/hutch_trace_mean"
# With curvature.params "ema" or "both" the run logs the EMA parameters' curvature under this
# prefix with the raw keys' names (curvature/ema/hutch_trace_mean, curvature/ema/ref/...).
EMA_CURVATURE_PREFIX = "curvature/ema/"
MILESTONE_FID = "val/fid_milestone/fid"           # EMA parameters, eval.fid_num_samples
RAW_MILESTONE_FID = "val/fid_milestone_raw/fid"   # raw parameters (eval.fid_raw_params)
FINAL_FID = "eval/final/fid"                      # EMA parameters, eval.final_fid_num_samples

MET = "met"
NOT_MET = "not met"
NOT_DISTINGUISHABLE = "not distinguishable"
INCONCLUSIVE = "inconclusive"
SKIPPED = "skipped"

MINSNR_NOTE = (
    "Min-SNR-gamma multiplies each eps-loss term by min(SNR, gamma)/SNR <= 1, so the "
    "Hessian trace of the Min-SNR training objective is lower by construction. The "
    "reference objective (unweighted eps-MSE at the same parameters) is the fair comparison.")


@dataclasses.dataclass(frozen=True)
class Options:
  """Thresholds and windows; the defaults are the seed reports' values.

  Windows are (start, end) fractions of a run's total steps: the seeds' 6k-10k of a 10k run
  is (0.6, 1.0) and their post-burn-in 2k-10k is (0.2, 1.0). Both ends are included.
  """
  late_window: tuple[float, float] = (0.6, 1.0)
  spike_window: tuple[float, float] = (0.2, 1.0)
  spike_factor: float = 1.5
  # Detrended spikes: above the run's own rolling median (over this many logged points) by more
  # than spike_k robust SDs. 3.5 is Iglewicz and Hoaglin's cut for modified z-scores.
  spike_k: float = 3.5
  spike_median_window: int = 11
  curvature_drop: float = 0.15
  fid_tolerance: float = 0.10
  fid_ideal_gain: float = 0.05
  practical_threshold: float = 0.05
  confidence: float = 0.95
  small_n: int = 10

  def __post_init__(self):
    for name in ("late_window", "spike_window"):
      start, end = getattr(self, name)
      if not 0.0 <= start < end <= 1.0:
        raise errors.UserError(f"{name} must satisfy 0 <= start < end <= 1, got {start}, {end}")
    for name in ("spike_factor", "curvature_drop", "fid_tolerance", "fid_ideal_gain",
                 "practical_threshold"):
      if getattr(self, name) < 0:
        raise errors.UserError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not self.spike_k > 0:
      raise errors.UserError(f"spike_k must be > 0, got {self.spike_k}")
    w = self.spike_median_window
    if isinstance(w, bool) or not isinstance(w, int) or w < 3 or w % 2 == 0:
      raise errors.UserError(f"spike_median_window must be an odd integer >= 3, got {w}")
    if not 0.0 < self.confidence < 1.0:
      raise errors.UserError(f"confidence must be in (0, 1), got {self.confidence}")

  @property
  def alpha(self) -> float:
    """The significance level that goes with `confidence`."""
    return 1.0 - self.confidence


class Skip(Exception):
  """A criterion cannot be computed from these runs; the message says why."""


def guarded(compute: Callable[..., dict], *args, **kwargs) -> dict:
  """compute(*args, **kwargs), or a SKIPPED result carrying the reason."""
  try:
    return compute(*args, **kwargs)
  except Skip as e:
    return dict(verdict=SKIPPED, reason=str(e))


def window_steps(total_steps: int, window: tuple[float, float]) -> tuple[int, int]:
  """The inclusive step range a fractional window covers in a run of `total_steps`."""
  return int(round(window[0] * total_steps)), int(round(window[1] * total_steps))


def window_values(run: runs_lib.Run, key: str,
                  window: tuple[float, float]) -> tuple[np.ndarray, tuple[int, int]]:
  """The run's own logged values of `key` inside the window, NaNs left out."""
  if not run.has(key):
    raise Skip(f"{key!r} is not logged in {run.label} ({run.path})")
  lo, hi = window_steps(run.total_steps, window)
  steps, values = run.series(key)
  inside = values[(steps >= lo) & (steps <= hi)]
  inside = inside[~np.isnan(inside)]
  if inside.size == 0:
    raise Skip(f"{run.label} ({run.path}) has no {key!r} values in steps {lo}-{hi}")
  return inside, (lo, hi)


def curvature_key(run: runs_lib.Run, objective: str) -> str:
  """The metric holding the run's curvature of `objective` ("train" or "reference").

  A constant-weighting run's train objective is the reference objective itself, so its
  train curvature stands in when the reference was not logged separately.
  """
  if objective == "train":
    return CURVATURE
  if run.has(REF_CURVATURE):
    return REF_CURVATURE
  if runs_lib.config_get(run.config, "loss.weighting") == "constant" and run.has(CURVATURE):
    return CURVATURE
  raise Skip(f"{REF_CURVATURE!r} is not logged in {run.label} ({run.path}); log it with "
             "curvature.objective='both'")


def seed_pairing(base_rows: Sequence[dict], treat_rows: Sequence[dict]) -> tuple[list, str]:
  """([(seed, base row, treatment row)] in seed order, how) when the groups share their seeds.

  Pairs only when both groups have 2+ runs, every run's config gives a seed, no seed repeats
  and the two seed lists are the same set; otherwise ([], why not).
  """
  if min(len(base_rows), len(treat_rows)) < 2:
    return [], "single seed: nothing to pair"
  seeds = [[r.get("seed") for r in rows] for rows in (base_rows, treat_rows)]
  if any(s is None for group in seeds for s in group):
    return [], "a run's config.json gives no seed"
  if any(len(set(map(str, group))) < len(group) for group in seeds):
    return [], "a group repeats a seed"
  if set(map(str, seeds[0])) != set(map(str, seeds[1])):
    return [], f"the groups' seed lists differ ({seeds[0]} vs {seeds[1]})"
  treat_by_seed = {str(r["seed"]): r for r in treat_rows}
  pairs = sorted(((b["seed"], b, treat_by_seed[str(b["seed"])]) for b in base_rows),
                 key=lambda p: str(p[0]))
  return pairs, f"paired by seed ({len(pairs)} seeds shared by both groups)"


def _compare(base_rows: Sequence[dict], treat_rows: Sequence[dict], measure: str,
             confidence: float) -> dict:
  """Seed means of two groups' `measure`, their difference and relative change.

  Paired by seed when the groups share their seeds (`seed_pairing`), else Welch.
  """
  base = [r[measure] for r in base_rows]
  treat = [r[measure] for r in treat_rows]
  pairs, how = seed_pairing(base_rows, treat_rows)
  if pairs:
    a = [b[measure] for _, b, _ in pairs]
    b = [t[measure] for _, _, t in pairs]
    difference = stats.paired_difference(a, b, confidence)
    relative = stats.paired_relative_change(a, b, confidence)
  else:
    difference = stats.welch_difference(base, treat, confidence)
    relative = stats.relative_change(base, treat, confidence)
  return dict(baseline=stats.mean_interval(base, confidence),
              treatment=stats.mean_interval(treat, confidence), difference=difference,
              relative_change=relative,
              pairing=dict(paired=bool(pairs), how=how,
                           seeds=[seed for seed, _, _ in pairs]))


def _lower_by_at_least(diff: stats.Interval, rel_change: float, threshold: float, p: float,
                       alpha: float) -> str:
  """Verdict for "treatment is lower by >= threshold": the point estimate must pass the
  threshold and, where there is a test, its p-value must be <= alpha."""
  if not (diff.estimate < 0 and rel_change <= -threshold):
    return NOT_MET
  if not math.isfinite(p):
    return MET
  return MET if p <= alpha else NOT_DISTINGUISHABLE


def _fewer(diff: stats.Interval, p: float, alpha: float) -> str:
  if not math.isfinite(p):
    return MET if diff.estimate < 0 else NOT_MET
  if p > alpha:
    return NOT_DISTINGUISHABLE
  return MET if diff.estimate < 0 else NOT_MET


def _mean_change_verdict(block: dict, p: float, alpha: float) -> str:
  return _lower_by_at_least(block["difference"], block["relative_change"].estimate,
                            -block["threshold"], p, alpha)


def _spike_verdict(block: dict, p: float, alpha: float) -> str:
  return _fewer(block["difference"], p, alpha)


def _basis(interval: stats.Interval, p_adjusted: float | None = None) -> str:
  """What a verdict rests on: the test and its p-value, or why there is none."""
  if not interval.has_test:
    return interval.method
  text = f"{interval.test}, p = {interval.p_value:.3g}"
  if p_adjusted is not None:
    text += f", Holm-adjusted p = {p_adjusted:.3g}"
  if interval.has_interval:
    text += f"; {interval.confidence:.0%} interval: {interval.method}"
  else:
    text += f"; {interval.method}"
  return text


def _holm_correct(blocks: Sequence[tuple[dict, Callable]], alpha: float) -> dict:
  """Holm over the blocks that have a test; their verdicts then use the adjusted p.

  Criteria joined by OR are one family: without a correction, two tests at alpha each
  declare a shift more often than alpha when there is none.
  """
  tested = [(b, verdict) for b, verdict in blocks
            if b.get("verdict") != SKIPPED and b["difference"].has_test]
  if len(tested) < 2:
    return dict(method="none", reason="fewer than two criteria with a test (single seeds, "
                "no spread, or a criterion skipped)")
  adjusted = stats.holm([b["difference"].p_value for b, _ in tested])
  for (block, verdict), p_adj in zip(tested, adjusted):
    block["p_holm"] = p_adj
    block["verdict"] = verdict(block, p_adj, alpha)
    block["basis"] = _basis(block["difference"], p_adj)
  return dict(method="Holm", alpha=alpha, family=len(tested))


def curvature_mean_change(baseline: runs_lib.Group, treatment: runs_lib.Group,
                          objective: str, options: Options) -> dict:
  """Criterion (a): relative change of the mean curvature over the late window."""
  rows = {}
  for role, group in (("baseline", baseline), ("treatment", treatment)):
    rows[role] = []
    for run in group.runs:
      key = curvature_key(run, objective)
      values, (lo, hi) = window_values(run, key, options.late_window)
      if not np.all(np.isfinite(values)):
        raise Skip(f"{run.label} ({run.path}) has {np.sum(~np.isfinite(values))} infinite "
                   f"{key!r} value(s) in steps {lo}-{hi} (diverged?); the mean is undefined")
      rows[role].append(dict(run=run.label, seed=run.seed, path=str(run.path), key=key,
                             steps=[lo, hi], points=int(values.size),
                             mean=float(np.mean(values))))
  result = _compare(rows["baseline"], rows["treatment"], "mean", options.confidence)
  result.update(per_run=rows, window=list(options.late_window),
                threshold=-options.curvature_drop, basis=_basis(result["difference"]))
  result["verdict"] = _mean_change_verdict(result, result["difference"].p_value, options.alpha)
  return result


def _spike_comparison(rows: dict, options: Options) -> dict:
  """Spike counts (or fractions, when runs log different numbers of points) compared."""
  all_rows = rows["baseline"] + rows["treatment"]
  same_grid = len({r["points"] for r in all_rows}) == 1
  measure = "spikes" if same_grid else "fraction"
  result = _compare(rows["baseline"], rows["treatment"], measure, options.confidence)
  result.update(per_run=rows, window=list(options.spike_window), measure=measure,
                basis=_basis(result["difference"]),
                note=None if same_grid else "runs log different numbers of points in the "
                "window; the fraction of points that spike is compared instead of the count")
  result["verdict"] = _spike_verdict(result, result["difference"].p_value, options.alpha)
  return result


def curvature_spikes(baseline: runs_lib.Group, treatment: runs_lib.Group, objective: str,
                     options: Options) -> dict:
  """The seeds' literal criterion (b): points above spike_factor x the baseline's median.

  Level-sensitive: the line is a fixed level, so on smooth decaying curves it counts the
  baseline's own early points, not spikes (E5 = 300 + 600 exp(-s/3000) against 0.94 x E5
  gives 4 vs 0). Shown for comparison with the seeds; the verdict uses
  `curvature_detrended_spikes`. The median pools every baseline seed's points in the window.
  """
  windows = {}
  for role, group in (("baseline", baseline), ("treatment", treatment)):
    windows[role] = [(run, curvature_key(run, objective)) for run in group.runs]
  base_points = [window_values(run, key, options.spike_window)[0]
                 for run, key in windows["baseline"]]
  median = float(np.median(np.concatenate(base_points)))
  threshold = options.spike_factor * median
  rows = {}
  for role, members in windows.items():
    rows[role] = []
    for run, key in members:
      values, (lo, hi) = window_values(run, key, options.spike_window)
      count = int(np.sum(values > threshold))
      rows[role].append(dict(run=run.label, seed=run.seed, path=str(run.path), key=key,
                             steps=[lo, hi], points=int(values.size), spikes=count,
                             fraction=count / values.size))
  result = _spike_comparison(rows, options)
  result.update(baseline_median=median, factor=options.spike_factor, threshold=threshold,
                level_sensitive=True, used_in_verdict=False)
  return result


def detrended_spike_row(run: runs_lib.Run, key: str, options: Options) -> dict:
  """One run's points in the spike window that stand above its own curve's trend.

  The trend is the rolling median (options.spike_median_window logged points, centred) of the
  run's whole curve; a spike is a point whose residual exceeds options.spike_k noise SDs
  (`stats.noise_sd`, from the curve's second differences centred in the window). A
  noise-free curve has no spikes: on every monotone stretch its residuals are exactly 0.
  """
  if not run.has(key):
    raise Skip(f"{key!r} is not logged in {run.label} ({run.path})")
  steps, values = run.series(key)
  keep = ~np.isnan(values)
  steps, values = steps[keep], values[keep]
  lo, hi = window_steps(run.total_steps, options.spike_window)
  inside = (steps >= lo) & (steps <= hi)
  if not inside.any():
    raise Skip(f"{run.label} ({run.path}) has no {key!r} values in steps {lo}-{hi}")
  residual = (values - stats.rolling_median(values, options.spike_median_window))[inside]
  # Second differences centred inside the window (their ends may reach just outside it).
  lo_i, hi_i = np.flatnonzero(inside)[[0, -1]]
  around = values[max(lo_i - 1, 0):hi_i + 2]
  sd = stats.noise_sd(around[np.isfinite(around)])
  # Infinite points (a diverged measurement) count: they are above any line.
  flagged = (residual > options.spike_k * sd) & (residual > 0)
  return dict(run=run.label, seed=run.seed, path=str(run.path), key=key, steps=[lo, hi],
              points=int(inside.sum()), spikes=int(flagged.sum()),
              fraction=float(flagged.sum() / inside.sum()), noise_sd=sd,
              spike_steps=[int(s) for s in steps[inside][flagged]])


def curvature_detrended_spikes(baseline: runs_lib.Group, treatment: runs_lib.Group,
                               objective: str, options: Options) -> dict:
  """Criterion (b) as the verdict uses it: spikes above each run's own rolling median."""
  rows = {role: [detrended_spike_row(run, curvature_key(run, objective), options)
                 for run in group.runs]
          for role, group in (("baseline", baseline), ("treatment", treatment))}
  result = _spike_comparison(rows, options)
  result.update(k=options.spike_k, median_window=options.spike_median_window,
                level_sensitive=False, used_in_verdict=True)
  return result


def last_finite_value(run: runs_lib.Run, key: str) -> tuple[int, float]:
  """(step, value) of the run's last finite `key`; Skip when there is none."""
  if not run.has(key):
    raise Skip(f"{key!r} is not logged in {run.label} ({run.path})")
  steps, values = run.series(key)
  finite = np.flatnonzero(np.isfinite(values))
  if finite.size == 0:
    raise Skip(f"{run.label} ({run.path}) has no finite {key!r} value")
  return int(steps[finite[-1]]), float(values[finite[-1]])


def _within_margin(rel: stats.Interval, margin: float) -> str:
  """Non-inferiority: with replicates the whole interval must stay below +margin."""
  if not rel.has_interval:
    return MET if rel.estimate <= margin else NOT_MET
  if rel.high <= margin:
    return MET
  return NOT_MET if rel.low > margin else INCONCLUSIVE


def final_fid_change(baseline: runs_lib.Group, treatment: runs_lib.Group,
                     options: Options) -> dict:
  """Criterion (c): relative change of the final FID; success if no worse than +tolerance."""
  rows = {}
  for role, group in (("baseline", baseline), ("treatment", treatment)):
    rows[role] = [dict(run=run.label, seed=run.seed, path=str(run.path), step=step, fid=fid)
                  for run in group.runs for step, fid in [last_finite_value(run, FINAL_FID)]]
  result = _compare(rows["baseline"], rows["treatment"], "fid", options.confidence)
  rel = result["relative_change"]
  ideal_bound = rel.high if rel.has_interval else rel.estimate
  result.update(per_run=rows, tolerance=options.fid_tolerance,
                verdict=_within_margin(rel, options.fid_tolerance), basis=_basis(rel),
                ideal_gain=options.fid_ideal_gain,
                ideal_met=bool(ideal_bound <= -options.fid_ideal_gain))
  return result


def _either_met(results: Sequence[dict]) -> str:
  verdicts = [r["verdict"] for r in results]
  if MET in verdicts:
    return MET
  if all(v == SKIPPED for v in verdicts):
    return SKIPPED
  for v in (NOT_DISTINGUISHABLE, INCONCLUSIVE):
    if v in verdicts:
      return v
  return NOT_MET


def curvature_criteria(baseline: runs_lib.Group, treatment: runs_lib.Group, objective: str,
                       options: Options) -> dict:
  """Criteria (a) and detrended (b) on one objective: the shift counts if either is met.

  The two are one family, Holm-corrected where both have a test. The seeds' literal spike
  count is computed beside them (`spikes`) but does not enter the verdict.
  """
  mean_change = guarded(curvature_mean_change, baseline, treatment, objective, options)
  spikes = guarded(curvature_spikes, baseline, treatment, objective, options)
  detrended = guarded(curvature_detrended_spikes, baseline, treatment, objective, options)
  correction = _holm_correct([(mean_change, _mean_change_verdict),
                              (detrended, _spike_verdict)], options.alpha)
  return dict(objective=objective, mean_change=mean_change, spikes=spikes,
              detrended_spikes=detrended, correction=correction,
              verdict=_either_met([mean_change, detrended]))


def e6_vs_e5(baseline: runs_lib.Group, treatment: runs_lib.Group,
             options: Options = Options()) -> dict:
  """The E6 seed's criteria: curvature lower or less spiky, final FID no worse than +10%.

  "Useful probe" (the seed's overall success) needs the curvature shift and the FID band.
  The shift is judged on the reference objective when it was logged (see MINSNR_NOTE).
  """
  train = curvature_criteria(baseline, treatment, "train", options)
  reference = curvature_criteria(baseline, treatment, "reference", options)
  fid = guarded(final_fid_change, baseline, treatment, options)
  judged = reference if reference["verdict"] != SKIPPED else train
  if judged["verdict"] == SKIPPED or fid["verdict"] == SKIPPED:
    overall = SKIPPED
  elif judged["verdict"] == MET and fid["verdict"] == MET:
    overall = MET
  elif NOT_MET in (judged["verdict"], fid["verdict"]):
    overall = NOT_MET
  else:
    overall = INCONCLUSIVE
  weighting = runs_lib.config_get(treatment.config, "loss.weighting")
  caveat = None
  if judged is train and weighting == "minsnr":
    caveat = ("judged on the train objective because the reference objective was not "
              "logged; Min-SNR lowers that trace by construction, so a 'met' here is weak")
  return dict(
      baseline=baseline.name, treatment=treatment.name,
      baseline_seeds=baseline.size, treatment_seeds=treatment.size,
      train_objective=train, reference_objective=reference, final_fid=fid,
      overall=dict(verdict=overall, curvature_judged_on=judged["objective"], caveat=caveat),
      note=MINSNR_NOTE if weighting == "minsnr" or reference["verdict"] != SKIPPED else None)


def best_fid(run: runs_lib.Run, max_step: int | None = None) -> dict:
  """Lowest milestone FID (`MILESTONE_FID`, at steps <= max_step when given) and its step.

  Milestones only: they share one sample size (eval.fid_num_samples), while the final FID's
  larger sample has a smaller upward bias (see `fid_bias`) and would win by that alone.
  `num_evaluations` says how many milestones the minimum was taken over: a minimum over more
  noisy evaluations is lower by selection alone. Ties go to the earlier step; `at_first_eval`
  says whether the best came at the first milestone (the E7 report saw that in every run).
  """
  if not run.has(MILESTONE_FID):
    raise Skip(f"{MILESTONE_FID!r} is not logged in {run.label} ({run.path})")
  steps, values = run.series(MILESTONE_FID)
  keep = np.isfinite(values) & (steps <= (max_step if max_step is not None else steps.max()))
  if not keep.any():
    upto = f" at steps <= {max_step}" if max_step is not None else ""
    raise Skip(f"{run.label} ({run.path}) has no finite {MILESTONE_FID!r}{upto}")
  points = sorted(zip(values[keep].tolist(), steps[keep].tolist()))
  fid, step = points[0]
  first_step = int(steps[keep].min())
  return dict(run=run.label, seed=run.seed, path=str(run.path), best_fid=float(fid),
              step=int(step), source=MILESTONE_FID, num_evaluations=int(keep.sum()),
              max_step=max_step, sample_size=runs_lib.config_get(run.config,
                                                                 "eval.fid_num_samples"),
              first_eval_step=first_step, at_first_eval=int(step) == first_step)


def group_best_fid(group: runs_lib.Group, confidence: float,
                   max_step: int | None = None) -> dict:
  rows = [best_fid(run, max_step) for run in group.runs]
  return dict(group=group.name, seeds=group.size, per_run=rows, max_step=max_step,
              best_fid=stats.mean_interval([r["best_fid"] for r in rows], confidence),
              steps=[r["step"] for r in rows],
              num_evaluations=[r["num_evaluations"] for r in rows],
              at_first_eval=sum(r["at_first_eval"] for r in rows))


def _positive_int(value: Any) -> int | None:
  ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
  return value if ok else None


def fid_bias(run: runs_lib.Run) -> dict:
  """The run's FID bias from the two FIDs of one network at its last step.

  FID's expectation grows roughly as FID_inf + c / N with the sample size N. At the step of
  the final FID the run has a milestone FID too (N_m = eval.fid_num_samples) beside the final
  one (N_f = eval.final_fid_num_samples), so c = (FID_m - FID_f) / (1/N_m - 1/N_f) and the
  milestone FIDs sit c / N_m above FID_inf. One pair of noisy evaluations: an estimate, not
  a bound.
  """
  step, final = last_finite_value(run, FINAL_FID)
  if not run.has(MILESTONE_FID):
    raise Skip(f"{MILESTONE_FID!r} is not logged in {run.label} ({run.path})")
  steps, values = run.series(MILESTONE_FID)
  at = np.flatnonzero(steps == step)
  if at.size == 0 or not np.isfinite(values[at[0]]):
    raise Skip(f"{run.label} ({run.path}) has no milestone FID at step {step}, the step of its "
               "final FID, so no pair to estimate the bias from")
  n_m = _positive_int(runs_lib.config_get(run.config, "eval.fid_num_samples"))
  n_f = _positive_int(runs_lib.config_get(run.config, "eval.final_fid_num_samples"))
  if n_m is None or n_f is None or n_m == n_f:
    raise Skip(f"{run.label} ({run.path}): config.json's eval.fid_num_samples ({n_m}) and "
               f"eval.final_fid_num_samples ({n_f}) must be two different sample sizes")
  milestone = float(values[at[0]])
  slope = (milestone - final) / (1.0 / n_m - 1.0 / n_f)
  return dict(run=run.label, path=str(run.path), step=step, milestone_fid=milestone,
              final_fid=final, milestone_samples=n_m, final_samples=n_f, slope=slope,
              bias_at_milestone_samples=slope / n_m, bias_at_final_samples=slope / n_f,
              fid_at_infinite_samples=final - slope / n_f)


BETTER = "clearly better"
BETTER_SMALL = "better, but below the practical threshold"
WORSE = "clearly worse"
POINT_ONLY = "cannot be decided (single seed: no interval)"


def _fid_reading(diff: stats.Interval, rel_change: float, threshold: float,
                 alpha: float) -> tuple[str, bool]:
  """Verdict on a variant's best FID vs the reference and whether it counts as "<<".

  "<<" means the difference's test rejects 0 at alpha (variant lower) and the improvement is
  at least `threshold` of the reference FID. Without a test nothing can be decided.
  """
  if not diff.has_test:
    return f"cannot be decided ({diff.method})", False
  if diff.p_value > alpha:
    return NOT_DISTINGUISHABLE, False
  if diff.estimate < 0:
    return (BETTER, True) if -rel_change >= threshold else (BETTER_SMALL, False)
  return WORSE, False


def compare_best_fid(ref: dict, variant: dict, options: Options) -> dict:
  """A variant group's best FID against the reference group's (`group_best_fid` results)."""
  result = _compare(ref["per_run"], variant["per_run"], "best_fid", options.confidence)
  rel = result["relative_change"].estimate
  verdict, much_better = _fid_reading(result["difference"], rel, options.practical_threshold,
                                      options.alpha)
  point_reading = result["difference"].estimate < 0 and -rel >= options.practical_threshold
  result.update(reference=ref["group"], variant=variant["group"], improvement=-rel,
                threshold=options.practical_threshold, verdict=verdict,
                much_better=much_better if result["difference"].has_test else None,
                point_estimate_much_better=point_reading, basis=_basis(result["difference"]),
                max_step=ref["max_step"],
                num_evaluations=dict(reference=ref["num_evaluations"],
                                     variant=variant["num_evaluations"]))
  return result


def matched_milestones(ref: runs_lib.Group, variant: runs_lib.Group, max_step: int) -> dict:
  """Both groups' seed-mean milestone FIDs at the steps <= max_step that every run logged.

  `coincide` is True when every run of the variant has exactly the FIDs of the reference run
  with its seed there: runs that differ only in their length (same seed, same data stream,
  a learning rate that does not depend on the length) are the same run up to max_step.
  """
  def table(group):
    return {run.seed: {int(s): float(v) for s, v in zip(*run.series(MILESTONE_FID))
                       if s <= max_step and np.isfinite(v)}
            for run in group.runs if run.has(MILESTONE_FID)}
  ref_fids, var_fids = table(ref), table(variant)
  common = sorted(set.intersection(*(set(t) for t in [*ref_fids.values(), *var_fids.values()]))
                  if ref_fids and var_fids else set())
  rows = [dict(step=s, reference=float(np.mean([t[s] for t in ref_fids.values()])),
               variant=float(np.mean([t[s] for t in var_fids.values()]))) for s in common]
  shared = [seed for seed in var_fids if seed in ref_fids]
  coincide = bool(common) and bool(shared) and len(shared) == len(var_fids) and all(
      var_fids[seed][s] == ref_fids[seed][s] for seed in shared for s in common)
  return dict(steps=common, rows=rows, coincide=coincide)


E7_OUTCOMES = {
    (True, False): "under-training bottleneck: E7b << E7a, more steps help",
    (False, True): "under-capacity bottleneck: E7c << E7a, more width helps",
    (True, True): "both matter: more steps and more width each help; pick a sweet-spot config",
    (False, False): "neither improves: investigate FID / normalisation / sampler / "
                    "implementation",
}


def interpret_e7(steps_effect: dict, capacity_effect: dict) -> dict:
  """The plan's decision rule applied to the two comparisons against E7a."""
  if SKIPPED in (steps_effect["verdict"], capacity_effect["verdict"]):
    return dict(outcome="incomplete", text="cannot be interpreted: a comparison was skipped")
  point = E7_OUTCOMES[(steps_effect["point_estimate_much_better"],
                       capacity_effect["point_estimate_much_better"])]
  untested = [c for c in (steps_effect, capacity_effect) if c["much_better"] is None]
  if untested:
    return dict(outcome="undecided",
                text=f"cannot be decided: {untested[0]['difference'].method} (point estimates "
                     f"alone would read: {point})", point_estimate_reading=point)
  key = (steps_effect["much_better"], capacity_effect["much_better"])
  names = {(True, False): "under-training", (False, True): "under-capacity",
           (True, True): "both", (False, False): "neither"}
  return dict(outcome=names[key], text=E7_OUTCOMES[key], point_estimate_reading=point)


def _matched_limit(*groups: runs_lib.Group) -> int:
  """The last step every run of the groups reaches: milestones up to it are matched."""
  return min(run.total_steps for group in groups for run in group.runs)


def e7_steps_vs_capacity(reference: runs_lib.Group | None, longer: runs_lib.Group | None,
                         wider: runs_lib.Group | None, options: Options = Options(),
                         missing: dict[str, str] | None = None) -> dict:
  """Best milestone FID per group, E7b and E7c against E7a (and E7b against E7c), the verdict.

  Every comparison that decides is at matched milestones: each run's best over its milestones
  up to the shorter group's length (E7b's first 10k steps against E7a's 10k), so both minima
  are over the same number of evaluations of one sample size. E7b's best over its whole run
  is `steps_effect_over_run`, with the number of evaluations each minimum was taken over.
  A role whose group is None is skipped, with the reason from `missing` when given.
  """
  groups = dict(e7a=reference, e7b=longer, e7c=wider)
  best, bias = {}, {}
  for role, group in groups.items():
    if group is None:
      reason = (missing or {}).get(role, f"no {role} group among the runs")
      best[role] = dict(verdict=SKIPPED, reason=reason)
    else:
      best[role] = guarded(group_best_fid, group, options.confidence)
      bias[role] = [guarded(fid_bias, run) for run in group.runs]

  def compare(ref_role: str, variant_role: str, matched: bool = True) -> dict:
    for role in (ref_role, variant_role):
      if best[role].get("verdict") == SKIPPED:
        return dict(verdict=SKIPPED, reason=f"{role}: {best[role]['reason']}")
    if not matched:
      return dict(compare_best_fid(best[ref_role], best[variant_role], options), matched=False)
    ref, variant = groups[ref_role], groups[variant_role]
    limit = _matched_limit(ref, variant)
    try:
      result = compare_best_fid(group_best_fid(ref, options.confidence, limit),
                                group_best_fid(variant, options.confidence, limit), options)
    except Skip as e:
      return dict(verdict=SKIPPED, reason=str(e))
    return dict(result, matched=True, milestones=matched_milestones(ref, variant, limit))

  steps_effect, capacity_effect = compare("e7a", "e7b"), compare("e7a", "e7c")
  return dict(best_fid=best, fid_bias=bias, steps_effect=steps_effect,
              steps_effect_over_run=compare("e7a", "e7b", matched=False),
              capacity_effect=capacity_effect, steps_vs_capacity=compare("e7c", "e7b"),
              interpretation=interpret_e7(steps_effect, capacity_effect),
              threshold=options.practical_threshold, confidence=options.confidence)


# Which curvature goes with which FID. Matched sets measure both on the same parameters.
PARAMETER_SETS = {
    "ema": dict(curvature_prefix=EMA_CURVATURE_PREFIX, fid=MILESTONE_FID, matched=True,
                text="EMA parameters: curvature under `curvature/ema/`, FID "
                     f"`{MILESTONE_FID}`"),
    "raw": dict(curvature_prefix="curvature/", fid=RAW_MILESTONE_FID, matched=True,
                text="raw parameters: curvature under `curvature/`, FID "
                     f"`{RAW_MILESTONE_FID}`"),
    "mismatched": dict(curvature_prefix="curvature/", fid=MILESTONE_FID, matched=False,
                       text="mismatched parameters: curvature of the raw parameters, FID of "
                            "the EMA parameters (the seeds' pairing)"),
}


def _prefixed(key: str, prefix: str) -> str:
  return prefix + key[len("curvature/"):]


def curvature_fid_pairs(run: runs_lib.Run, parameters: str = "mismatched") -> list[dict]:
  """Each milestone FID with the reference-objective curvature at or before its step.

  `parameters` names a PARAMETER_SETS entry: which curvature keys and which FID key. The
  reference objective keeps Min-SNR runs on the same scale as constant-weighting ones (see
  MINSNR_NOTE); a run without it raises Skip.
  """
  chosen = PARAMETER_SETS[parameters]
  prefix, fid_key = chosen["curvature_prefix"], chosen["fid"]
  ref_key, train_key = _prefixed(REF_CURVATURE, prefix), _prefixed(CURVATURE, prefix)
  if run.has(ref_key):
    key = ref_key
  elif runs_lib.config_get(run.config, "loss.weighting") == "constant" and run.has(train_key):
    key = train_key
  else:
    raise Skip(f"{ref_key!r} is not logged in {run.label} ({run.path})")
  if not run.has(fid_key):
    raise Skip(f"{fid_key!r} is not logged in {run.label} ({run.path})")
  pairs = []
  for step, fid in zip(*run.series(fid_key)):
    found = runs_lib.value_at_or_before(run.series(key), int(step))
    if found is not None and np.isfinite(fid) and np.isfinite(found[1]):
      pairs.append(dict(run=run.label, path=str(run.path), key=key, fid_key=fid_key,
                        step=int(step), curvature_step=found[0], curvature=found[1],
                        fid=float(fid)))
  return pairs


def _sign_reading(interval: stats.Interval) -> str:
  if not interval.has_interval:
    return "no interval"
  if interval.high < 0:
    return "negative"
  if interval.low > 0:
    return "positive"
  return "not distinguishable from 0"


def _ema_lag_note(runs: Sequence[runs_lib.Run]) -> str:
  decays = sorted({runs_lib.config_value(r.config, "train.ema_decay") for r in runs})
  lags = ", ".join(f"{d / (1 - d):.0f} steps at decay {d}" for d in decays
                   if isinstance(d, (int, float)) and 0 <= d < 1)
  return ("curvature and FID come from different parameters: the EMA parameters lag the raw "
          "ones by d/(1-d) steps on average" + (f" ({lags})" if lags else "") + ", so each "
          "pair is that far apart; log curvature.params='both' (and eval.fid_raw_params) for "
          "matched pairs")


def association_for(runs: Sequence[runs_lib.Run], parameters: str, options: Options) -> dict:
  """Pearson and Spearman correlation of curvature with milestone FID, pooled over runs.

  Both series trend with training step, so the partial correlations given step are the
  check that the association is more than a shared trend.
  """
  pairs, excluded = [], []
  for run in runs:
    try:
      pairs += curvature_fid_pairs(run, parameters)
    except Skip as e:
      excluded.append(str(e))
  used = list(dict.fromkeys(p["run"] for p in pairs))
  if len(pairs) < 3:
    raise Skip(f"{len(pairs)} milestone pair(s) ({PARAMETER_SETS[parameters]['text']}); at "
               "least 3 are needed")
  curv = [p["curvature"] for p in pairs]
  fid = [p["fid"] for p in pairs]
  step = [p["step"] for p in pairs]
  measures = {}
  for method in ("pearson", "spearman"):
    measures[method] = stats.correlation(curv, fid, method, options.confidence)
    measures[f"partial_{method}_given_step"] = stats.partial_correlation(
        curv, fid, step, method, options.confidence)
  warnings = []
  if len(pairs) < options.small_n:
    warnings.append(f"only n = {len(pairs)} milestone pairs (< {options.small_n}): the "
                    "intervals are approximate and wide")
  notes = ["curvature and FID both trend with step; the partial correlations remove a "
           "linear trend in step (ranks of step for Spearman)",
           "milestones from one run are not independent and runs differ in level, so the "
           "pooled intervals are optimistic"]
  if not PARAMETER_SETS[parameters]["matched"]:
    notes.insert(0, _ema_lag_note(runs))
  return dict(
      n=len(pairs), runs=used, excluded=excluded, pairs=pairs, measures=measures,
      readings={name: _sign_reading(interval) for name, interval in measures.items()},
      warnings=warnings, notes=notes, parameters=parameters,
      parameters_text=PARAMETER_SETS[parameters]["text"], verdict="computed")


def curvature_fid_association(runs: Sequence[runs_lib.Run], options: Options = Options()) -> dict:
  """The association on matched parameters where the runs allow it.

  Tries EMA curvature against EMA FID, then raw against raw; the first with 3+ pairs gives
  the top-level numbers (`parameters` says which). Only where neither exists does it fall
  back to the seeds' mismatched pairing, with a note. `by_parameters` holds every set.
  """
  by_parameters = {name: guarded(association_for, runs, name, options)
                   for name in PARAMETER_SETS}
  for name in PARAMETER_SETS:
    if by_parameters[name].get("verdict") != SKIPPED:
      return dict(by_parameters[name], by_parameters=by_parameters)
  counts = ", ".join(f"{name} {result['reason'].split(' ', 1)[0]}"
                     for name, result in by_parameters.items())
  raise Skip(f"fewer than 3 milestone pairs of a reference-objective curvature and a FID for "
             f"every pairing of parameters ({counts}; matched: curvature/ema/ with "
             f"{MILESTONE_FID}, curvature/ with {RAW_MILESTONE_FID})")
