"""Reading run directories (metrics.jsonl, config.json, samples/, curvature_density/) and
grouping replicates.

A run directory holds `metrics.jsonl`: one JSON object per line with an int `step`, a
`wall_time` and scalar metrics. One step may be spread over several lines (train metrics
and curvature are written separately), so lines are merged by step. Problems a user can
fix raise `RunFormatError` with a one-line message naming the file and line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import zipfile
from typing import Any, Iterable, Sequence

import numpy as np

from diffdyn import errors
from diffdyn.configs import default as default_config

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
SAMPLES_DIR = "samples"
DENSITY_DIR = "curvature_density"
WALL_TIME = "wall_time"
# Config entries that may differ between replicates of one experiment.
REPLICATE_IGNORED_KEYS = ("seed", "workdir")

Series = tuple[np.ndarray, np.ndarray]


class RunFormatError(errors.UserError):
  """A run directory or one of its files cannot be read."""


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """One training run: its config and every logged scalar as (steps, values) arrays."""
  name: str
  path: pathlib.Path
  config: dict
  metrics: dict[str, Series]
  warnings: tuple[str, ...] = ()

  @property
  def seed(self) -> Any:
    return config_get(self.config, "seed")

  @property
  def label(self) -> str:
    return self.name if self.seed is None else f"{self.name} seed {self.seed}"

  @property
  def last_step(self) -> int:
    return max(int(steps[-1]) for steps, _ in self.metrics.values())

  @property
  def total_steps(self) -> int:
    """The planned length from the config, else the last logged step."""
    planned = config_get(self.config, "train.total_steps")
    if isinstance(planned, (int, float)) and not isinstance(planned, bool) and planned > 0:
      return int(planned)
    return self.last_step

  def has(self, key: str) -> bool:
    return key in self.metrics

  def series(self, key: str) -> Series:
    if key not in self.metrics:
      raise KeyError(f"{self.path / METRICS_FILE}: no {key!r} logged")
    return self.metrics[key]

  def sample_grids(self) -> list[pathlib.Path]:
    """Sample grid images in step order (their names are zero-padded step numbers)."""
    return sorted((self.path / SAMPLES_DIR).glob("step_*.png"))

  def density_files(self) -> list[pathlib.Path]:
    """Spectral-density files (curvature.density_every_steps) in step order."""
    return sorted((self.path / DENSITY_DIR).glob("step_*.npz"))


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """Runs whose configs agree except for REPLICATE_IGNORED_KEYS: seeds of one experiment."""
  name: str
  runs: tuple[Run, ...]

  @property
  def seeds(self) -> list[Any]:
    return [run.seed for run in self.runs]

  @property
  def size(self) -> int:
    return len(self.runs)

  @property
  def config(self) -> dict:
    return self.runs[0].config

  def names(self) -> set[str]:
    """Every name the group answers to: its own, its runs' names and directory names."""
    return {self.name, *(run.name for run in self.runs), *(run.path.name for run in self.runs)}


def config_get(config: dict, dotted: str, default: Any = None) -> Any:
  """config["a"]["b"] for "a.b", or `default` when any level is missing."""
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return default
    node = node[part]
  return node


def config_value(config: dict, dotted: str) -> Any:
  """config.json's value, else the default config's: a run from before a key existed ran
  with what is now its default."""
  value = config_get(config, dotted)
  if value is None:
    value = config_get(default_config.get_config().to_dict(), dotted)
  return value


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
  """{"a.b": value} for every leaf, with lists turned into tuples so they compare."""
  flat = {}
  for key, value in config.items():
    dotted = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten_config(value, f"{dotted}."))
    else:
      flat[dotted] = tuple(value) if isinstance(value, list) else value
  return flat


def _step_of(record: dict, where: str) -> int:
  if "step" not in record:
    raise RunFormatError(f"{where}: no 'step' field")
  step = record["step"]
  if isinstance(step, bool) or not isinstance(step, (int, float)):
    raise RunFormatError(f"{where}: 'step' is {step!r}, expected an integer")
  if isinstance(step, float) and not (math.isfinite(step) and step.is_integer()):
    raise RunFormatError(f"{where}: 'step' is {step!r}, expected an integer")
  if step < 0:
    raise RunFormatError(f"{where}: 'step' is {step}, expected >= 0")
  return int(step)


def _numeric(value: Any) -> float | None:
  """The float a metric value stands for; None when it is not a number.

  JSON `null` counts as NaN: some writers emit it for a non-finite value.
  """
  if value is None:
    return math.nan
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def _parse_lines(path: pathlib.Path) -> tuple[list[tuple[int, dict]], list[str]]:
  """(line number, object) for every complete line; an unreadable last line is a warning."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      numbered = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
  except OSError as e:
    raise RunFormatError(f"{path}: cannot be read: {e.strerror}") from None
  if not numbered:
    raise RunFormatError(f"{path}: empty, no metric lines (did the run log anything?)")
  last = numbered[-1][0]
  records, warnings = [], []
  for lineno, line in numbered:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if lineno == last:
        # A run killed mid-write leaves a partial last line; everything before it is good.
        warnings.append(f"{path}:{lineno}: incomplete last line ignored "
                        f"(run killed mid-write?): {e.msg} at column {e.colno}")
        continue
      raise RunFormatError(f"{path}:{lineno}: not valid JSON: {e.msg} at column {e.colno}")
    if not isinstance(record, dict):
      raise RunFormatError(f"{path}:{lineno}: expected a JSON object, got "
                           f"{type(record).__name__}")
    records.append((lineno, record))
  if not records:
    raise RunFormatError(f"{path}: no complete metric lines")
  return records, warnings


def read_metrics(path: pathlib.Path) -> tuple[dict[str, Series], list[str]]:
  """Every scalar in a metrics.jsonl file as {key: (steps, values)}, merged by step.

  A key logged twice at one step keeps the later value (with a warning). `wall_time` at a
  step is the largest over that step's lines: the time by which all of them were written.
  """
  records, warnings = _parse_lines(path)
  by_key: dict[str, dict[int, float]] = {}
  repeats: dict[str, list[int]] = {}
  skipped: dict[str, int] = {}
  for lineno, record in records:
    step = _step_of(record, f"{path}:{lineno}")
    for key, raw in record.items():
      if key == "step":
        continue
      value = _numeric(raw)
      if value is None:
        skipped.setdefault(key, lineno)
        continue
      column = by_key.setdefault(key, {})
      if key == WALL_TIME and step in column:
        value = max(value, column[step])
      elif step in column:
        repeats.setdefault(key, []).append(lineno)
      column[step] = value
  for key, lineno in skipped.items():
    warnings.append(f"{path}:{lineno}: {key!r} is not a number; that key is ignored")
  for key, lines in repeats.items():
    warnings.append(f"{path}:{lines[0]}: {key!r} logged more than once for the same step "
                    f"({len(lines)} times); the later value is used")
  metrics = {}
  for key, column in by_key.items():
    steps = np.array(sorted(column), dtype=np.int64)
    metrics[key] = (steps, np.array([column[s] for s in steps.tolist()], dtype=np.float64))
  if not any(key != WALL_TIME for key in metrics):
    raise RunFormatError(f"{path}: no metric values, only steps")
  return metrics, warnings


def read_config(path: pathlib.Path) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise RunFormatError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
  except UnicodeDecodeError as e:
    raise RunFormatError(f"{path}: not UTF-8 text ({e.reason})") from None
  except OSError as e:
    raise RunFormatError(f"{path}: cannot be read: {e.strerror}") from None
  if not isinstance(config, dict):
    raise RunFormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
  return config


def read_density(path: pathlib.Path) -> dict[str, np.ndarray]:
  """The arrays of one curvature_density/step_XXXXXX.npz file.

  Raises RunFormatError when the file cannot be read as an .npz (cut off, not a zip).
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      return {name: np.asarray(data[name]) for name in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise RunFormatError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None


def load_run(path: str | pathlib.Path) -> Run:
  """Reads one run directory. Raises RunFormatError for anything that cannot be read."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise RunFormatError(f"{path}: not a directory (expected a run directory)")
  metrics_path = path / METRICS_FILE
  if not metrics_path.is_file():
    raise RunFormatError(f"{metrics_path}: missing (is {path} a run directory?)")
  metrics, warnings = read_metrics(metrics_path)
  config_path = path / CONFIG_FILE
  if config_path.is_file():
    config = read_config(config_path)
  else:
    config = {}
    warnings.append(f"{config_path}: missing; the run is named after its directory and "
                    "not grouped with other seeds")
  name = config.get("name")
  if not isinstance(name, str) or not name:
    name = path.resolve().name
  return Run(name, path, config, metrics, tuple(warnings))


def load_runs(paths: Iterable[str | pathlib.Path]) -> list[Run]:
  return [load_run(p) for p in paths]


def _replicate_key(run: Run, ignored: Sequence[str]) -> str:
  if not run.config:
    # Without a config nothing says two runs are seeds of one experiment.
    return f"path:{run.path.resolve()}"
  flat = flatten_config(run.config)
  kept = {k: v for k, v in flat.items() if k not in ignored}
  return json.dumps(kept, sort_keys=True, default=str)


def config_differences(a: dict, b: dict) -> list[str]:
  """Dotted keys whose values differ between two configs (sorted)."""
  fa, fb = flatten_config(a), flatten_config(b)
  return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<absent>") != fb.get(k, "<absent>"))


def group_replicates(runs: Sequence[Run],
                     ignored_keys: Sequence[str] = REPLICATE_IGNORED_KEYS) -> list[Group]:
  """Groups runs whose configs are equal apart from `ignored_keys`, in first-seen order.

  Groups that share a name but differ in config get a numbered suffix, "e6 [2]".
  """
  members: dict[str, list[Run]] = {}
  for run in runs:
    members.setdefault(_replicate_key(run, ignored_keys), []).append(run)
  groups, taken = [], {}
  for runs_of_group in members.values():
    base = runs_of_group[0].name
    taken[base] = taken.get(base, 0) + 1
    name = base if taken[base] == 1 else f"{base} [{taken[base]}]"
    groups.append(Group(name, tuple(runs_of_group)))
  return groups


def grouping_notes(groups: Sequence[Group]) -> list[str]:
  """Why same-named groups were kept apart, and seeds that repeat inside a group."""
  notes = []
  first_by_name: dict[str, Group] = {}
  for group in groups:
    base = group.runs[0].name
    if base in first_by_name:
      diffs = config_differences(first_by_name[base].config, group.config)
      diffs = [d for d in diffs if d not in REPLICATE_IGNORED_KEYS]
      shown = ", ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
      notes.append(f"groups {first_by_name[base].name!r} and {group.name!r} share the run "
                   f"name but their configs differ in {shown}; they are not replicates")
    else:
      first_by_name[base] = group
    seeds = [s for s in group.seeds if s is not None]
    if len(set(map(str, seeds))) < len(seeds):
      notes.append(f"group {group.name!r} repeats a seed ({seeds}); its runs are not "
                   "independent replicates")
  return notes


def align_by_step(series: Sequence[Series]) -> tuple[np.ndarray, np.ndarray]:
  """Union of steps and a (len(series), num_steps) matrix, NaN where a run has no point."""
  steps = np.unique(np.concatenate([s for s, _ in series])) if series else np.zeros(0, int)
  table = np.full((len(series), steps.size), np.nan)
  for row, (s, v) in enumerate(series):
    table[row, np.searchsorted(steps, s)] = v
  return steps, table


def value_at_or_before(series: Series, step: int) -> tuple[int, float] | None:
  """(step, value) of the last point at or before `step`; None when there is none."""
  steps, values = series
  i = int(np.searchsorted(steps, step, side="right")) - 1
  if i < 0:
    return None
  return int(steps[i]), float(values[i])
