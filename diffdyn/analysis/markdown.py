"""Markdown text for the report: every verdict line carries the numbers it rests on."""
from __future__ import annotations

import math
from typing import Sequence

from diffdyn.analysis import criteria
from diffdyn.analysis import stats


def num(x: float | None) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.4g}"


def pct(x: float | None) -> str:
  if x is None or not math.isfinite(x):
    return "n/a"
  return f"{x:+.1%}"


def interval(iv: stats.Interval, fmt=num) -> str:
  """'203.4 [95% CI 202.9, 203.9; t, df=3]' or '203.4 (single seed: no interval)'."""
  if iv.has_interval:
    return f"{fmt(iv.estimate)} [{iv.confidence:.0%} CI {fmt(iv.low)}, {fmt(iv.high)}; {iv.method}]"
  return f"{fmt(iv.estimate)} ({iv.method})"


def bold(verdict: str) -> str:
  return f"**{verdict}**"


def _skipped(label: str, result: dict) -> list[str]:
  return [f"- {label}: **skipped**: {result['reason']}"]


def _group_value(name: str, iv: stats.Interval, fmt=num) -> str:
  n = iv.sizes[0]
  return f"{name} {interval(iv, fmt)}" + (f" over {n} seeds" if n > 1 else "")


def _per_run_table(rows: dict, columns: Sequence[tuple[str, str]]) -> list[str]:
  """A per-run table (only worth printing with replicates; single runs are inline)."""
  head = "| role | run | " + " | ".join(title for title, _ in columns) + " |"
  lines = ["", head, "|" + "---|" * (len(columns) + 2)]
  for role, role_rows in rows.items():
    for r in role_rows:
      cells = [_cell(r[key]) for _, key in columns]
      lines.append(f"| {role} | {r['run']} | " + " | ".join(cells) + " |")
  return lines + [""]


def _cell(value) -> str:
  if isinstance(value, float):
    return num(value)
  if isinstance(value, (list, tuple)):
    return "-".join(str(v) for v in value)
  return str(value)


def _replicated(rows: dict) -> bool:
  return any(len(v) > 1 for v in rows.values())


def _keys(rows: dict) -> str:
  """Which metric each run's numbers come from, e.g. "e5: `curvature/hutch_trace_mean`"."""
  seen = {}
  for role_rows in rows.values():
    for r in role_rows:
      seen.setdefault(r["run"].split(" seed ")[0], r["key"])
  return ", ".join(f"{name}: `{key}`" for name, key in seen.items())


def mean_change_lines(result: dict, base: str, treat: str) -> list[str]:
  if result["verdict"] == criteria.SKIPPED:
    return _skipped("(a) mean curvature over the late window", result)
  rows = result["per_run"]
  ranges = "" if _replicated(rows) else " (" + "; ".join(
      f"{r['run']}: steps {r['steps'][0]}-{r['steps'][1]}, {r['points']} points"
      for role in rows.values() for r in role) + ")"
  lines = [
      f"- (a) mean curvature ({_keys(rows)}) over {window(result['window'])}{ranges}: "
      f"{_group_value(base, result['baseline'])}, {_group_value(treat, result['treatment'])}; "
      f"difference {interval(result['difference'])}; relative change "
      f"{interval(result['relative_change'], pct)} (success: <= {pct(result['threshold'])}) "
      f"-> {bold(result['verdict'])} ({result['basis']})"]
  if _replicated(rows):
    lines += _per_run_table(rows, [("steps", "steps"), ("points", "points"), ("mean", "mean")])
  return lines


def spike_lines(result: dict, base: str, treat: str) -> list[str]:
  if result["verdict"] == criteria.SKIPPED:
    return _skipped("(b) curvature spikes", result)
  rows = result["per_run"]
  counts = "" if _replicated(rows) else ": " + "; ".join(
      f"{r['run']}: {r['spikes']} of {r['points']} points (steps {r['steps'][0]}-{r['steps'][1]})"
      for role in rows.values() for r in role)
  measure = "spike count" if result["measure"] == "spikes" else "spike fraction"
  lines = [
      f"- (b) spikes ({_keys(rows)}): points above {num(result['factor'])} x the baseline median "
      f"({num(result['baseline_median'])}, threshold {num(result['threshold'])}) over "
      f"{window(result['window'])}{counts}. Mean {measure}: "
      f"{_group_value(base, result['baseline'])}, {_group_value(treat, result['treatment'])}; "
      f"difference {interval(result['difference'])} (success: fewer) -> "
      f"{bold(result['verdict'])} ({result['basis']})"]
  if result.get("note"):
    lines.append(f"  - note: {result['note']}")
  if _replicated(rows):
    lines += _per_run_table(rows, [("steps", "steps"), ("points", "points"),
                                   ("spikes", "spikes")])
  return lines


def window(w: Sequence[float]) -> str:
  return f"{w[0]:.0%}-{w[1]:.0%} of each run's total steps"


def final_fid_lines(result: dict, base: str, treat: str) -> list[str]:
  if result["verdict"] == criteria.SKIPPED:
    return _skipped("(c) final FID", result)
  rows = result["per_run"]
  lines = [
      f"- (c) final FID (`{criteria.FINAL_FID}`): {_group_value(base, result['baseline'])}, "
      f"{_group_value(treat, result['treatment'])}; difference {interval(result['difference'])}; "
      f"relative change {interval(result['relative_change'], pct)} (success: <= "
      f"{pct(result['tolerance'])}) -> {bold(result['verdict'])} ({result['basis']}); ideally "
      f">= {result['ideal_gain']:.0%} better: {'yes' if result['ideal_met'] else 'no'}"]
  if _replicated(rows):
    lines += _per_run_table(rows, [("step", "step"), ("final FID", "fid")])
  return lines


def e6_lines(result: dict, how: str) -> list[str]:
  base, treat = result["baseline"], result["treatment"]
  lines = [
      "## E6 vs E5: Min-SNR vs constant weighting", "",
      f"Seed report: w1-e6_minsnr_hutchinson.md. Baseline **{base}** "
      f"({result['baseline_seeds']} seed(s)), treatment **{treat}** "
      f"({result['treatment_seeds']} seed(s)); roles {how}. Windows are fractions of each "
      "run's own total steps; the step ranges actually used are listed per run.", ""]
  if result["note"]:
    lines += [f"> {result['note']}", ""]
  for title, block in (("Train objective", result["train_objective"]),
                       ("Reference objective (unweighted eps-MSE), criterion (d)",
                        result["reference_objective"])):
    lines += [f"### {title}", ""]
    if block["objective"] == "reference":
      lines += ["For a constant-weighting run the training objective is the reference "
                "objective, so its train curvature is used when no separate reference was "
                "logged.", ""]
    lines += mean_change_lines(block["mean_change"], base, treat)
    lines += spike_lines(block["spikes"], base, treat)
    lines += [f"- curvature shift ((a) or (b)): {bold(block['verdict'])}", ""]
  lines += ["### Final FID", ""] + final_fid_lines(result["final_fid"], base, treat) + [""]
  overall = result["overall"]
  lines += ["### Overall", "",
            f"Useful probe (curvature shift on the {overall['curvature_judged_on']} objective "
            f"and final FID within +10%): {bold(overall['verdict'])}", ""]
  if overall["caveat"]:
    lines += [f"Caveat: {overall['caveat']}.", ""]
  return lines


def _best_fid_row(role: str, best: dict) -> str:
  if best.get("verdict") == criteria.SKIPPED:
    return f"| {role} | skipped: {best['reason']} | | | | |"
  steps = ", ".join(str(s) for s in best["steps"])
  return (f"| {role} | {best['group']} | {best['seeds']} | {interval(best['best_fid'])} | "
          f"{steps} | {best['at_first_eval']} of {best['seeds']} |")


def _comparison_line(label: str, result: dict) -> str:
  if result["verdict"] == criteria.SKIPPED:
    return f"- {label}: **skipped**: {result['reason']}"
  return (f"- {label}: {result['variant']} vs {result['reference']}: best FID difference "
          f"{interval(result['difference'])}; relative change "
          f"{interval(result['relative_change'], pct)}; improvement {result['improvement']:.1%} "
          f"(practical threshold {result['threshold']:.0%}) -> {bold(result['verdict'])}")


def e7_lines(result: dict, how: str) -> list[str]:
  lines = [
      "## E7: steps vs capacity", "",
      f"Seed report: w1-e7_steps_vs_capacity_plan.md; roles {how}. Best FID is the minimum "
      f"over `{criteria.MILESTONE_FID}` and `{criteria.FINAL_FID}` of each run.", "",
      "| role | group | seeds | best FID (seed mean) | best-FID step(s) | best at first FID eval |",
      "|---|---|---|---|---|---|"]
  lines += [_best_fid_row(role, best) for role, best in result["best_fid"].items()]
  lines += ["",
            _comparison_line("steps effect (E7b vs E7a)", result["steps_effect"]),
            _comparison_line("capacity effect (E7c vs E7a)", result["capacity_effect"]),
            _comparison_line("steps vs capacity (E7b vs E7c)", result["steps_vs_capacity"]),
            "",
            f"\"<<\" (clearly better) means: the {result['confidence']:.0%} interval "
            "of the best-FID difference excludes 0 and the improvement is at least "
            f"{result['threshold']:.0%} of the reference's best FID. With one seed per group "
            "there is no interval and nothing is decided.", "",
            f"**Interpretation: {result['interpretation']['text']}**", ""]
  return lines


_MEASURE_NAMES = {
    "pearson": "Pearson r",
    "spearman": "Spearman rho",
    "partial_pearson_given_step": "partial Pearson r given step",
    "partial_spearman_given_step": "partial Spearman rho given step",
}


def association_lines(result: dict) -> list[str]:
  lines = ["## Curvature-FID association", ""]
  if result["verdict"] == criteria.SKIPPED:
    return lines + [f"**skipped**: {result['reason']}", ""]
  lines += [
      f"n = {result['n']} milestone pairs pooled from {', '.join(result['runs'])}. Curvature "
      f"is the reference (unweighted eps-MSE) objective's Hessian trace, "
      f"`{criteria.REF_CURVATURE}` or, for constant-weighting runs, `{criteria.CURVATURE}`, "
      f"at the last logged step at or before each `{criteria.MILESTONE_FID}`.", "",
      "| measure | estimate | interval | reading |", "|---|---|---|---|"]
  for name, iv in result["measures"].items():
    bounds = (f"[{num(iv.low)}, {num(iv.high)}] ({iv.confidence:.0%}, {iv.method})"
              if iv.has_interval else iv.method)
    lines.append(f"| {_MEASURE_NAMES[name]} | {num(iv.estimate)} | {bounds} | "
                 f"{result['readings'][name]} |")
  lines.append("")
  lines += [f"- warning: {w}" for w in result["warnings"]]
  lines += [f"- left out: {e}" for e in result["excluded"]]
  lines += [f"- note: {n}" for n in result["notes"]]
  return lines + [""]
