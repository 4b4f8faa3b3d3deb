"""Where the curvature lives, what kind it is, and how near Adam is to its edge: the numbers.

Reads what the run loop's curvature probe logs (diffdyn/evaluate.py's CurvatureProbe): per
objective prefix ("curvature/" for the run's own loss, "curvature/ref/" for the unweighted
eps-MSE) the Hessian trace `hutch_trace_mean`, the per-block traces
`block/<stage|kind>/<name>/hutch_trace_mean`, the Gauss-Newton trace `ggn_trace_mean`, the mean
eigenvalue `trace_per_param` and Adam's `precond_sharpness` with its `precond_threshold`; the
EMA parameters' copies under "curvature/ema/" and "curvature/ema/ref/". Each number is
descriptive: a late-window mean per run, then the mean over a group's seeds.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from diffdyn.analysis import criteria
from diffdyn.analysis import roles
from diffdyn.analysis import runs as runs_lib

OBJECTIVES = {"train": "curvature/", "reference": "curvature/ref/"}
HESSIAN = "hutch_trace_mean"
HESSIAN_STDERR = "hutch_trace_stderr"
GGN = "ggn_trace_mean"
GGN_STDERR = "ggn_trace_stderr"
TRACE_PER_PARAM = "trace_per_param"
PRECOND = "precond_sharpness"
PRECOND_THRESHOLD = "precond_threshold"
PARTITIONS = ("stage", "kind")
# Blocks in the network's order (diffdyn.curvature.unet_param_blocks names them); a name not
# listed here goes after these, alphabetically.
_STAGE_ORDER = ("stem", "temb", *(f"down{l}" for l in range(8)), "mid",
                *(f"up{l}" for l in reversed(range(8))), "head", "other")
_KIND_ORDER = ("conv", "attention", "norm", "temb", "head", "other")


def ema_prefix(prefix: str) -> str:
  """The EMA parameters' copy of an objective prefix: curvature/ref/ -> curvature/ema/ref/."""
  return criteria.EMA_CURVATURE_PREFIX + prefix[len("curvature/"):]


def block_key(prefix: str, partition: str, name: str, stat: str = HESSIAN) -> str:
  return f"{prefix}block/{partition}/{name}/{stat}"


def _block_rank(partition: str, name: str) -> tuple:
  order = _KIND_ORDER if partition == "kind" else _STAGE_ORDER   # gn_fed/ is by stage too
  return (order.index(name), "") if name in order else (len(order), name)


def block_names(runs: Sequence[runs_lib.Run], prefix: str, partition: str) -> list[str]:
  """The blocks of `partition` that any run logged under `prefix`, in the network's order."""
  head, tail = f"{prefix}block/{partition}/", f"/{HESSIAN}"
  names = {key[len(head):-len(tail)] for run in runs for key in run.metrics
           if key.startswith(head) and key.endswith(tail)}
  return sorted(names, key=lambda n: _block_rank(partition, n))


def _late_mean(run: runs_lib.Run, key: str, window: tuple[float, float]) -> float | None:
  try:
    values, _ = criteria.window_values(run, key, window)
  except criteria.Skip:
    return None
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else None


def _ratio(a: float | None, b: float | None) -> float | None:
  if a is None or b is None or b == 0:
    return None
  return a / b


def _shares(run: runs_lib.Run, prefix: str, partition: str,
            window: tuple[float, float]) -> dict[str, float]:
  total = _late_mean(run, prefix + HESSIAN, window)
  shares = {}
  for name in block_names([run], prefix, partition):
    share = _ratio(_late_mean(run, block_key(prefix, partition, name), window), total)
    if share is not None:
      shares[name] = share
  return shares


def precond_edge(run: runs_lib.Run, prefix: str = "curvature/") -> dict | None:
  """The largest and the last lambda_max(P^-1 H) / threshold over the run; None if not logged.

  Adam is at its edge of stability where the ratio reaches 1 (Cohen et al. 2022).
  """
  if not (run.has(prefix + PRECOND) and run.has(prefix + PRECOND_THRESHOLD)):
    return None
  steps, sharp = run.series(prefix + PRECOND)
  t_steps, threshold = run.series(prefix + PRECOND_THRESHOLD)
  common, i, j = np.intersect1d(steps, t_steps, return_indices=True)
  ratio = sharp[i] / threshold[j]
  keep = np.isfinite(ratio)
  if not keep.any():
    return None
  common, ratio, threshold = common[keep], ratio[keep], threshold[j][keep]
  top = int(np.argmax(ratio))
  return dict(max_ratio=float(ratio[top]), max_step=int(common[top]),
              last_ratio=float(ratio[-1]), last_step=int(common[-1]),
              threshold=float(threshold[-1]), points=int(ratio.size))


def run_detail(run: runs_lib.Run, window: tuple[float, float]) -> dict:
  """Every number of the section for one run; a quantity it did not log is None or absent."""
  lo, hi = criteria.window_steps(run.total_steps, window)
  out = dict(run=run.label, path=str(run.path), window_steps=[lo, hi], ggn_over_hessian={},
             trace_per_param={}, ema_over_raw={}, stage_share={}, kind_share={}, precond={})
  for objective, prefix in OBJECTIVES.items():
    hessian = _late_mean(run, prefix + HESSIAN, window)
    out["ggn_over_hessian"][objective] = _ratio(_late_mean(run, prefix + GGN, window), hessian)
    out["trace_per_param"][objective] = _late_mean(run, prefix + TRACE_PER_PARAM, window)
    out["ema_over_raw"][objective] = _ratio(
        _late_mean(run, ema_prefix(prefix) + HESSIAN, window), hessian)
    for partition in PARTITIONS:
      out[f"{partition}_share"][objective] = _shares(run, prefix, partition, window)
    out["precond"][objective] = precond_edge(run, prefix)
  return out


def _summary(values: Sequence[float | None]) -> dict | None:
  """Seed mean, range and count of the values that exist; None when none does."""
  found = [v for v in values if v is not None and math.isfinite(v)]
  if not found:
    return None
  return dict(mean=float(np.mean(found)), min=float(min(found)), max=float(max(found)),
              n=len(found))


def group_detail(group: runs_lib.Group, window: tuple[float, float]) -> dict:
  """run_detail for each seed, and each number's mean over the seeds."""
  rows = [run_detail(run, window) for run in group.runs]
  mean: dict = {}
  for field in ("ggn_over_hessian", "trace_per_param", "ema_over_raw"):
    mean[field] = {o: _summary([r[field][o] for r in rows]) for o in OBJECTIVES}
  for partition in PARTITIONS:
    field = f"{partition}_share"
    mean[field] = {}
    for o in OBJECTIVES:
      names = block_names(group.runs, OBJECTIVES[o], partition)
      mean[field][o] = {n: _summary([r[field][o].get(n) for r in rows]) for n in names}
  mean["precond_max_ratio"] = {
      o: _summary([(r["precond"][o] or {}).get("max_ratio") for r in rows]) for o in OBJECTIVES}
  return dict(group=group.name, seeds=group.size, per_run=rows, mean=mean)


def curvature_detail(comparisons: Sequence[roles.Comparison],
                     window: tuple[float, float]) -> dict:
  """{comparison tag: {title, window, groups: [group_detail, ...]}}, or a skip with its reason."""
  out = {}
  for comparison in comparisons:
    runs = [run for g in comparison.groups for run in g.runs]
    if not any(run.has(prefix + HESSIAN) for run in runs for prefix in OBJECTIVES.values()):
      out[comparison.tag] = dict(verdict=criteria.SKIPPED, title=comparison.title,
                                 reason="no run logs curvature (curvature.enabled=True)")
      continue
    out[comparison.tag] = dict(title=comparison.title, window=list(window),
                               groups=[group_detail(g, window) for g in comparison.groups])
  return out
