"""Computes every criterion for a set of runs and writes report.md, criteria.json and figures."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Sequence

import numpy as np

from diffdyn.analysis import criteria
from diffdyn.analysis import markdown
from diffdyn.analysis import plots
from diffdyn.analysis import roles
from diffdyn.analysis import runs as runs_lib
from diffdyn.analysis import stats
from diffdyn.analysis import yardsticks

REPORT_FILE = "report.md"
CRITERIA_FILE = "criteria.json"
# The report points out milestones where more than this much of the EMA is still the init.
INIT_WEIGHT_NOTE = 0.05
# Keys whose step grids matter to a criterion or figure.
_ALIGNED_KEYS = (plots.LOSS, criteria.CURVATURE, criteria.REF_CURVATURE, criteria.MILESTONE_FID)


def _describe_grid(steps: np.ndarray) -> str:
  every = f", every {int(np.median(np.diff(steps)))}" if steps.size > 1 else ""
  return f"{steps.size} points, steps {steps[0]}-{steps[-1]}{every}"


def step_grid_notes(runs: Sequence[runs_lib.Run]) -> list[str]:
  """One note per key whose logged steps differ between runs, listing each distinct grid."""
  notes = []
  for key in _ALIGNED_KEYS:
    grids: dict[tuple, list[str]] = {}
    for run in runs:
      if run.has(key):
        grids.setdefault(tuple(run.series(key)[0].tolist()), []).append(run.label)
    if len(grids) > 1:
      described = "; ".join(f"{_describe_grid(np.array(steps))} ({', '.join(labels)})"
                            for steps, labels in grids.items())
      notes.append(f"step grids differ for `{key}`: {described}. Figures align runs by "
                   "step; criteria use each run's own points.")
  return notes


def compute_criteria(groups: Sequence[runs_lib.Group], options: criteria.Options,
                     baseline: str | None = None, treatment: str | None = None,
                     e7_names: Sequence[str] | None = None) -> dict:
  """Every criterion that the runs allow; the others say why they were skipped."""
  results: dict[str, Any] = {}
  base, treat, how = roles.e6_roles(groups, baseline, treatment)
  if base is None:
    results["e6_vs_e5"] = dict(verdict=criteria.SKIPPED, reason=f"no E5/E6 pair: {how}")
  else:
    results["e6_vs_e5"] = dict(criteria.e6_vs_e5(base, treat, options), roles=how)
  found, how, missing = roles.e7_roles(groups, e7_names)
  if not any(found.values()):
    results["e7"] = dict(verdict=criteria.SKIPPED,
                         reason="no runs named e7a, e7b or e7c (use --e7 A B C)")
  else:
    results["e7"] = dict(criteria.e7_steps_vs_capacity(found["e7a"], found["e7b"], found["e7c"],
                                                       options, missing), roles=how)
  all_runs = [run for group in groups for run in group.runs]
  results["curvature_fid_association"] = criteria.guarded(
      criteria.curvature_fid_association, all_runs, options)
  return results


def to_jsonable(value: Any) -> Any:
  """Plain JSON types; NaN and infinities become null so strict JSON readers accept it."""
  if isinstance(value, stats.Interval):
    return to_jsonable(value.to_json())
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, pathlib.Path):
    return str(value)
  return value


def _final_fid(run: runs_lib.Run) -> float | None:
  try:
    return criteria.last_finite_value(run, criteria.FINAL_FID)[1]
  except criteria.Skip:
    return None


def _run_summary(run: runs_lib.Run, group: runs_lib.Group) -> dict:
  best = criteria.guarded(criteria.best_fid, run)
  bias = criteria.guarded(criteria.fid_bias, run)
  found = best.get("verdict") != criteria.SKIPPED
  wall = run.series(runs_lib.WALL_TIME)[1] if run.has(runs_lib.WALL_TIME) else np.array([])
  return dict(
      name=run.name, label=run.label, path=str(run.path), seed=run.seed, group=group.name,
      weighting=runs_lib.config_get(run.config, "loss.weighting"),
      base_channels=runs_lib.config_get(run.config, "model.base_channels"),
      total_steps=run.total_steps, last_step=run.last_step,
      wall_time_s=float(np.nanmax(wall)) if wall.size else None,
      final_fid=_final_fid(run),
      best_fid=best["best_fid"] if found else None,
      best_fid_step=best["step"] if found else None,
      best_fid_evaluations=best["num_evaluations"] if found else None,
      fid_bias=(None if bias.get("verdict") == criteria.SKIPPED
                else bias["bias_at_milestone_samples"]),
      keys=sorted(run.metrics), warnings=list(run.warnings))


def _duration(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "n/a"
  return f"{seconds / 60:.1f} min" if seconds < 3 * 3600 else f"{seconds / 3600:.2f} h"


def _runs_lines(summaries: Sequence[dict]) -> list[str]:
  lines = ["## Runs", "",
           "Best FID: the lowest milestone FID (one sample size), its step and the number of "
           "milestones it is the minimum of. FID bias: how far the milestone FIDs sit above "
           "FID at infinitely many samples, estimated at the last step (see E7 and the "
           "\"Why\" section).", "",
           "| run | directory | group | weighting | base ch. | total steps | last step | "
           "wall time | final FID | best FID (step, of n) | FID bias |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for s in summaries:
    best = ("n/a" if s["best_fid"] is None else f"{markdown.num(s['best_fid'])} "
            f"({s['best_fid_step']}, of {s['best_fid_evaluations']})")
    lines.append(f"| {s['label']} | `{s['path']}` | {s['group']} | {s['weighting']} | "
                 f"{s['base_channels']} | {s['total_steps']} | {s['last_step']} | "
                 f"{_duration(s['wall_time_s'])} | {markdown.num(s['final_fid'])} | {best} | "
                 f"{markdown.num(s['fid_bias'])} |")
  return lines + [""]


def fid_context(group: runs_lib.Group) -> dict:
  """The numbers of the "Why is FID ~ 200?" section for one replicate group."""
  first = group.runs[0]
  decay, warmup = yardsticks.ema_settings(group.config)
  steps = yardsticks.milestone_steps(first, criteria.MILESTONE_FID)
  return dict(
      group=group.name, runs=[run.label for run in group.runs],
      budget=yardsticks.training_budget(group.config, max(r.last_step for r in group.runs)),
      ema=dict(decay=decay, warmup=warmup, steps=steps,
               logged=first.has(criteria.MILESTONE_FID),
               init_weight=yardsticks.ema_init_weight(steps, decay, warmup).tolist()),
      bias=[criteria.guarded(criteria.fid_bias, run) for run in group.runs],
      weighting=yardsticks.weighting_effect(group.config),
      final_alpha_bar=yardsticks.final_alpha_bar(group.config))


def _groups_lines(groups: Sequence[runs_lib.Group]) -> list[str]:
  lines = ["## Replicate groups", "",
           "Runs whose configs are equal apart from `seed` and `workdir` are seeds of one "
           "experiment; criteria compare groups by their seed means.", ""]
  for g in groups:
    seeds = ", ".join(str(s) for s in g.seeds)
    kind = "single seed: no interval" if g.size == 1 else f"{g.size} seeds"
    lines.append(f"- **{g.name}**: {kind} (seeds {seeds})")
  return lines + [""]


_FIGURE_TITLES = {
    "loss_vs_step.png": "Training loss vs step",
    "curvature_vs_step.png": "Curvature vs step",
    "fid_vs_step.png": "FID vs step",
    "fid_vs_wall_time.png": "FID vs wall time",
    "sample_grids.png": "Final sample grids",
    "curvature_vs_fid.png": "Curvature vs milestone FID",
}


def write_figures(groups: Sequence[runs_lib.Group], association: dict,
                  out_dir: pathlib.Path) -> list[str]:
  """Writes every figure the runs have data for; returns their file names."""
  colors = plots.group_colors(groups)
  run_groups = {str(run.path): g.name for g in groups for run in g.runs}
  written = [
      plots.plot_loss(groups, colors, out_dir / "loss_vs_step.png"),
      plots.plot_curvature(groups, colors, out_dir / "curvature_vs_step.png"),
      plots.plot_fid(groups, colors, out_dir / "fid_vs_step.png", against="step"),
      plots.plot_fid(groups, colors, out_dir / "fid_vs_wall_time.png", against="wall_time"),
      plots.plot_sample_grids(groups, out_dir / "sample_grids.png"),
      plots.plot_association(association, colors, run_groups, out_dir / "curvature_vs_fid.png"),
  ]
  return [p.name for p in written if p is not None]


def _skipped_reasons(results: dict) -> list[str]:
  """Every skipped criterion anywhere in the results, as 'path: reason'."""
  found = []

  def visit(node: Any, where: str) -> None:
    if isinstance(node, dict):
      # Summary verdicts (an objective's, the overall one) are skipped because a part was;
      # only the parts carry a reason.
      if node.get("verdict") == criteria.SKIPPED and "reason" in node:
        found.append(f"{where}: {node['reason']}")
        return
      for key, child in node.items():
        visit(child, f"{where}.{key}" if where else key)

  visit(results, "")
  return found


def _options_lines(options: criteria.Options) -> list[str]:
  return [
      f"Confidence level {options.confidence:.0%} (tests at alpha = {options.alpha:.3g}). "
      f"Windows: late {markdown.window(options.late_window)}, spikes "
      f"{markdown.window(options.spike_window)}. Detrended spikes: k = "
      f"{markdown.num(options.spike_k)} noise SDs above a rolling median over "
      f"{options.spike_median_window} logged points (--spike-k, --spike-median-window). "
      f"Seeds' literal spike line: {markdown.num(options.spike_factor)} x the baseline "
      f"median. Every number below is also in `{CRITERIA_FILE}`.", ""]


def render_report(summaries: Sequence[dict], groups: Sequence[runs_lib.Group], results: dict,
                  figures: Sequence[str], notes: Sequence[str], options: criteria.Options,
                  command: str | None, contexts: Sequence[dict] = ()) -> str:
  lines = ["# diffdyn analysis report", ""]
  if command:
    lines += [f"Generated by `{command}`.", ""]
  lines += _options_lines(options)
  lines += _runs_lines(summaries) + _groups_lines(groups)
  lines += ["# Criteria", ""]
  e6 = results["e6_vs_e5"]
  if e6.get("verdict") == criteria.SKIPPED:
    lines += ["## E6 vs E5: Min-SNR vs constant weighting", "", f"**skipped**: {e6['reason']}", ""]
  else:
    lines += markdown.e6_lines(e6, e6["roles"])
  e7 = results["e7"]
  if e7.get("verdict") == criteria.SKIPPED:
    lines += ["## E7: steps vs capacity", "", f"**skipped**: {e7['reason']}", ""]
  else:
    lines += markdown.e7_lines(e7, e7["roles"])
  lines += markdown.association_lines(results["curvature_fid_association"])
  lines += markdown.why_lines(contexts, INIT_WEIGHT_NOTE)
  lines += ["# Figures", ""]
  lines += [f"![{_FIGURE_TITLES[name]}]({name})\n" for name in figures]
  skipped = _skipped_reasons(results)
  if skipped or notes:
    lines += ["# Notes", ""]
    lines += [f"- skipped {reason}" for reason in skipped]
    lines += [f"- {note}" for note in notes]
    lines.append("")
  return "\n".join(lines)


def write_report(runs: Sequence[runs_lib.Run], out_dir: str | pathlib.Path,
                 options: criteria.Options = criteria.Options(), baseline: str | None = None,
                 treatment: str | None = None, e7_names: Sequence[str] | None = None,
                 command: str | None = None) -> pathlib.Path:
  """Writes report.md, criteria.json and the figures into out_dir; returns report.md's path."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  groups = runs_lib.group_replicates(runs)
  results = compute_criteria(groups, options, baseline, treatment, e7_names)
  figures = write_figures(groups, results["curvature_fid_association"], out_dir)
  group_of = {id(run): g for g in groups for run in g.runs}
  summaries = [_run_summary(run, group_of[id(run)]) for run in runs]
  warnings = [w for run in runs for w in run.warnings]
  notes = runs_lib.grouping_notes(groups) + step_grid_notes(runs) + warnings
  contexts = [fid_context(g) for g in groups]
  text = render_report(summaries, groups, results, figures, notes, options, command, contexts)
  report_path = out_dir / REPORT_FILE
  report_path.write_text(text, encoding="utf-8")
  payload = dict(options=dataclasses.asdict(options), runs=summaries,
                 groups=[dict(name=g.name, runs=[str(r.path) for r in g.runs], seeds=g.seeds)
                         for g in groups],
                 criteria=results, fid_context=contexts, figures=figures, notes=notes,
                 skipped=_skipped_reasons(results))
  with open(out_dir / CRITERIA_FILE, "w", encoding="utf-8") as f:
    json.dump(to_jsonable(payload), f, indent=2, allow_nan=False)
  return report_path
