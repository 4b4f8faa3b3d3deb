"""Overlay figures of runs and replicate groups, written as PNG files.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never through
pyplot, so plotting needs no display and changes no process-wide matplotlib state.
A group of one run is drawn as that run; a larger group as its seed mean with a 95% band.
Each function returns the path it wrote, or None when no run has the data for it.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import Sequence

import matplotlib.backends.backend_agg as backend_agg
import matplotlib.colors
import matplotlib.figure
import matplotlib.image
import matplotlib.ticker
import numpy as np
from scipy import stats as sps

from diffdyn.analysis import criteria
from diffdyn.analysis import curvature_detail as detail
from diffdyn.analysis import runs as runs_lib

LOSS = "train/loss"
WALL_TIME = runs_lib.WALL_TIME
_FIGSIZE = (8.0, 4.8)
_DPI = 130
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")


def group_colors(groups: Sequence[runs_lib.Group]) -> dict[str, str]:
  """One colour per group, the same in every figure."""
  return {g.name: _PALETTE[i % len(_PALETTE)] for i, g in enumerate(groups)}


def _new_figure(width: float = _FIGSIZE[0], height: float = _FIGSIZE[1]):
  fig = matplotlib.figure.Figure(figsize=(width, height), dpi=_DPI)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _step_label(x: float, _pos=None) -> str:
  """Tick labels like 500, 2k, 12.5k, 1M: shorter than scientific offsets."""
  if abs(x) >= 1e6:
    return f"{x / 1e6:g}M"
  if abs(x) >= 1e3:
    return f"{x / 1e3:g}k"
  return f"{x:g}"


def zoom_limit(runs: Sequence[runs_lib.Run]) -> int | None:
  """The shortest run's length when runs differ more than 2x in length, else None.

  A 50k-step run squeezes 10k-step runs into a fifth of the axis; a second panel over the
  shortest run's steps keeps them comparable (the E7 report's own zoomed figure).
  """
  lengths = [r.total_steps for r in runs]
  if not lengths or max(lengths) <= 2 * min(lengths):
    return None
  return min(lengths)


def _fit_y_to_x_range(ax, x_max: float) -> None:
  """Rescale y to the lines' points at or left of x_max (matplotlib autoscales on all data)."""
  ys = []
  for line in ax.get_lines():
    x = np.asarray(line.get_xdata(), dtype=float)
    y = np.asarray(line.get_ydata(), dtype=float)
    y = y[(x <= x_max) & np.isfinite(y)]
    ys.append(y[y > 0] if ax.get_yscale() == "log" else y)
  ys = np.concatenate(ys) if ys else np.zeros(0)
  if ys.size == 0:
    return
  lo, hi = float(ys.min()), float(ys.max())
  if ax.get_yscale() == "log":
    ax.set_ylim(lo / 1.15, hi * 1.15)
  else:
    pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1.0)
    ax.set_ylim(lo - pad, hi + pad)


def _render(draw, path: pathlib.Path, title: str, xlabel: str, ylabel: str,
            zoom_to: int | None = None, log_y: bool = False, step_axis: bool = True,
            note: str | None = None) -> pathlib.Path:
  """Calls draw(ax) on one panel, or on a full and a zoomed panel, and saves the figure."""
  panels = 1 if zoom_to is None else 2
  fig = _new_figure(_FIGSIZE[0] * (1.0 if panels == 1 else 1.75), _FIGSIZE[1])
  axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
  for i, ax in enumerate(axes):
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if log_y:
      ax.set_yscale("log")
      # Plain decimals at 1-2-5 steps (0.05, 0.1, 0.2) read faster than 6x10^-2 labels.
      ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
      ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
      ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if step_axis:
      ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_step_label))
    if i == 1:
      ax.set_xlim(0, zoom_to * 1.02)
      _fit_y_to_x_range(ax, zoom_to * 1.02)
      ax.set_title(f"zoom: steps 0-{_step_label(zoom_to)}", fontsize=10)
  handles, _ = axes[-1].get_legend_handles_labels()
  if handles:
    axes[-1].legend(fontsize=8, framealpha=0.9, ncol=2 if len(handles) > 7 else 1)
  if note:
    axes[0].text(0.99, 0.98, note, transform=axes[0].transAxes, ha="right", va="top",
                 fontsize=7, color="0.35")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path)
  return path


def ema(values: np.ndarray, span: int) -> np.ndarray:
  """Bias-corrected exponential moving average with alpha = 2 / (span + 1).

  NaNs do not enter the average; the output there repeats the last smoothed value, so one
  diverged point does not erase the rest of the curve.
  """
  alpha = 2.0 / (span + 1.0)
  out = np.full(values.shape, np.nan)
  acc, weight = 0.0, 0.0
  for i, v in enumerate(values):
    if np.isfinite(v):
      acc = (1.0 - alpha) * acc + alpha * v
      weight = (1.0 - alpha) * weight + alpha
    if weight > 0:
      out[i] = acc / weight
  return out


def smoothing_span(num_points: int) -> int:
  """About 8% of the points: enough to see the trend of a batch-4 loss, not to flatten it."""
  return max(1, round(0.08 * num_points))


def _column_mean(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean over rows of the finite entries of each column (NaN where none), and their count."""
  finite = np.isfinite(table)
  count = finite.sum(axis=0)
  total = np.where(finite, table, 0.0).sum(axis=0)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan), count


def _seed_band(table: np.ndarray, confidence: float = 0.95):
  """Per-column seed mean and t-interval bounds (NaN where fewer than two seeds logged)."""
  mean, count = _column_mean(table)
  finite = np.isfinite(table)
  squares = np.where(finite, (table - mean) ** 2, 0.0).sum(axis=0)
  std = np.sqrt(squares / np.maximum(count - 1, 1))
  q = np.where(count >= 2, sps.t.ppf(0.5 + confidence / 2.0, np.maximum(count - 1, 1)), np.nan)
  half = q * std / np.sqrt(np.maximum(count, 1))
  return mean, mean - half, mean + half


def _group_label(group: runs_lib.Group) -> str:
  return group.runs[0].label if group.size == 1 else f"{group.name} (mean of {group.size} seeds)"


def _groups_with(groups: Sequence[runs_lib.Group], key: str) -> list[runs_lib.Group]:
  return [g for g in groups if any(r.has(key) for r in g.runs)]


def _runs_with(groups: Sequence[runs_lib.Group], key: str) -> list[runs_lib.Run]:
  return [r for g in groups for r in g.runs if r.has(key)]


def _series_of(group: runs_lib.Group, key: str) -> list[runs_lib.Series]:
  return [r.series(key) for r in group.runs if r.has(key)]


def plot_loss(groups: Sequence[runs_lib.Group], colors: dict[str, str],
              path: pathlib.Path) -> pathlib.Path | None:
  """Raw loss (light) and its EMA (bold); groups get a 95% band over seeds' EMAs.

  Every curve uses one EMA span, set by the run with the fewest points, so that smoothing
  does not differ between the runs being compared.
  """
  present = _groups_with(groups, LOSS)
  if not present:
    return None
  span = smoothing_span(min(r.series(LOSS)[0].size for g in present for r in g.runs
                            if r.has(LOSS)))
  positive = all(np.nanmin(r.series(LOSS)[1]) > 0 for g in present for r in g.runs
                 if r.has(LOSS))

  def draw(ax):
    for group in present:
      color = colors[group.name]
      series = _series_of(group, LOSS)
      steps, raw = runs_lib.align_by_step(series)
      mean, low, high = _seed_band(np.stack([ema(row, span) for row in raw]))
      ax.plot(steps, _column_mean(raw)[0], color=color, alpha=0.25, lw=0.8)
      ax.plot(steps, mean, color=color, lw=2.0, label=_group_label(group))
      if len(series) > 1:
        ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)

  note = f"light: raw; bold: EMA (span {span} points)"
  if any(g.size > 1 for g in present):
    note += "; band: 95% over seeds"
  return _render(draw, path, "Training loss vs step", "training step",
                 "train/loss (each run's own objective)", zoom_limit(_runs_with(present, LOSS)),
                 log_y=positive, note=note)


def _draw_curvature(ax, group: runs_lib.Group, key: str, std_key: str | None, color: str,
                    dashed: bool, label: str, std_scale: float = 1.0) -> None:
  """The group's seed mean of `key` with its 95% band; one run gets +- std_scale x std_key."""
  series = _series_of(group, key)
  steps, table = runs_lib.align_by_step(series)
  mean, low, high = _seed_band(table)
  style = "--" if dashed else "-"
  if len(series) == 1 and std_key is not None and group.runs[0].has(std_key):
    std_steps, std = runs_lib.align_by_step([group.runs[0].series(std_key)])
    std = std_scale * np.interp(steps, std_steps, std[0])
    low, high = mean - std, mean + std
  ax.plot(steps, mean, style, color=color, lw=1.3, label=label)
  if np.any(np.isfinite(low)):
    ax.fill_between(steps, low, high, color=color, alpha=0.12 if dashed else 0.2, lw=0)


def plot_curvature(groups: Sequence[runs_lib.Group], colors: dict[str, str],
                   path: pathlib.Path) -> pathlib.Path | None:
  """Hutchinson trace mean with a band (probe std for one run, 95% over seeds for groups),
  and the reference objective dashed where it was logged."""
  present = [g for g in groups
             if any(r.has(criteria.CURVATURE) or r.has(criteria.REF_CURVATURE) for r in g.runs)]
  if not present:
    return None

  def draw(ax):
    for group in present:
      color = colors[group.name]
      band = "± probe std" if group.size == 1 else "95% band over seeds"
      has_train = any(r.has(criteria.CURVATURE) for r in group.runs)
      if has_train:
        _draw_curvature(ax, group, criteria.CURVATURE, "curvature/hutch_trace_std", color,
                        False, f"{_group_label(group)}, train objective ({band})")
      # With constant weighting the reference objective is the train objective: one line.
      constant = runs_lib.config_get(group.config, "loss.weighting") == "constant"
      if any(r.has(criteria.REF_CURVATURE) for r in group.runs) and not (constant and has_train):
        _draw_curvature(ax, group, criteria.REF_CURVATURE, "curvature/ref/hutch_trace_std",
                        color, True, f"{_group_label(group)}, reference eps-MSE (dashed)")

  return _render(draw, path, "Curvature (Hutchinson trace of the loss Hessian) vs step",
                 "training step", "Hessian trace estimate, tr(H)",
                 zoom_limit([r for g in present for r in g.runs]))


def _fid_points(group: runs_lib.Group, x_key: str | None):
  """Milestone FID seed means and bands, x = step or the wall time (minutes) at that step."""
  series = _series_of(group, criteria.MILESTONE_FID)
  steps, table = runs_lib.align_by_step(series)
  mean, low, high = _seed_band(table)
  if x_key is None:
    return steps.astype(float), mean, low, high
  times = np.full(table.shape, np.nan)
  for row, run in enumerate(r for r in group.runs if r.has(criteria.MILESTONE_FID)):
    if not run.has(x_key):
      continue
    for col, step in enumerate(steps):
      found = runs_lib.value_at_or_before(run.series(x_key), int(step))
      if found is not None and np.isfinite(table[row, col]):
        times[row, col] = found[1] / 60.0
  return _column_mean(times)[0], mean, low, high


def _draw_fid(ax, group: runs_lib.Group, color: str, x_key: str | None,
              x_scale: float) -> None:
  x, mean, low, high = _fid_points(group, x_key)
  keep = np.isfinite(x) & np.isfinite(mean)
  ax.plot(x[keep] / x_scale, mean[keep], "o-", color=color, lw=1.6, ms=4,
          label=_group_label(group))
  if group.size > 1:
    err = np.stack([mean - low, high - mean])[:, keep]
    ax.errorbar(x[keep] / x_scale, mean[keep], yerr=np.nan_to_num(err), fmt="none",
                ecolor=color, capsize=3, lw=1)


def _draw_final_fid(ax, group: runs_lib.Group, color: str, x_key: str | None,
                    x_scale: float) -> bool:
  """A star at the seed mean of the final FID; False when no run logged one."""
  points = []
  for run in group.runs:
    if run.has(criteria.FINAL_FID):
      steps, values = run.series(criteria.FINAL_FID)
      step, fid = int(steps[-1]), float(values[-1])
      if x_key is None:
        points.append((step, fid))
      elif run.has(x_key):
        found = runs_lib.value_at_or_before(run.series(x_key), step)
        if found is not None:
          points.append((found[1] / 60.0, fid))
  if points:
    x, y = np.mean(points, axis=0)
    ax.plot([x / x_scale], [y], "*", color=color, ms=13, mec="black", mew=0.6)
  return bool(points)


def plot_fid(groups: Sequence[runs_lib.Group], colors: dict[str, str], path: pathlib.Path,
             against: str = "step") -> pathlib.Path | None:
  """Milestone FID (circles) and final FID (star) against step or wall time."""
  present = [g for g in groups if any(r.has(criteria.MILESTONE_FID) or r.has(criteria.FINAL_FID)
                                      for r in g.runs)]
  if not present:
    return None
  x_key = None if against == "step" else WALL_TIME
  x_scale, x_label = 1.0, "training step"
  if x_key is not None:
    longest = max((float(np.nanmax(r.series(WALL_TIME)[1])) for g in present for r in g.runs
                   if r.has(WALL_TIME)), default=0.0)
    x_scale, unit = (60.0, "hours") if longest > 3 * 3600 else (1.0, "minutes")
    x_label = f"wall time ({unit}, summed over resumes)"

  def draw(ax):
    finals = False
    for group in present:
      if any(r.has(criteria.MILESTONE_FID) for r in group.runs):
        _draw_fid(ax, group, colors[group.name], x_key, x_scale)
      finals |= _draw_final_fid(ax, group, colors[group.name], x_key, x_scale)
    if finals:
      ax.plot([], [], "*", color="white", ms=13, mec="black", mew=0.6,
              label=f"final FID ({criteria.FINAL_FID})")

  note = "error bars: 95% interval over seeds" if any(g.size > 1 for g in present) else None
  title = "FID vs step" if x_key is None else "FID vs wall time"
  zoom = zoom_limit(_runs_with(present, criteria.MILESTONE_FID)) if x_key is None else None
  return _render(draw, path, title, x_label, "FID (lower is better)", zoom,
                 step_axis=x_key is None, note=note)


def _grid_step(path: pathlib.Path) -> str:
  match = re.search(r"step_(\d+)", path.name)
  return str(int(match.group(1))) if match else path.stem


def plot_sample_grids(groups: Sequence[runs_lib.Group], path: pathlib.Path,
                      max_columns: int = 5) -> pathlib.Path | None:
  """The last sample grid of each group's first seed that has one, side by side."""
  finals = []
  for group in groups:
    with_grids = [r for r in group.runs if r.sample_grids()]
    if with_grids:
      run = with_grids[0]
      of = f" (1 of {group.size} seeds)" if group.size > 1 else ""
      finals.append((f"{run.label}{of}", run.sample_grids()[-1]))
  if not finals:
    return None
  columns = min(max_columns, len(finals))
  rows = math.ceil(len(finals) / columns)
  fig = matplotlib.figure.Figure(figsize=(3.2 * columns, 3.5 * rows + 0.5), dpi=_DPI,
                                 layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  for i, (label, image_path) in enumerate(finals):
    ax = fig.add_subplot(rows, columns, i + 1)
    try:
      ax.imshow(matplotlib.image.imread(image_path), interpolation="nearest")
    except (OSError, ValueError, SyntaxError) as e:
      # A grid cut off by a kill should not cost the rest of the report.
      ax.text(0.5, 0.5, f"unreadable image:\n{image_path.name}\n({type(e).__name__})",
              ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax.set_title(f"{label}\nstep {_grid_step(image_path)}", fontsize=9)
    ax.axis("off")
  fig.suptitle("Final sample grids")
  fig.savefig(path)
  return path


def plot_association(result: dict, colors: dict[str, str], run_groups: dict[str, str],
                     path: pathlib.Path) -> pathlib.Path | None:
  """Milestone FID against the curvature logged at or before it, one colour per group.

  `run_groups` maps a run directory (as in the pairs' "path") to its group's name.
  """
  if result.get("verdict") == criteria.SKIPPED:
    return None
  m = result["measures"]
  title = (f"Curvature vs milestone FID, pooled: n = {result['n']}, "
           f"Pearson r = {m['pearson'].estimate:.2f}, Spearman rho = {m['spearman'].estimate:.2f}"
           f"\npartial given step: r = {m['partial_pearson_given_step'].estimate:.2f}, "
           f"rho = {m['partial_spearman_given_step'].estimate:.2f}")

  def draw(ax):
    for group_name, color in colors.items():
      pairs = [p for p in result["pairs"] if run_groups.get(p["path"]) == group_name]
      if pairs:
        ax.scatter([p["curvature"] for p in pairs], [p["fid"] for p in pairs], color=color,
                   s=22, label=group_name, alpha=0.85)

  return _render(draw, path, title, "Hessian trace estimate at the milestone, tr(H)",
                 "milestone FID (lower is better)", step_axis=False)


# ----------------------------------------------------------------------------------------------
# Curvature in detail: per-block traces, Gauss-Newton vs Hessian, tr/P, EMA vs raw, Adam's
# preconditioned sharpness and the spectral density (keys: diffdyn.analysis.curvature_detail).
# ----------------------------------------------------------------------------------------------

# A single run's band: +- 1.96 probe standard errors, the 95% interval of its probe mean.
STDERR_95 = 1.96


@dataclasses.dataclass(frozen=True)
class Line:
  """One curve of a panel: its key, the key of its standard error, and how it is drawn."""
  key: str
  stderr_key: str | None = None
  dashed: bool = False
  what: str = ""   # legend text after the group's label


@dataclasses.dataclass(frozen=True)
class Panel:
  title: str
  lines: tuple[Line, ...]


def _panel_layout(count: int, max_columns: int) -> tuple[int, int]:
  columns = min(count, max_columns)
  return math.ceil(count / columns), columns


def _figure_legend(fig, axes) -> None:
  """One legend for all panels, each label once, under the panels."""
  seen = {}
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      seen.setdefault(label, handle)
  if seen:
    fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center", fontsize=8,
               ncol=min(2, len(seen)), framealpha=0.9)


def _render_panels(draws: Sequence[tuple[str, object]], path: pathlib.Path, title: str,
                   ylabel: str, note: str | None = None, max_columns: int = 4,
                   log_y: bool = False) -> pathlib.Path:
  """A grid of panels over one step axis, draw(ax) in each, and one legend below them."""
  rows, columns = _panel_layout(len(draws), max_columns)
  fig = matplotlib.figure.Figure(figsize=(3.6 * columns + 0.6, 2.7 * rows + 1.4), dpi=_DPI,
                                 layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  axes = []
  for i, (panel_title, draw) in enumerate(draws):
    ax = fig.add_subplot(rows, columns, i + 1, sharex=axes[0] if axes else None)
    draw(ax)
    ax.set_title(panel_title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=7)
    if log_y:
      ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_step_label))
    if i % columns == 0:
      ax.set_ylabel(ylabel, fontsize=8)
    if i >= len(draws) - columns:
      ax.set_xlabel("training step", fontsize=8)
    axes.append(ax)
  fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
  _figure_legend(fig, axes)
  fig.savefig(path)
  return path


def _band_note(groups: Sequence[runs_lib.Group], single: str) -> str:
  parts = []
  if any(g.size == 1 for g in groups):
    parts.append(f"one seed: {single}")
  if any(g.size > 1 for g in groups):
    parts.append("several seeds: mean, 95% band over seeds")
  return "; ".join(parts)


def _line_label(group: runs_lib.Group, line: Line) -> str:
  return f"{_group_label(group)}, {line.what}" if line.what else _group_label(group)


def plot_panels(groups: Sequence[runs_lib.Group], colors: dict[str, str], path: pathlib.Path,
                title: str, ylabel: str, panels: Sequence[Panel],
                needs: Sequence[str] = ()) -> pathlib.Path | None:
  """One panel per `Panel` that some group logged a line of; None when no group logged any,
  or none logged any of the keys in `needs` (what the figure is about)."""
  present = [p for p in panels if any(_groups_with(groups, line.key) for line in p.lines)]
  if not present or (needs and not any(_groups_with(groups, key) for key in needs)):
    return None

  def drawer(panel: Panel):
    def draw(ax):
      for line in panel.lines:
        for group in _groups_with(groups, line.key):
          _draw_curvature(ax, group, line.key, line.stderr_key, colors[group.name],
                          line.dashed, _line_label(group, line), STDERR_95)
    return draw

  with_stderr = any(line.stderr_key for p in present for line in p.lines)
  note = _band_note(groups, "+- 1.96 probe standard errors" if with_stderr else "no band")
  return _render_panels([(p.title, drawer(p)) for p in present], path, title, ylabel, note)


def block_panels(runs: Sequence[runs_lib.Run], prefix: str, partition: str,
                 stat: str = detail.HESSIAN) -> list[Panel]:
  """A panel per block of `partition` logged under `prefix` (curvature/ref/: the reference)."""
  stderr = stat.removesuffix("_mean") + "_stderr"   # hutch_trace_stderr, normalized_trace_stderr
  return [Panel(name, (Line(detail.block_key(prefix, partition, name, stat),
                            detail.block_key(prefix, partition, name, stderr)),))
          for name in detail.block_names(runs, prefix, partition)]


def _objective_title(objective: str, prefix: str) -> str:
  return f"{objective} objective (`{prefix}...`)"


def objective_panels(lines_of) -> list[Panel]:
  """A train-objective and a reference-objective panel, lines_of(prefix) giving their lines."""
  return [Panel(_objective_title(objective, prefix), tuple(lines_of(prefix)))
          for objective, prefix in detail.OBJECTIVES.items()]


def ggn_vs_hessian_panels() -> list[Panel]:
  return objective_panels(lambda p: (
      Line(p + detail.HESSIAN, p + detail.HESSIAN_STDERR, False, "Hessian tr(H)"),
      Line(p + detail.GGN, p + detail.GGN_STDERR, True, "Gauss-Newton tr(G)")))


def ema_vs_raw_panels() -> list[Panel]:
  return objective_panels(lambda p: (
      Line(p + detail.HESSIAN, p + detail.HESSIAN_STDERR, False, "raw params"),
      Line(detail.ema_prefix(p) + detail.HESSIAN, detail.ema_prefix(p) + detail.HESSIAN_STDERR,
           True, "EMA params")))


def trace_per_param_panels() -> list[Panel]:
  return objective_panels(lambda p: (Line(p + detail.TRACE_PER_PARAM),))


def precond_threshold_lines(groups: Sequence[runs_lib.Group], prefix: str = "curvature/"):
  """[(group name, steps, threshold)] per group that logged `precond_threshold`: the line
  lambda_max(P^-1 H) is held to, 2 (1 + b1) / ((1 - b1) lr), at each measured step (mean over
  the group's seeds, which share the learning rate)."""
  key = prefix + detail.PRECOND_THRESHOLD
  lines = []
  for group in _groups_with(groups, key):
    steps, table = runs_lib.align_by_step(_series_of(group, key))
    lines.append((group.name, steps, _column_mean(table)[0]))
  return lines


def _threshold_label(group: runs_lib.Group, values: np.ndarray) -> str:
  b1 = runs_lib.config_value(group.config, "train.adam_b1")
  factor = (f"{2 * (1 + b1) / (1 - b1):.3g}/lr" if isinstance(b1, (int, float)) and b1 < 1
            else "2(1+b1)/((1-b1) lr)")
  finite = values[np.isfinite(values)]
  if finite.size and np.allclose(finite, finite[0], rtol=1e-6):
    return f"stability threshold {factor} = {finite[0]:.4g}"
  return f"stability threshold {factor} (follows the learning rate)"


def plot_precond_sharpness(groups: Sequence[runs_lib.Group], colors: dict[str, str],
                           path: pathlib.Path, title: str = "") -> pathlib.Path | None:
  """lambda_max(P^-1 H) of the raw params per objective, with Adam's stability threshold."""
  measured = [(objective, prefix) for objective, prefix in detail.OBJECTIVES.items()
              if _groups_with(groups, prefix + detail.PRECOND)]
  if not measured:
    return None
  positive = all(np.nanmin(r.series(prefix + detail.PRECOND)[1]) > 0 for _, prefix in measured
                 for r in _runs_with(groups, prefix + detail.PRECOND))

  def drawer(prefix: str):
    def draw(ax):
      key = prefix + detail.PRECOND
      for group in _groups_with(groups, key):
        _draw_curvature(ax, group, key, None, colors[group.name], False, _group_label(group))
      thresholds = precond_threshold_lines(groups, prefix)
      shared = len({(tuple(s), tuple(np.round(v, 6))) for _, s, v in thresholds}) == 1
      for name, steps, values in thresholds[:1] if shared else thresholds:
        group = next(g for g in groups if g.name == name)
        ax.plot(steps, values, "--" if shared else ":", lw=1.4,
                color="black" if shared else colors[name],
                label=_threshold_label(group, values) + ("" if shared else f" ({name})"))
    return draw

  note = _band_note(groups, "no band (one Lanczos estimate)")
  return _render_panels([(_objective_title(o, p), drawer(p)) for o, p in measured], path,
                        f"{title}{': ' if title else ''}Adam's preconditioned sharpness "
                        "lambda_max(P^-1 H) vs step",
                        "lambda_max(P^-1 H)", note, log_y=positive)


# Eigenvalue points of the common grid of a heat map: finer than any figure's pixels.
MAX_DENSITY_POINTS = 2048


def _density_step(path: pathlib.Path) -> int | None:
  match = re.fullmatch(r"step_(\d+)\.npz", path.name)
  return int(match.group(1)) if match else None


def density_map(run: runs_lib.Run, objective: str = "ref",
                notes: list[str] | None = None) -> dict | None:
  """The run's spectral densities of one objective ("train", "ref", "ema_ref", ...) over steps.

  Each file has its own eigenvalue grid (spanning that step's Ritz values); they are
  interpolated onto one grid over all of them, as fine as the finest of theirs (at most
  MAX_DENSITY_POINTS points), zero outside a file's own grid, where its Gaussians hold under
  1e-6 of their mass. Returns {steps (S,), grid (G,), density (S, G),
  largest (S,) the largest Ritz value per step}, or None when no file has the objective.
  Unreadable files are left out, with a line in `notes`.
  """
  found = []
  for path in run.density_files():
    step = _density_step(path)
    try:
      arrays = runs_lib.read_density(path)
    except runs_lib.RunFormatError as e:
      if notes is not None:
        notes.append(f"{e}; left out of the spectral density figure")
      continue
    names = [f"{objective}_{n}" for n in ("grid", "density", "nodes")]
    if step is None or not all(n in arrays for n in names):
      continue
    grid, dens, nodes = (np.asarray(arrays[n], dtype=float).ravel() for n in names)
    problem = None
    if grid.size < 2 or grid.shape != dens.shape:
      problem = f"{objective}_grid and {objective}_density differ in shape"
    elif not np.any(np.isfinite(dens) & (dens > 0)) or not np.all(np.isfinite(grid)):
      problem = f"{objective}_density has no positive value or {objective}_grid is not finite"
    if problem:
      if notes is not None:
        notes.append(f"{path}: {problem}; left out of the spectral density figure")
      continue
    found.append((step, grid, dens, float(np.nanmax(nodes))))
  if not found:
    return None
  lo = min(g[0] for _, g, _, _ in found)
  hi = max(g[-1] for _, g, _, _ in found)
  finest = min((g[-1] - g[0]) / (g.size - 1) for _, g, _, _ in found)
  num = MAX_DENSITY_POINTS if finest <= 0 else int(np.ceil((hi - lo) / finest)) + 1
  grid = np.linspace(lo, hi, min(max(num, 2), MAX_DENSITY_POINTS))
  density = np.stack([np.interp(grid, g, d, left=0.0, right=0.0) for _, g, d, _ in found])
  return dict(steps=np.array([s for s, _, _, _ in found]), grid=grid, density=density,
              largest=np.array([top for _, _, _, top in found]))


def _edges(centres: np.ndarray) -> np.ndarray:
  """Cell edges halfway between centres; a single centre gets a cell of width max(|c|, 1)."""
  if centres.size == 1:
    half = max(abs(float(centres[0])), 1.0) / 2
    return np.array([centres[0] - half, centres[0] + half])
  mid = (centres[1:] + centres[:-1]) / 2
  return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


# The colour scale spans at most this many decades below the peak density.
MAX_DENSITY_DECADES = 12


def density_color_range(maps: Sequence[dict]) -> tuple[float, float]:
  """(low, high) of a logarithmic colour scale for `density_map` results.

  high is the largest density; low is half the smallest density found at a step's largest
  Ritz value, so that the top outlier of every step shows even though its quadrature weight
  is small (about 1/P for a random start: nine decades below the bulk at 35M parameters).
  """
  high = max(float(np.nanmax(m["density"])) for m in maps)
  at_top = [np.interp(top, m["grid"], row) for m in maps
            for top, row in zip(m["largest"], m["density"])]
  at_top = [d for d in at_top if d > 0]
  low = 0.5 * min(at_top) if at_top else high * 1e-4
  return max(low, high * 10.0 ** -MAX_DENSITY_DECADES), high


def plot_spectral_density(groups: Sequence[runs_lib.Group], path: pathlib.Path,
                          notes: list[str] | None = None, title: str = "") -> pathlib.Path | None:
  """Heat maps of the raw params' spectral density, eigenvalue vs step, for each group's first
  seed with density files: one row per objective, one column per group, one colour scale."""
  cells = []
  for objective in ("train", "ref"):
    for group in groups:
      run = next((r for r in group.runs if r.density_files()), None)
      found = density_map(run, objective, notes) if run is not None else None
      if found is not None:
        of = f" (1 of {group.size} seeds)" if group.size > 1 else ""
        cells.append((objective, f"{run.label}{of}", found))
  if not cells:
    return None
  objectives = list(dict.fromkeys(o for o, _, _ in cells))
  columns = max(sum(1 for o, _, _ in cells if o == obj) for obj in objectives)
  low, high = density_color_range([m for _, _, m in cells])
  norm = matplotlib.colors.LogNorm(vmin=low, vmax=high, clip=True)
  cmap = matplotlib.colormaps["magma"].with_extremes(bad="black", under="black")
  fig = _new_figure(4.2 * columns + 1.2, 3.3 * len(objectives) + 0.8)
  mesh = None
  for row, objective in enumerate(objectives):
    row_cells = [c for c in cells if c[0] == objective]
    first = None
    for col, (_, label, m) in enumerate(row_cells):
      ax = fig.add_subplot(len(objectives), columns, row * columns + col + 1, sharey=first)
      first = first or ax
      ax.set_facecolor("black")   # where no file's grid reaches: no density
      density = np.where(m["density"] > 0, m["density"], np.nan)
      mesh = ax.pcolormesh(_edges(m["steps"].astype(float)), _edges(m["grid"]), density.T,
                           norm=norm, cmap=cmap, shading="flat")
      ax.plot(m["steps"], m["largest"], "o-", color="#7fdbff", ms=3, lw=0.9,
              label="largest Ritz value")
      name = "train objective" if objective == "train" else "reference objective"
      ax.set_title(f"{label}\n{name}", fontsize=8)
      ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_step_label))
      ax.tick_params(labelsize=7)
      ax.set_xlabel("training step", fontsize=8)
      if col == 0:
        ax.set_ylabel("eigenvalue of H", fontsize=8)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.8)
  fig.suptitle(f"{title}{': ' if title else ''}Hessian spectral density (SLQ) vs step, raw "
               "parameters", fontsize=10)
  fig.tight_layout(rect=(0, 0, 0.9, 0.96))
  bar = fig.add_axes((0.915, 0.12, 0.018, 0.76))
  fig.colorbar(mesh, cax=bar).set_label("density (log scale)", fontsize=8)
  fig.savefig(path)
  return path
