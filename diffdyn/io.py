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
import threading
import time
import types
from typing import Any, Iterator, Mapping

import jax
import numpy as np

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
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    log.warning("CLU metric writers unavailable (%s): logging and metrics.jsonl only", e)
    return LoggingWriter()
  return metric_writers.create_default_writer(workdir, asynchronous=False)


class MetricWriter:
  """The run's writers: CLU (TensorBoard + logging where available) and metrics.jsonl."""

  def __init__(self, workdir: str, resume_step: int, wall_time_offset: float, *,
               tensorboard: bool = True, clu_writer=None, enabled: bool = True):
    """`enabled=False` writes nothing (the processes of a multi-host run other than 0)."""
    self.enabled = enabled
    self._start = time.monotonic()
    self._offset = wall_time_offset
    if not enabled:
      return
    self.jsonl = JsonlWriter(os.path.join(workdir, METRICS_FILE), resume_step)
    self.clu = clu_writer if clu_writer is not None else make_clu_writer(workdir, tensorboard)

  @property
  def wall_time(self) -> float:
    """Seconds of run time, summed across resumes."""
    return self._offset + time.monotonic() - self._start

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    log.debug("writing metrics at step %d: %s", step, ", ".join(scalars))
    scalars = {k: _to_python(v) for k, v in scalars.items()}
    self.jsonl.write(step, self.wall_time, scalars)
    with reporting_disk_full(f"writing the TensorBoard summaries of step {step}"):
      self.clu.write_scalars(step, {k: v for k, v in scalars.items()
                                    if isinstance(v, (int, float)) and math.isfinite(v)})

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    if not self.enabled:
      return
    with reporting_disk_full(f"writing the TensorBoard images of step {step}"):
      self.clu.write_images(step, images)

  def flush(self) -> None:
    if self.enabled:
      with reporting_disk_full("flushing the TensorBoard summaries"):
        self.clu.flush()

  def close(self) -> None:
    if self.enabled:
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
  """Writes a PNG atomically (a kill leaves the old file or the new one), making its folder."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  tmp = f"{path}.tmp.{os.getpid()}.png"
  try:
    with reporting_disk_full(f"writing {path}"):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(image_uint8).save(tmp)
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes arrays as an .npz atomically, making its folder."""
  tmp = f"{path}.tmp.{os.getpid()}.npz"
  try:
    with reporting_disk_full(f"writing {path}"):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
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


class StructureMismatch(Exception):
  """A checkpoint holds a state of another structure than the one asked for: not damage."""


class CheckpointReadError(RunFailed):
  """A checkpoint could not be read for a reason that is not damage (access, a lost mount)."""


# What says a read failed for a reason outside the checkpoint's own bytes: those are reported,
# and nothing is moved. Python's errnos, and tensorstore's status words in orbax's messages.
_NOT_DAMAGE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTCONN, errno.ESTALE,
                      errno.ENODEV, errno.ETIMEDOUT, errno.EAGAIN, errno.EHOSTDOWN)
_NOT_DAMAGE_TEXT = ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED",
                    "ABORTED", "Permission denied", "Input/output error",
                    "Transport endpoint is not connected", "Stale file handle")


def is_damage(error: BaseException) -> bool:
  """Whether a failed checkpoint read means the checkpoint itself is damaged.

  Access and availability failures (permission denied, an I/O error, a vanished mount) are
  not: the same bytes may read fine once the file system is back, so they must not be acted on.
  """
  if isinstance(error, OSError) and error.errno in _NOT_DAMAGE_ERRNOS:
    return False
  return not any(text in str(error) for text in _NOT_DAMAGE_TEXT)


def tree_signature(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{"a/b/0": (shape, dtype)} of a pytree's array leaves (arrays, ShapeDtypeStructs, metadata)."""
  def name(entry) -> str:
    for attr in ("name", "key", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)

  return {"/".join(name(e) for e in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(leaf, "shape") and hasattr(leaf, "dtype")}


def describe_mismatch(stored: dict, expected: dict, limit: int = 4) -> str:
  """One line naming the leaves that differ between two `tree_signature`s."""
  def listing(paths):
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
  parts = []
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  changed = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
  if missing:
    parts.append(f"{len(missing)} leaves the checkpoint lacks ({listing(missing)})")
  if extra:
    parts.append(f"{len(extra)} leaves it has that the state does not ({listing(extra)})")
  if changed:
    shown = [f"{k} {stored[k][0]}->{expected[k][0]}" if stored[k][1] == expected[k][1]
             else f"{k} {stored[k][1]}->{expected[k][1]}" for k in changed]
    parts.append(f"{len(changed)} leaves of another shape or dtype ({listing(shown)})")
  return "; ".join(parts)


class Checkpoints:
  """Orbax checkpoints of the train state plus a small JSON of run metadata.

  Saves are synchronous and orbax commits each by an atomic rename, so a kill leaves either
  the new checkpoint or none (plus a temporary directory, removed when the next run opens the
  checkpoints for writing).

  `restore_latest` tells difference from damage. A checkpoint whose stored tree (orbax's item
  metadata) has other leaves or shapes than the requested state raises `StructureMismatch`: it
  is another run's state, and nothing may be done to it. One that fails to read for lack of
  access raises `CheckpointReadError`. Only a checkpoint whose own files fail (unparsable
  metadata, cut or missing array files) counts as damaged: it is skipped and recorded in
  `restore_failures`, and the caller moves it aside (`move_aside`) once it has decided to
  resume from an older one.
  """

  def __init__(self, directory: str, keep: int | None = None, *, read_only: bool = False):
    """`read_only` touches no file: no temporary directory is cleaned, and nothing is saved."""
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
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with _quiet_absl():
      self.manager = ocp.CheckpointManager(self.directory, item_names=tuple(handlers),
                                           item_handlers=handlers, options=options)

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

  def stored_signature(self, step: int) -> dict:
    """`tree_signature` of the state saved at `step`, from its metadata alone."""
    metadata = self.manager.item_metadata(step)["state"]
    if metadata is None:
      raise ValueError(f"no state metadata in the checkpoint of step {step}")
    return tree_signature(getattr(metadata, "tree", metadata))

  def restore_latest(self, template):
    """(state, meta, step) from the newest checkpoint that restores, or None if none does.

    `template` holds arrays or jax.ShapeDtypeStructs (with shardings) of the state's structure.
    Raises StructureMismatch or CheckpointReadError as the class docstring says.
    """
    ocp = self._ocp
    expected = tree_signature(template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in reversed(self.steps()):
      try:
        stored = self.stored_signature(step)
      except Exception as e:  # orbax raises many types for unreadable metadata
        self._failed(step, e)
        continue
      if stored != expected:
        raise StructureMismatch(f"step {step}: {describe_mismatch(stored, expected)}")
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                          meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"]), step
      except Exception as e:  # likewise for array files that are cut, garbled or missing
        self._failed(step, e)
    return None

  def _failed(self, step: int, error: Exception) -> None:
    why = f"{type(error).__name__}: {_one_line(str(error))[:200]}"
    if not is_damage(error):
      raise CheckpointReadError(f"could not read the checkpoint of step {step} in "
                                f"{self.directory} ({why}); nothing was changed: check that "
                                "the files are readable and run the same command again")
    log.debug("checkpoint at step %d does not restore: %s", step, why)
    self.restore_failures.append((step, why))

  def move_aside(self, step: int) -> str:
    """Moves a damaged step out of orbax's directory (never deletes it); returns where to."""
    if self.read_only:
      raise ValueError("a read-only Checkpoints moves nothing")
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


@contextlib.contextmanager
def _quiet_absl():
  """Orbax warns through absl about every read-only directory it opens; those are expected."""
  absl_log = logging.getLogger("absl")
  previous = absl_log.level
  absl_log.setLevel(max(previous, logging.ERROR))
  try:
    yield
  finally:
    absl_log.setLevel(previous)


def _one_line(text: str) -> str:
  return " ".join(text.split())


class Progress:
  """The run's progress lines: step, steps/s and ETA every `every_secs`, and a line naming the
  phase in progress (a compile, an evaluation, a save) whenever one runs that long.

  A context manager: inside it a daemon thread watches for silence, so a long compile or FID
  evaluation shows up in the log as what it is, not as a stalled run.
  """

  def __init__(self, total_steps: int, every_secs: float = 30.0, replicates: int = 1):
    self.total_steps = total_steps
    self._every = every_secs
    self._replicates = replicates
    self._lock = threading.Lock()
    self._last_line = time.monotonic()
    self._phase, self._phase_start = "setting up", time.monotonic()
    self._done = threading.Event()
    self._thread = None

  def __enter__(self) -> "Progress":
    self._thread = threading.Thread(target=self._watch, name="diffdyn-progress", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._done.set()
    if self._thread is not None:
      self._thread.join()

  def set_phase(self, phase: str) -> None:
    with self._lock:
      if phase != self._phase:
        self._phase, self._phase_start = phase, time.monotonic()

  def report(self, step: int, steps_per_sec: float) -> None:
    """A progress line, if `every_secs` have passed since the last line or the run is done."""
    now = time.monotonic()
    with self._lock:
      if now - self._last_line < self._every and step < self.total_steps:
        return
      self._last_line = now
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    per = f" x {self._replicates} replicates" if self._replicates > 1 else ""
    log.info("step %d/%d (%.0f%%), %.1f steps/s%s, ETA %s", step, self.total_steps,
             100 * step / self.total_steps, steps_per_sec, per, _hms(eta))

  def _watch(self) -> None:
    while not self._done.wait(min(self._every, 5.0)):
      now = time.monotonic()
      with self._lock:
        if now - self._last_line < self._every:
          continue
        self._last_line = now
        phase, since = self._phase, now - self._phase_start
      log.info("... %s (%s so far)", phase, _hms(since))


class Clock:
  """Wall time split into phases, with the compiles inside them kept apart.

  `phase(name)` times a block; `compiled(program, seconds, phase)` says that `seconds` of that
  phase went to compiling `program`. `summary()` accounts for the wall time since the clock
  started: setup, each program's compile, each phase's own time, and whatever is left over.
  """

  def __init__(self):
    self._start = time.monotonic()
    self._phases: dict[str, float] = {}
    self._compiles: dict[str, float] = {}
    self._compiles_in: dict[str, float] = {}

  @contextlib.contextmanager
  def phase(self, name: str):
    timing = types.SimpleNamespace(seconds=0.0)
    start = time.monotonic()
    try:
      yield timing
    finally:
      timing.seconds = time.monotonic() - start
      self._phases[name] = self._phases.get(name, 0.0) + timing.seconds

  def compiled(self, program: str, seconds: float, phase: str | None = None) -> None:
    if seconds <= 0:
      return
    self._compiles[program] = self._compiles.get(program, 0.0) + seconds
    phase = phase or program
    self._compiles_in[phase] = self._compiles_in.get(phase, 0.0) + seconds

  def total_compile(self) -> float:
    return sum(self._compiles.values())

  def summary(self) -> str:
    wall = time.monotonic() - self._start
    compiles = ", ".join(f"{k} {v:.1f}" for k, v in self._compiles.items())
    phases = {k: v - self._compiles_in.get(k, 0.0) for k, v in self._phases.items()}
    other = wall - self.total_compile() - sum(phases.values())
    shown = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
    return (f"{wall:.1f} s of wall time = {self.total_compile():.1f} s compiling "
            f"({compiles or 'nothing'}) + {shown} + {other:.1f} s other")


def ensure_logging() -> None:
  """Shows diffdyn's INFO lines (progress, compiles) where nothing else set logging up.

  A notebook or script that configured logging keeps its own setup; one that did not gets
  diffdyn's lines on stderr instead of Python's default of warnings only.
  """
  logger = logging.getLogger("diffdyn")
  if logger.handlers or logging.getLogger().handlers:
    return
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  logger.addHandler(handler)
  # Libraries imported later (absl, orbax) may configure the root logger; without this each
  # line would then be printed twice.
  logger.propagate = False
  if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO)


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
