"""Overlay figures of runs and replicate groups, written as PNG files.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never through
pyplot, so plotting needs no display and changes no process-wide matplotlib state.
A group of one run is drawn as that run; a larger group as its seed mean with a 95% band.
Each function returns the path it wrote, or None when no run has the data for it.
"""
from __future__ import annotations

import math
import pathlib
import re
from typing import Sequence

import matplotlib.backends.backend_agg as backend_agg
import matplotlib.figure
import matplotlib.image
import matplotlib.ticker
import numpy as np
from scipy import stats as sps

from diffdyn.analysis import criteria
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


def _draw_curvature(ax, group: runs_lib.Group, key: str, std_key: str, color: str,
                    dashed: bool, label: str) -> None:
  series = _series_of(group, key)
  steps, table = runs_lib.align_by_step(series)
  mean, low, high = _seed_band(table)
  style = "--" if dashed else "-"
  if len(series) == 1 and group.runs[0].has(std_key):
    std_steps, std = runs_lib.align_by_step([group.runs[0].series(std_key)])
    std = np.interp(steps, std_steps, std[0])
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
