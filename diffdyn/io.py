"""Run I/O: metric writers (CLU and metrics.jsonl), orbax checkpoints, sample grids, progress.

Nothing here computes anything about the model; it moves numbers and arrays to disk and back,
in ways that survive a process being killed at any point.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from diffdyn import tf_support
from diffdyn.errors import RunFailed
from diffdyn.errors import UserError

log = logging.getLogger("diffdyn")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TIMING_PREFIX = "time/"   # run-time measurements: not reproducible, excluded from comparisons
CORRUPT_CHECKPOINTS_DIR = "corrupt_checkpoints"

# errno values that mean "no room left": a full disk, a full quota, a file-size limit.
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How orbax/tensorstore word the same, in the message of a ValueError.
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


class DiskFull(RunFailed):
  """A write failed for lack of space; the run stopped, and can resume once space is back."""


def is_disk_full(error: BaseException) -> bool:
  if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
    return True
  return any(text in str(error) for text in _NO_SPACE_TEXT)


@contextlib.contextmanager
def reporting_disk_full(what: str) -> Iterator[None]:
  """Turns a failed write for lack of space into one DiskFull line naming `what` and the fix."""
  try:
    yield
  except Exception as e:  # orbax reports a full disk as a ValueError, Python as an OSError
    if not is_disk_full(e):
      raise
    raise DiskFull(f"disk full while {what}; free some space and run the same command to "
                   "resume from the latest checkpoint") from e


def default_cache_dir() -> str:
  return os.environ.get("DIFFDYN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "diffdyn")


def enable_compilation_cache(cache_dir: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache, so a rerun skips the compiles it has seen."""
  path = cache_dir or os.path.join(default_cache_dir(), "jax_cache")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def check_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir you "
                    "can write to") from None


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, (np.floating, float)):
    return float(value)
  if isinstance(value, (np.integer, int)):
    return int(value)
  return value


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):   # a failed write leaves no half-written file behind
      os.remove(tmp)


class JsonlWriter:
  """Appends one JSON line per write; on open, forgets everything after `resume_step`.

  A resumed run rewrites the steps after its checkpoint, so those lines (and a line cut off by
  a kill mid-write) are removed first: the file never holds a step twice.
  """

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self._truncate_after(resume_step)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      text = f.read()
    kept = []
    for line in text.splitlines(keepends=True):
      if not line.endswith("\n"):
        break  # cut off mid-write
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        break
    if len(kept) != len(text.splitlines()) or not text.endswith("\n") and text:
      with reporting_disk_full(f"rewriting {self.path} for the resume at step {step}"):
        _atomic_write_text(self.path, "".join(kept))

  def write(self, step: int, wall_time: float, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), "wall_time": round(float(wall_time), 3)}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    line = json.dumps(record, allow_nan=True) + "\n"
    # A line cut short here is dropped by the next resume, with the rest of its step.
    with reporting_disk_full(f"writing the metrics of step {step} to {self.path}"):
      with open(self.path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class LoggingWriter:
  """Stands in for CLU's writers where CLU cannot be imported (it needs TensorFlow)."""

  def write_scalars(self, step, scalars):
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
    log.info("[%d] %s", step, shown)

  def write_images(self, step, images):
    del step, images

  def flush(self):
    pass

  def close(self):
    pass


def _fmt(v) -> str:
  v = _to_python(v)
  return f"{v:.6g}" if isinstance(v, float) else str(v)


def make_clu_writer(workdir: str, tensorboard: bool = True):
  if not tensorboard:
    return LoggingWriter()
  try:
    tf_support.import_tensorflow()
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    log.warning("CLU metric writers unavailable (%s; pip install 'diffdyn[tensorboard]'): "
                "logging and metrics.jsonl only", e)
    return LoggingWriter()
  return metric_writers.create_default_writer(workdir, asynchronous=False)


class MetricWriter:
  """The run's writers: CLU (TensorBoard + logging where available) and metrics.jsonl."""

  def __init__(self, workdir: str, resume_step: int, wall_time_offset: float, *,
               tensorboard: bool = True, clu_writer=None):
    self.jsonl = JsonlWriter(os.path.join(workdir, METRICS_FILE), resume_step)
    self.clu = clu_writer if clu_writer is not None else make_clu_writer(workdir, tensorboard)
    self._start = time.monotonic()
    self._offset = wall_time_offset

  @property
  def wall_time(self) -> float:
    """Seconds of run time, summed across resumes."""
    return self._offset + time.monotonic() - self._start

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    log.debug("writing metrics at step %d: %s", step, ", ".join(scalars))
    scalars = {k: _to_python(v) for k, v in scalars.items()}
    self.jsonl.write(step, self.wall_time, scalars)
    with reporting_disk_full(f"writing the TensorBoard summaries of step {step}"):
      self.clu.write_scalars(step, {k: v for k, v in scalars.items()
                                    if isinstance(v, (int, float)) and math.isfinite(v)})

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    with reporting_disk_full(f"writing the TensorBoard images of step {step}"):
      self.clu.write_images(step, images)

  def flush(self) -> None:
    with reporting_disk_full("flushing the TensorBoard summaries"):
      self.clu.flush()

  def close(self) -> None:
    with reporting_disk_full("closing the TensorBoard summaries"):
      self.clu.close()


def image_grid(images_uint8: np.ndarray) -> np.ndarray:
  """Tiles N HWC images into one near-square image with 1-pixel gaps."""
  n, h, w, c = images_uint8.shape
  cols = int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
  for i, img in enumerate(images_uint8):
    r, col = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
  return grid


def save_png(path: str, image_uint8: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  tmp = f"{path}.tmp.{os.getpid()}.png"
  try:
    with reporting_disk_full(f"writing {path}"):
      Image.fromarray(image_uint8).save(tmp)
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_config_json(workdir: str) -> dict | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); restore it from the run's "
                    "first launch, or use another --workdir") from None


def write_config_json(workdir: str, config_dict: dict) -> None:
  path = os.path.join(workdir, CONFIG_FILE)
  with reporting_disk_full(f"writing {path}"):
    _atomic_write_text(path, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


class Checkpoints:
  """Orbax checkpoints of the train state plus a small JSON of run metadata.

  Saves are synchronous and orbax commits each by an atomic rename, so a kill leaves either
  the new checkpoint or none (plus a temporary directory, removed when the next run opens the
  checkpoints). A latest checkpoint that still fails to restore (a damaged disk, a file cut by
  a full disk) is moved aside into `corrupt_checkpoints/` with a warning, and the one before
  it is used: the resumed run then saves that step afresh.
  """

  def __init__(self, directory: str, keep: int | None = None, *, read_only: bool = False):
    """`read_only` touches no file: no temporary directory is cleaned, no damaged checkpoint
    moved aside (their failures are only recorded), and nothing can be saved."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self.restore_failures: list[tuple[int, str]] = []   # (step, why), newest first
    options = (ocp.CheckpointManagerOptions(read_only=True, create=False,
                                            enable_async_checkpointing=False) if read_only
               else ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: Mapping[str, Any]) -> None:
    ocp = self._ocp
    log.debug("saving checkpoint at step %d", step)
    with reporting_disk_full(f"saving the checkpoint of step {step} in {self.directory}"):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(dict(meta))),
                        force=True)
      self.manager.wait_until_finished()
    log.debug("saved checkpoint at step %d", step)

  def restore_latest(self, template):
    """(state, meta, step) from the newest checkpoint that restores, or None if there is none.

    `template` holds arrays or jax.ShapeDtypeStructs of the state's structure.
    """
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                          meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"]), step
      except Exception as e:  # orbax raises many types for a damaged checkpoint
        why = f"{type(e).__name__}: {_one_line(str(e))[:200]}"
        self.restore_failures.append((step, why))
        if self.read_only:
          continue
        kept_at = self._move_aside(step)
        log.warning("checkpoint at step %d in %s does not restore (%s); moved it to %s and "
                    "falling back to the one before it", step, self.directory, why, kept_at)
    return None

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step out of orbax's directory, so that step can be saved again."""
    parent = os.path.join(os.path.dirname(self.directory), CORRUPT_CHECKPOINTS_DIR)
    os.makedirs(parent, exist_ok=True)
    dest = os.path.join(parent, str(step))
    suffix = 1
    while os.path.exists(dest):
      dest = os.path.join(parent, f"{step}.{suffix}")
      suffix += 1
    shutil.move(os.path.join(self.directory, str(step)), dest)
    self.manager.reload()
    return dest

  def close(self) -> None:
    self.manager.close()


def _one_line(text: str) -> str:
  return " ".join(text.split())


class Progress:
  """Logs step, steps/s and ETA; through CLU's ReportProgress if `use_clu` and CLU imports."""

  def __init__(self, total_steps: int, every_secs: float = 30.0, use_clu: bool = True):
    self.total_steps = total_steps
    self._clu = None
    if use_clu:
      try:
        tf_support.import_tensorflow()
        from clu import periodic_actions  # pylint: disable=import-outside-toplevel
        self._clu = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                                    every_secs=every_secs)
      except ImportError:
        pass
    self._every = every_secs
    self._last = None

  def __call__(self, step: int, steps_per_sec: float) -> None:
    if self._clu is not None:
      self._clu(step, time.monotonic())
      return
    now = time.monotonic()
    if self._last is not None and now - self._last < self._every and step < self.total_steps:
      return
    self._last = now
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    log.info("step %d/%d (%.0f%%), %.1f steps/s, ETA %s", step, self.total_steps,
             100 * step / self.total_steps, steps_per_sec, _hms(eta))


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
