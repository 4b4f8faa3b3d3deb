"""The seed studies' success criteria, computed from runs and replicate groups.

- `e6_vs_e5`: Min-SNR vs constant weighting (seed w1-e6_minsnr_hutchinson.md).
- `e7_steps_vs_capacity`: more steps vs more width (seed w1-e7_steps_vs_capacity_plan.md).
- `curvature_fid_association`: the E7 report's "negative curvature-FID correlation".

Each criterion works on per-run numbers (each run's own logged points; step windows are
fractions of each run's own length) and compares groups by their seed means. Results are
plain dicts of numbers, `stats.Interval`s and verdict strings, ready for JSON and markdown.
A criterion that lacks data returns {"verdict": SKIPPED, "reason": ...} instead of failing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from diffdyn import errors
from diffdyn.analysis import runs as runs_lib
from diffdyn.analysis import stats

CURVATURE = "curvature/hutch_trace_mean"
REF_CURVATURE = "curvature/ref/hutch_trace_mean"
MILESTONE_FID = "val/fid_milestone/fid"
FINAL_FID = "eval/final/fid"

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
    if not 0.0 < self.confidence < 1.0:
      raise errors.UserError(f"confidence must be in (0, 1), got {self.confidence}")


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


def _lower_by_at_least(diff: stats.Interval, rel_change: float, threshold: float) -> str:
  """Verdict for "treatment is lower by >= threshold": the point estimate must pass the
  threshold and, with replicates, the difference's interval must exclude 0."""
  if not (diff.estimate < 0 and rel_change <= -threshold):
    return NOT_MET
  return NOT_DISTINGUISHABLE if diff.includes(0.0) else MET


def _basis(interval: stats.Interval) -> str:
  return (f"{interval.confidence:.0%} interval ({interval.method})" if interval.has_interval
          else interval.method)


def _compare(base_values: list[float], treat_values: list[float], confidence: float) -> dict:
  """Seed means of two groups, their difference and relative change, with intervals."""
  return dict(
      baseline=stats.mean_interval(base_values, confidence),
      treatment=stats.mean_interval(treat_values, confidence),
      difference=stats.welch_difference(base_values, treat_values, confidence),
      relative_change=stats.relative_change(base_values, treat_values, confidence))


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
      rows[role].append(dict(run=run.label, path=str(run.path), key=key, steps=[lo, hi],
                             points=int(values.size), mean=float(np.mean(values))))
  result = _compare([r["mean"] for r in rows["baseline"]],
                    [r["mean"] for r in rows["treatment"]], options.confidence)
  result.update(
      per_run=rows, window=list(options.late_window), threshold=-options.curvature_drop,
      verdict=_lower_by_at_least(result["difference"], result["relative_change"].estimate,
                                 options.curvature_drop))
  result["basis"] = _basis(result["difference"])
  return result


def _fewer(diff: stats.Interval) -> str:
  if not diff.has_interval:
    return MET if diff.estimate < 0 else NOT_MET
  if diff.includes(0.0):
    return NOT_DISTINGUISHABLE
  return MET if diff.estimate < 0 else NOT_MET


def curvature_spikes(baseline: runs_lib.Group, treatment: runs_lib.Group, objective: str,
                     options: Options) -> dict:
  """Criterion (b): points above spike_factor x the baseline's median in the spike window.

  The median pools every baseline seed's points in the window. When runs log different
  numbers of points there, the fraction of points that spike is compared instead of counts.
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
      rows[role].append(dict(run=run.label, path=str(run.path), key=key, steps=[lo, hi],
                             points=int(values.size), spikes=count,
                             fraction=count / values.size))
  all_rows = rows["baseline"] + rows["treatment"]
  same_grid = len({r["points"] for r in all_rows}) == 1
  measure = "spikes" if same_grid else "fraction"
  diff = stats.welch_difference([r[measure] for r in rows["baseline"]],
                                [r[measure] for r in rows["treatment"]], options.confidence)
  return dict(
      per_run=rows, window=list(options.spike_window), baseline_median=median,
      factor=options.spike_factor, threshold=threshold, measure=measure,
      baseline=stats.mean_interval([r[measure] for r in rows["baseline"]], options.confidence),
      treatment=stats.mean_interval([r[measure] for r in rows["treatment"]],
                                    options.confidence),
      difference=diff, verdict=_fewer(diff), basis=_basis(diff),
      note=None if same_grid else "runs log different numbers of points in the window; "
      "the fraction of points above the threshold is compared instead of the count")


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
    rows[role] = [dict(run=run.label, path=str(run.path), step=step, fid=fid)
                  for run in group.runs for step, fid in [last_finite_value(run, FINAL_FID)]]
  result = _compare([r["fid"] for r in rows["baseline"]], [r["fid"] for r in rows["treatment"]],
                    options.confidence)
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
  """Criteria (a) and (b) on one objective; the curvature shift counts if either is met."""
  mean_change = guarded(curvature_mean_change, baseline, treatment, objective, options)
  spikes = guarded(curvature_spikes, baseline, treatment, objective, options)
  return dict(objective=objective, mean_change=mean_change, spikes=spikes,
              verdict=_either_met([mean_change, spikes]))


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


def best_fid(run: runs_lib.Run) -> dict:
  """Lowest FID over the milestones and the final evaluation, with its step.

  Ties go to the earlier step. `at_first_eval` says whether the best came at the first FID
  evaluation (the E7 report saw the best FID there in every run).
  """
  points = []
  for key in (MILESTONE_FID, FINAL_FID):
    if run.has(key):
      steps, values = run.series(key)
      points += [(float(v), int(s), key) for s, v in zip(steps, values) if np.isfinite(v)]
  if not points:
    raise Skip(f"{run.label} ({run.path}) has no finite {MILESTONE_FID!r} or {FINAL_FID!r}")
  fid, step, key = min(points, key=lambda p: (p[0], p[1]))
  first_step = min(p[1] for p in points)
  return dict(run=run.label, path=str(run.path), best_fid=fid, step=step, source=key,
              first_eval_step=first_step, at_first_eval=step == first_step)


def group_best_fid(group: runs_lib.Group, confidence: float) -> dict:
  rows = [best_fid(run) for run in group.runs]
  return dict(group=group.name, seeds=group.size, per_run=rows,
              best_fid=stats.mean_interval([r["best_fid"] for r in rows], confidence),
              steps=[r["step"] for r in rows],
              at_first_eval=sum(r["at_first_eval"] for r in rows))


BETTER = "clearly better"
BETTER_SMALL = "better, but below the practical threshold"
WORSE = "clearly worse"
POINT_ONLY = "cannot be decided (single seed: no interval)"


def _fid_reading(diff: stats.Interval, rel_change: float, threshold: float) -> tuple[str, bool]:
  """Verdict on a variant's best FID vs the reference and whether it counts as "<<".

  "<<" means the difference's interval excludes 0 (variant lower) and the improvement is at
  least `threshold` of the reference FID. Without replicates nothing can be decided.
  """
  if not diff.has_interval:
    return POINT_ONLY, False
  if diff.includes(0.0):
    return NOT_DISTINGUISHABLE, False
  if diff.high < 0:
    return (BETTER, True) if -rel_change >= threshold else (BETTER_SMALL, False)
  return WORSE, False


def compare_best_fid(ref: dict, variant: dict, options: Options) -> dict:
  """A variant group's best FID against the reference group's (`group_best_fid` results)."""
  ref_values = [r["best_fid"] for r in ref["per_run"]]
  variant_values = [r["best_fid"] for r in variant["per_run"]]
  result = _compare(ref_values, variant_values, options.confidence)
  rel = result["relative_change"].estimate
  verdict, much_better = _fid_reading(result["difference"], rel, options.practical_threshold)
  point_reading = result["difference"].estimate < 0 and -rel >= options.practical_threshold
  result.update(reference=ref["group"], variant=variant["group"], improvement=-rel,
                threshold=options.practical_threshold, verdict=verdict,
                much_better=much_better if result["difference"].has_interval else None,
                point_estimate_much_better=point_reading, basis=_basis(result["difference"]))
  return result


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
  if steps_effect["much_better"] is None or capacity_effect["much_better"] is None:
    return dict(outcome="undecided",
                text=f"cannot be decided: single seed, no interval (point estimates alone "
                     f"would read: {point})", point_estimate_reading=point)
  key = (steps_effect["much_better"], capacity_effect["much_better"])
  names = {(True, False): "under-training", (False, True): "under-capacity",
           (True, True): "both", (False, False): "neither"}
  return dict(outcome=names[key], text=E7_OUTCOMES[key], point_estimate_reading=point)


def e7_steps_vs_capacity(reference: runs_lib.Group | None, longer: runs_lib.Group | None,
                         wider: runs_lib.Group | None, options: Options = Options(),
                         missing: dict[str, str] | None = None) -> dict:
  """Best FID per group, E7b and E7c against E7a (and E7b against E7c), and the verdict.

  A role whose group is None is skipped, with the reason from `missing` when given.
  """
  best = {}
  for role, group in (("e7a", reference), ("e7b", longer), ("e7c", wider)):
    if group is None:
      reason = (missing or {}).get(role, f"no {role} group among the runs")
      best[role] = dict(verdict=SKIPPED, reason=reason)
    else:
      best[role] = guarded(group_best_fid, group, options.confidence)

  def compare(ref_role: str, variant_role: str) -> dict:
    for role in (ref_role, variant_role):
      if best[role].get("verdict") == SKIPPED:
        return dict(verdict=SKIPPED, reason=f"{role}: {best[role]['reason']}")
    return compare_best_fid(best[ref_role], best[variant_role], options)

  steps_effect, capacity_effect = compare("e7a", "e7b"), compare("e7a", "e7c")
  return dict(best_fid=best, steps_effect=steps_effect, capacity_effect=capacity_effect,
              steps_vs_capacity=compare("e7c", "e7b"),
              interpretation=interpret_e7(steps_effect, capacity_effect),
              threshold=options.practical_threshold, confidence=options.confidence)


def curvature_fid_pairs(run: runs_lib.Run) -> list[dict]:
  """Each milestone FID with the reference-objective curvature at or before its step.

  The reference objective keeps Min-SNR runs on the same scale as constant-weighting ones
  (see MINSNR_NOTE); a run without it raises Skip.
  """
  key = curvature_key(run, "reference")
  if not run.has(MILESTONE_FID):
    raise Skip(f"{MILESTONE_FID!r} is not logged in {run.label} ({run.path})")
  pairs = []
  for step, fid in zip(*run.series(MILESTONE_FID)):
    found = runs_lib.value_at_or_before(run.series(key), int(step))
    if found is not None and np.isfinite(fid) and np.isfinite(found[1]):
      pairs.append(dict(run=run.label, path=str(run.path), key=key, step=int(step),
                        curvature_step=found[0], curvature=found[1], fid=float(fid)))
  return pairs


def _sign_reading(interval: stats.Interval) -> str:
  if not interval.has_interval:
    return "no interval"
  if interval.high < 0:
    return "negative"
  if interval.low > 0:
    return "positive"
  return "not distinguishable from 0"


def curvature_fid_association(runs: Sequence[runs_lib.Run], options: Options = Options()) -> dict:
  """Pearson and Spearman correlation of curvature with milestone FID, pooled over runs.

  Both series trend with training step, so the partial correlations given step are the
  check that the association is more than a shared trend.
  """
  pairs, excluded = [], []
  for run in runs:
    try:
      pairs += curvature_fid_pairs(run)
    except Skip as e:
      excluded.append(str(e))
  used = list(dict.fromkeys(p["run"] for p in pairs))
  if len(pairs) < 3:
    raise Skip(f"{len(pairs)} milestone(s) with both a reference-objective curvature and "
               f"{MILESTONE_FID!r}; at least 3 are needed")
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
  return dict(
      n=len(pairs), runs=used, excluded=excluded, pairs=pairs, measures=measures,
      readings={name: _sign_reading(interval) for name, interval in measures.items()},
      warnings=warnings,
      notes=["curvature and FID both trend with step; the partial correlations remove a "
             "linear trend in step (ranks of step for Spearman)",
             "milestones from one run are not independent and runs differ in level, so the "
             "pooled intervals are optimistic"],
      verdict="computed")
