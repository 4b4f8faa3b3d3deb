"""Computes every criterion for a set of runs and writes report.md, criteria.json and figures."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Sequence

import numpy as np

from diffdyn.analysis import criteria
from diffdyn.analysis import curvature_detail as detail
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


@dataclasses.dataclass(frozen=True)
class Figure:
  """A written figure: its file name, its title in report.md and a caption (or none)."""
  name: str
  title: str
  caption: str = ""


_OVERLAY_TITLES = {
    "loss_vs_step.png": "Training loss vs step",
    "curvature_vs_step.png": "Curvature vs step",
    "fid_vs_step.png": "FID vs step",
    "fid_vs_wall_time.png": "FID vs wall time",
    "sample_grids.png": "Final sample grids",
    "curvature_vs_fid.png": "Curvature vs milestone FID",
}


def _block_prefix(runs: Sequence[runs_lib.Run]) -> tuple[str, str]:
  """The reference objective's block keys where logged (comparable across weightings), else
  the train objective's; and that objective's name."""
  ref = detail.OBJECTIVES["reference"]
  if any(detail.block_names(runs, ref, p) for p in detail.PARTITIONS):
    return ref, "reference objective (unweighted eps-MSE)"
  return detail.OBJECTIVES["train"], "train objective (no reference blocks logged)"


def _any_key(runs: Sequence[runs_lib.Run], *keys: str) -> bool:
  return any(run.has(key) for run in runs for key in keys)


def curvature_figures(comparison: roles.Comparison, colors: dict[str, str],
                      out_dir: pathlib.Path, notes: list[str]) -> list[Figure]:
  """The curvature-in-detail figures of one comparison that its runs have the keys for; a
  note in `notes` for each one they do not."""
  groups, tag, title = comparison.groups, comparison.tag, comparison.title
  runs = [run for g in groups for run in g.runs]
  if not _any_key(runs, *(p + detail.HESSIAN for p in detail.OBJECTIVES.values())):
    notes.append(f"curvature figures for {title} not drawn: no run logs curvature "
                 "(curvature.enabled=True)")
    return []
  prefix, objective = _block_prefix(runs)
  tr, ref = detail.OBJECTIVES["train"], detail.OBJECTIVES["reference"]
  ema_keys = [detail.ema_prefix(p) + detail.HESSIAN for p in (tr, ref)]

  def panels(name, ylabel, spec, needs=()):
    return lambda path: plots.plot_panels(groups, colors, path, f"{title}: {name}", ylabel,
                                          spec, needs=needs)

  specs = [
      ("blocks_by_stage", "Hessian trace per UNet stage",
       panels("Hessian trace per UNet stage, " + objective, "block trace tr(H_bb)",
              plots.block_panels(runs, prefix, "stage")),
       f"Hutchinson trace of each UNet stage's parameters, {objective} "
       f"(`{prefix}block/stage/<stage>/hutch_trace_mean`); the stages add up to the total "
       "trace.", "no per-block traces logged (curvature.blocks=True)"),
      ("blocks_by_kind", "Hessian trace per parameter kind",
       panels("Hessian trace per parameter kind, " + objective, "block trace tr(H_bb)",
              plots.block_panels(runs, prefix, "kind")),
       f"The same trace split by kind of parameter: conv, attention, GroupNorm scale/shift, "
       f"time embedding, output head (`{prefix}block/kind/<kind>/hutch_trace_mean`).",
       "no per-block traces logged (curvature.blocks=True)"),
      ("gn_fed_normalized", "Scale-free trace of GroupNorm-fed blocks",
       panels("tr(H_ww) ||w||^2 of GroupNorm-fed blocks, " + objective,
              "normalised trace",
              plots.block_panels(runs, prefix, "gn_fed", "normalized_trace")),
       "Each stage's ResnetBlock convs that feed only a GroupNorm, their trace times their "
       f"squared weight norm (`{prefix}block/gn_fed/<stage>/normalized_trace`): unchanged by "
       "the norm growth that lowers their raw trace as 1/||w||^2.",
       "no GroupNorm-fed block traces logged (curvature.blocks=True)"),
      ("ggn_vs_hessian", "Gauss-Newton vs Hessian trace",
       panels("Gauss-Newton (dashed) vs Hessian (solid) trace", "trace",
              plots.ggn_vs_hessian_panels(), [p + detail.GGN for p in (tr, ref)]),
       f"Gauss-Newton trace tr(G) (`{tr}{detail.GGN}`, `{ref}{detail.GGN}`, dashed) beside the "
       f"Hessian trace (`{tr}{detail.HESSIAN}`, solid) on the same probes: G is the model's "
       "curvature (J^T W J, PSD); H - G comes from the residuals of the fit.",
       f"no `{tr}{detail.GGN}` logged (curvature.ggn=True)"),
      ("trace_per_param", "Mean eigenvalue tr(H)/P",
       panels("mean eigenvalue tr(H)/P", "tr(H) / P", plots.trace_per_param_panels()),
       f"Trace over the number of parameters (`{tr}{detail.TRACE_PER_PARAM}`, "
       f"`{ref}{detail.TRACE_PER_PARAM}`), the mean eigenvalue: comparable across widths.",
       f"no `{tr}{detail.TRACE_PER_PARAM}` logged (curvature.blocks=True)"),
      ("precond_sharpness", "Adam's preconditioned sharpness",
       lambda path: plots.plot_precond_sharpness(groups, colors, path, title),
       f"lambda_max(P^-1 H) of the raw params with Adam's P = diag(sqrt(v_hat) + eps) "
       f"(`{tr}{detail.PRECOND}`, `{ref}{detail.PRECOND}`) and its stability threshold "
       f"2(1 + b1)/((1 - b1) lr) (`{tr}{detail.PRECOND_THRESHOLD}`, the line): Adam is at its "
       "edge of stability where the curve reaches the line.",
       f"no `{tr}{detail.PRECOND}` logged (curvature.precond_every_steps > 0)"),
      ("spectral_density", "Hessian spectral density over steps",
       lambda path: plots.plot_spectral_density(groups, path, notes, title),
       f"SLQ spectral density of the raw params' Hessian (`{runs_lib.DENSITY_DIR}/"
       "step_XXXXXX.npz`, arrays `train_*` and `ref_*`) of each group's first seed: eigenvalue "
       "against step, colour the density on a log scale from its peak down to the density at "
       "the largest Ritz value (dots), so that the bulk and the outliers both show.",
       f"no {runs_lib.DENSITY_DIR}/*.npz files (curvature.density_every_steps > 0)"),
      ("ema_vs_raw", "Curvature of the EMA vs the raw params",
       panels("Hessian trace, raw (solid) vs EMA (dashed) params", "Hessian trace tr(H)",
              plots.ema_vs_raw_panels(), ema_keys),
       f"Hessian trace at the EMA params (`{ema_keys[0]}`, `{ema_keys[1]}`, dashed) beside the "
       "raw params' (solid), on the same probes: FID is drawn from the EMA params.",
       "no EMA curvature logged (curvature.params='ema' or 'both')"),
  ]
  written = []
  for name, fig_title, draw, caption, missing in specs:
    file_name = f"{tag}_{name}.png"
    if draw(out_dir / file_name) is None:
      notes.append(f"figure {file_name} ({title}) not drawn: {missing}")
    else:
      written.append(Figure(file_name, f"{title}: {fig_title}", caption))
  return written


def write_figures(groups: Sequence[runs_lib.Group], association: dict,
                  comparisons: Sequence[roles.Comparison], out_dir: pathlib.Path,
                  notes: list[str]) -> list[Figure]:
  """Writes every figure the runs have data for; a note in `notes` for each left out."""
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
  figures = [Figure(p.name, _OVERLAY_TITLES[p.name]) for p in written if p is not None]
  for comparison in comparisons:
    figures += curvature_figures(comparison, colors, out_dir, notes)
  return figures


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
                  figures: Sequence[Figure], notes: Sequence[str], options: criteria.Options,
                  command: str | None, contexts: Sequence[dict] = (),
                  curvature: dict | None = None) -> str:
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
  if curvature:
    lines += markdown.curvature_detail_lines(curvature, options.late_window)
  lines += ["# Figures", ""]
  for figure in figures:
    lines.append(f"![{figure.title}]({figure.name})\n")
    if figure.caption:
      lines += [f"*{figure.title}.* {figure.caption}", ""]
  skipped = _skipped_reasons(dict(results, curvature_detail=curvature or {}))
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
  comparisons = roles.curvature_comparisons(groups, baseline, treatment, e7_names)
  curvature = detail.curvature_detail(comparisons, options.late_window)
  figure_notes = []
  figures = write_figures(groups, results["curvature_fid_association"], comparisons, out_dir,
                          figure_notes)
  group_of = {id(run): g for g in groups for run in g.runs}
  summaries = [_run_summary(run, group_of[id(run)]) for run in runs]
  warnings = [w for run in runs for w in run.warnings]
  notes = runs_lib.grouping_notes(groups) + step_grid_notes(runs) + warnings + figure_notes
  contexts = [fid_context(g) for g in groups]
  text = render_report(summaries, groups, results, figures, notes, options, command, contexts,
                       curvature)
  report_path = out_dir / REPORT_FILE
  report_path.write_text(text, encoding="utf-8")
  payload = dict(options=dataclasses.asdict(options), runs=summaries,
                 groups=[dict(name=g.name, runs=[str(r.path) for r in g.runs], seeds=g.seeds)
                         for g in groups],
                 criteria=results, fid_context=contexts, curvature_detail=curvature,
                 figures=[f.name for f in figures], notes=notes,
                 skipped=_skipped_reasons(dict(results, curvature_detail=curvature)))
  with open(out_dir / CRITERIA_FILE, "w", encoding="utf-8") as f:
    json.dump(to_jsonable(payload), f, indent=2, allow_nan=False)
  return report_path
