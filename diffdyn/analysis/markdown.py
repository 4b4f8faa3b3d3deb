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


def pairing(result: dict) -> str:
  """How two groups were compared: pair by pair, or as independent groups and why."""
  p = result["pairing"]
  if p["paired"] or p["how"].startswith("single seed"):
    return p["how"]
  return f"unpaired, Welch ({p['how']})"


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
      f"difference {interval(result['difference'])}, {pairing(result)}; relative change "
      f"{interval(result['relative_change'], pct)} (success: <= {pct(result['threshold'])}) "
      f"-> {bold(result['verdict'])} ({result['basis']})"]
  if _replicated(rows):
    lines += _per_run_table(rows, [("steps", "steps"), ("points", "points"), ("mean", "mean")])
  return lines


def _spike_block(result: dict, base: str, treat: str, label: str, rule: str,
                 run_detail, outcome: str, columns: Sequence[tuple[str, str]]) -> list[str]:
  """One spike criterion: its rule, per-run counts (or a table), the comparison, outcome."""
  if result["verdict"] == criteria.SKIPPED:
    return _skipped(label, result)
  rows = result["per_run"]
  counts = "" if _replicated(rows) else ": " + "; ".join(
      f"{r['run']}: {r['spikes']} of {r['points']} points (steps {r['steps'][0]}-"
      f"{r['steps'][1]}{run_detail(r)})" for role in rows.values() for r in role)
  measure = "spike count" if result["measure"] == "spikes" else "spike fraction"
  lines = [f"- {label} ({_keys(rows)}): {rule}{counts}. Mean {measure}: "
           f"{_group_value(base, result['baseline'])}, "
           f"{_group_value(treat, result['treatment'])}; difference "
           f"{interval(result['difference'])}, {pairing(result)} {outcome}"]
  if result.get("note"):
    lines.append(f"  - note: {result['note']}")
  if _replicated(rows):
    lines += _per_run_table(rows, [("steps", "steps"), ("points", "points"), *columns])
  return lines


def spike_lines(result: dict, base: str, treat: str) -> list[str]:
  rule = "" if result["verdict"] == criteria.SKIPPED else (
      f"points above {num(result['factor'])} x the baseline median "
      f"({num(result['baseline_median'])}, threshold {num(result['threshold'])}) over "
      f"{window(result['window'])}")
  outcome = "" if result["verdict"] == criteria.SKIPPED else (
      f"-> {result['verdict']} ({result['basis']}). A fixed line counts a curve's high level "
      "as spikes: on two smooth decaying curves it counts the baseline's early points.")
  return _spike_block(result, base, treat, "(b, literal) the seeds' spike count, "
                      "level-sensitive, not used in the verdict", rule, lambda r: "", outcome,
                      [("spikes", "spikes")])


def _spike_steps(steps: Sequence[int], shown: int = 8) -> str:
  if not steps:
    return "none"
  more = f", ... ({len(steps)} in all)" if len(steps) > shown else ""
  return ", ".join(str(s) for s in steps[:shown]) + more


def detrended_spike_lines(result: dict, base: str, treat: str) -> list[str]:
  rule = "" if result["verdict"] == criteria.SKIPPED else (
      f"points more than k = {num(result['k'])} noise SDs above the run's own rolling median "
      f"over {result['median_window']} logged points, in {window(result['window'])} (noise "
      "SD: 1.4826 x the MAD of the curve's second differences there, / sqrt(6))")
  outcome = "" if result["verdict"] == criteria.SKIPPED else (
      f"(success: fewer) -> {bold(result['verdict'])} ({result['basis']})")
  return _spike_block(
      result, base, treat, "(b) detrended spikes", rule,
      lambda r: f"; noise SD {num(r['noise_sd'])}; at steps {_spike_steps(r['spike_steps'])}",
      outcome, [("spikes", "spikes"), ("noise SD", "noise_sd")])


def _correction_text(correction: dict) -> str:
  if correction["method"] == "Holm":
    return (f"Holm-corrected over the {correction['family']} tested criteria at alpha = "
            f"{correction['alpha']:.3g}")
  return f"no multiplicity correction: {correction['reason']}"


def window(w: Sequence[float]) -> str:
  return f"{w[0]:.0%}-{w[1]:.0%} of each run's total steps"


def final_fid_lines(result: dict, base: str, treat: str) -> list[str]:
  if result["verdict"] == criteria.SKIPPED:
    return _skipped("(c) final FID", result)
  rows = result["per_run"]
  lines = [
      f"- (c) final FID (`{criteria.FINAL_FID}`): {_group_value(base, result['baseline'])}, "
      f"{_group_value(treat, result['treatment'])}; difference {interval(result['difference'])}, "
      f"{pairing(result)}; "
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
    lines += detrended_spike_lines(block["detrended_spikes"], base, treat)
    lines += spike_lines(block["spikes"], base, treat)
    lines += [f"- curvature shift ((a) or detrended (b), {_correction_text(block['correction'])})"
              f": {bold(block['verdict'])}", ""]
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
    return f"| {role} | skipped: {best['reason']} | | | | | |"
  steps = ", ".join(str(s) for s in best["steps"])
  evaluations = ", ".join(str(n) for n in best["num_evaluations"])
  return (f"| {role} | {best['group']} | {best['seeds']} | {interval(best['best_fid'])} | "
          f"{steps} | {evaluations} | {best['at_first_eval']} of {best['seeds']} |")


def _evaluations(result: dict) -> str:
  counts = result["num_evaluations"]
  show = lambda ns: str(ns[0]) if len(set(ns)) == 1 else "/".join(map(str, ns))
  return (f"minimum over {show(counts['variant'])} milestone(s) for {result['variant']} and "
          f"{show(counts['reference'])} for {result['reference']}")


def _comparison_line(label: str, result: dict) -> str:
  if result["verdict"] == criteria.SKIPPED:
    return f"- {label}: **skipped**: {result['reason']}"
  where = (f"milestones at steps <= {result['max_step']}" if result.get("matched")
           else "each run's milestones over its whole length")
  return (f"- {label}: {result['variant']} vs {result['reference']}, best FID over {where} "
          f"({_evaluations(result)}): difference {interval(result['difference'])}, "
          f"{pairing(result)}; relative change {interval(result['relative_change'], pct)}; "
          f"improvement {result['improvement']:.1%} (practical threshold "
          f"{result['threshold']:.0%}) -> {bold(result['verdict'])} ({result['basis']})")


def _matched_lines(result: dict) -> list[str]:
  if result.get("verdict") == criteria.SKIPPED or not result.get("milestones"):
    return []
  m = result["milestones"]
  if not m["rows"]:
    return []
  lines = ["", f"  Milestone FIDs at the matched steps (seed means), {result['variant']} / "
           f"{result['reference']}: " + "; ".join(
               f"{r['step']}: {num(r['variant'])} / {num(r['reference'])}" for r in m["rows"])]
  if m["coincide"]:
    lines.append(f"  These are the same numbers: up to step {result['max_step']} "
                 f"{result['variant']} is {result['reference']}'s run (same seed, data stream "
                 "and sampling noise), so this comparison cannot show a steps effect; "
                 "E7b's later milestones enter only the whole-run reading below.")
  return lines


def e7_lines(result: dict, how: str) -> list[str]:
  lines = [
      "## E7: steps vs capacity", "",
      f"Seed report: w1-e7_steps_vs_capacity_plan.md; roles {how}. Best FID is the minimum "
      f"over each run's milestone FIDs (`{criteria.MILESTONE_FID}`) only, which share one "
      f"sample size; the final FID (`{criteria.FINAL_FID}`, a larger sample and so a smaller "
      "upward bias) would win by its sample size alone and is left out.", "",
      "| role | group | seeds | best FID (seed mean) | best-FID step(s) | evaluations | "
      "best at first FID eval |", "|---|---|---|---|---|---|---|"]
  lines += [_best_fid_row(role, best) for role, best in result["best_fid"].items()]
  lines += ["",
            _comparison_line("steps effect (E7b vs E7a), matched milestones",
                             result["steps_effect"])]
  lines += _matched_lines(result["steps_effect"])
  lines += [_comparison_line("steps effect over the whole run (E7b vs E7a), not used in the "
                             "interpretation: a minimum over more evaluations is lower by "
                             "selection alone", result["steps_effect_over_run"]),
            _comparison_line("capacity effect (E7c vs E7a)", result["capacity_effect"]),
            _comparison_line("steps vs capacity (E7b vs E7c), matched milestones",
                             result["steps_vs_capacity"]),
            "",
            f"\"<<\" (clearly better) means: the difference's test rejects 0 at "
            f"{1 - result['confidence']:.3g} and the improvement is at least "
            f"{result['threshold']:.0%} of the reference's best FID. With one seed per group "
            "there is no test and nothing is decided.", "",
            f"**Interpretation: {result['interpretation']['text']}**", "",
            "Each run's FID bias (its milestone and final FID at the last step) is in the "
            "\"Why is FID ~ 200?\" section.", ""]
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
  matched = criteria.PARAMETER_SETS[result["parameters"]]["matched"]
  keys = sorted({p["key"] for p in result["pairs"]})
  fid_keys = sorted({p["fid_key"] for p in result["pairs"]})
  lines += [
      f"Parameters: **{result['parameters_text']}**" + ("" if matched else
      " (no run logged a matched pair; see the note)") + ".", "",
      f"n = {result['n']} milestone pairs pooled from {', '.join(result['runs'])}. Curvature "
      f"is the reference (unweighted eps-MSE) objective's Hessian trace "
      f"({', '.join(f'`{k}`' for k in keys)}; a constant-weighting run's train objective is "
      f"the reference), at the last logged step at or before each "
      f"{', '.join(f'`{k}`' for k in fid_keys)}.", "",
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
  for name, other in result["by_parameters"].items():
    if name == result["parameters"]:
      continue
    if other.get("verdict") == criteria.SKIPPED:
      lines.append(f"- {name}: skipped ({other['reason']})")
    else:
      m = other["measures"]
      lines.append(f"- {other['parameters_text']}: n = {other['n']}, Spearman rho "
                   f"{num(m['spearman'].estimate)}, partial given step "
                   f"{num(m['partial_spearman_given_step'].estimate)}")
  return lines + [""]


def _percent(x: float) -> str:
  """0.135 -> '13.5%', 7e-25 -> '7e-23%': small weights keep their magnitude."""
  return f"{x:.1%}" if x >= 1e-3 else f"{x * 100:.1g}%"


def _weighting_text(w: dict) -> str:
  if w["changed_timesteps"] == 0:
    return f"{w['weighting']}: every timestep has weight 1, so it changes none of them."
  where = (f"all t < {w['changed_below_t']}" if w["changed_below_t"] is not None
           else "not one contiguous range of t")
  text = (f"{w['weighting']} (gamma = {num(w['gamma'])}, {w['prediction']}-prediction, "
          f"{w['schedule']} schedule, beta {num(w['beta_start'])}...{num(w['beta_end'])}, "
          f"T = {w['num_timesteps']}): weight != 1 at {w['changed_timesteps']} of "
          f"{w['num_timesteps']} timesteps ({w['fraction_changed']:.1%}), {where}; "
          f"w(0) = {w['weight_at_t0']:.2g}, weights in [{w['min_weight']:.2g}, "
          f"{w['max_weight']:.2g}].")
  if w["weighting"] == "minsnr" and w["prediction"] == "eps" and w["changed_below_t"]:
    text += (f" min(SNR, gamma)/SNR is below 1 only where SNR > gamma (here SNR >= "
             f"{num(w['snr_at_last_changed'])}), the least noisy timesteps: it does not "
             "touch the low-SNR (noisy) end.")
  return text


def why_lines(contexts: Sequence[dict], init_weight_note: float) -> list[str]:
  """The "Why is FID ~ 200?" section: budgets, EMA initialisation, FID bias, weighting."""
  lines = ["## Why is FID ~ 200? The numbers", "",
           "Per replicate group (its runs share the config). No interpretation: each line is "
           "computed from config.json and metrics.jsonl.", ""]
  for c in contexts:
    b, e = c["budget"], c["ema"]
    lines += [f"### {c['group']}", ""]
    epochs = (f", {b['epochs']:.2f} epochs of the {b['dataset_size']:,} training images"
              if b["epochs"] is not None else "")
    lines.append(
        f"- Training: {b['steps']:,} steps x batch {b['batch_size']} = {b['images_seen']:,} "
        f"images seen: {b['fraction_of_reference']:.3%} of {b['reference']['name']}'s "
        f"{b['reference']['steps']:,} steps x {b['reference']['batch_size']} = "
        f"{b['reference']['images_seen']:,}{epochs}.")
    if e["steps"]:
      weights = "; ".join(f"{s}: {_percent(w)}" for s, w in zip(e["steps"], e["init_weight"]))
      high = [s for s, w in zip(e["steps"], e["init_weight"]) if w > init_weight_note]
      lines.append(
          f"- Initialisation left in the EMA parameters (decay {e['decay']}, "
          f"{'with' if e['warmup'] else 'no'} warm-up; product of the decays) at each "
          f"{'FID milestone' if e['logged'] else 'milestone step of the config (no FID logged)'}"
          f": {weights}." + (
              f" Above {init_weight_note:.0%} at step(s) {', '.join(map(str, high))}: a FID "
              "there measures a network that is that much its random initialisation "
              "(train.ema_warmup=True lowers it)." if high else ""))
    for bias in c["bias"]:
      if bias.get("verdict") == criteria.SKIPPED:
        lines.append(f"- FID bias: not estimated ({bias['reason']}).")
      else:
        lines.append(
            f"- FID bias of {bias['run']}: at step {bias['step']} the milestone FID "
            f"(N = {bias['milestone_samples']:,}) is {num(bias['milestone_fid'])} and the "
            f"final FID (N = {bias['final_samples']:,}) {num(bias['final_fid'])}: milestone "
            f"FIDs sit about {num(bias['bias_at_milestone_samples'])} above FID at N -> "
            f"infinity ({num(bias['fid_at_infinite_samples'])}), final FIDs about "
            f"{num(bias['bias_at_final_samples'])} (one pair of evaluations).")
    lines.append(f"- Loss weighting: {_weighting_text(c['weighting'])}")
    lines.append(f"- Schedule: alpha_bar_T = {c['final_alpha_bar']:.2g} (x_T carries "
                 f"sqrt(alpha_bar_T) = {c['final_alpha_bar'] ** 0.5:.2g} of x0).")
    lines.append("")
  return lines


def _summary_cell(summary: dict | None, fmt=num) -> str:
  """'0.93' for one seed, '0.93 [0.91, 0.95]' (seed mean [min, max]) for several; n/a if none."""
  if summary is None:
    return "n/a"
  if summary["n"] == 1:
    return fmt(summary["mean"])
  return f"{fmt(summary['mean'])} [{fmt(summary['min'])}, {fmt(summary['max'])}]"


def _share(x: float | None) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{x:.1%}"


def _share_table(groups: Sequence[dict], field: str, objective: str, label: str) -> list[str]:
  names = list(dict.fromkeys(n for g in groups for n in g["mean"][field][objective]))
  if not names:
    return []
  lines = ["", f"Share of the {objective} objective's trace per {label} (late-window block "
           "trace over the late-window total; the shares add up to 100%):", "",
           f"| {label} | " + " | ".join(g["group"] for g in groups) + " |",
           "|---|" + "---|" * len(groups)]
  for name in names:
    cells = [_summary_cell(g["mean"][field][objective].get(name), _share) for g in groups]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def curvature_detail_lines(result: dict, late_window: Sequence[float]) -> list[str]:
  """The "Curvature in detail" section: one table of ratios per comparison, then shares."""
  lines = ["# Curvature in detail", "",
           "Where the curvature lives, how much of it is the model's (Gauss-Newton), and how "
           "near Adam is to its edge of stability. Each number is a run's mean over "
           f"{window(late_window)} (`--late-window`), then the mean over a group's seeds with "
           "their range in brackets: descriptive, no test. The figures are listed under "
           "Figures.", ""]
  for block in result.values():
    lines += [f"## {block['title']}", ""]
    if block.get("verdict") == criteria.SKIPPED:
      lines += [f"**skipped**: {block['reason']}", ""]
      continue
    groups = block["groups"]
    lines += ["| group | seeds | tr(G)/tr(H) train | tr(G)/tr(H) reference | tr(H)/P reference | "
              "tr(H) EMA/raw reference | max lambda_max(P^-1 H)/threshold, train |",
              "|---|---|---|---|---|---|---|"]
    for g in groups:
      m = g["mean"]
      lines.append(
          f"| {g['group']} | {g['seeds']} | {_summary_cell(m['ggn_over_hessian']['train'])} | "
          f"{_summary_cell(m['ggn_over_hessian']['reference'])} | "
          f"{_summary_cell(m['trace_per_param']['reference'])} | "
          f"{_summary_cell(m['ema_over_raw']['reference'])} | "
          f"{_summary_cell(m['precond_max_ratio']['train'])} |")
    edges = [f"{r['run']}: {num(r['precond']['train']['max_ratio'])} at step "
             f"{r['precond']['train']['max_step']} (threshold "
             f"{num(r['precond']['train']['threshold'])}, {r['precond']['train']['points']} "
             "points)" for g in groups for r in g["per_run"] if r["precond"]["train"]]
    if edges:
      lines += ["", "Largest lambda_max(P^-1 H) / threshold over each run (1 = Adam's edge of "
                "stability): " + "; ".join(edges) + "."]
    lines += _share_table(groups, "stage_share", "reference", "stage")
    lines += _share_table(groups, "kind_share", "reference", "kind")
    lines.append("")
  return lines
