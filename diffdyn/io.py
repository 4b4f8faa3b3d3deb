"""Run I/O: the workdir lock, metric writers (CLU and metrics.jsonl), orbax checkpoints, grids.

Nothing here computes anything about the model; it moves numbers and arrays to disk and back,
in ways that survive a process being killed at any point.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import traceback
import types
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from diffdyn import tf_support
from diffdyn.errors import RunFailed
from diffdyn.errors import UserError

log = logging.getLogger("diffdyn")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = ".lock"
TIMING_PREFIX = "time/"   # run-time measurements: not reproducible, excluded from comparisons
CORRUPT_CHECKPOINTS_DIR = "corrupt_checkpoints"

# errno values that mean "no room left": a full disk, a full quota, a file-size limit.
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How orbax/tensorstore word the same, in the message of a ValueError.
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")
# How tensorstore tags any failed file operation in the message of a ValueError.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


class WriteFailed(RunFailed):
  """A write failed (an I/O error, a read-only disk); the run stopped and can resume."""


class DiskFull(WriteFailed):
  """A write failed for lack of space; the run stopped, and can resume once space is back."""


def is_disk_full(error: BaseException) -> bool:
  if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
    return True
  return any(text in str(error) for text in _NO_SPACE_TEXT)


def _write_error_reason(error: BaseException) -> str | None:
  """strerror of a failed file operation (Python's or tensorstore's), None for other errors."""
  if isinstance(error, OSError):
    return error.strerror or type(error).__name__
  match = _TENSORSTORE_ERRNO.search(str(error))
  return os.strerror(int(match.group(1))) if match else None


@contextlib.contextmanager
def reporting_write_errors(what: str) -> Iterator[None]:
  """Turns a failed write into one line naming `what` and the fix: DiskFull or WriteFailed."""
  try:
    yield
  except Exception as e:  # orbax reports a failed write as a ValueError, Python as an OSError
    if is_disk_full(e):
      raise DiskFull(f"disk full while {what}; free some space and run the same command to "
                     "resume from the latest checkpoint") from e
    reason = _write_error_reason(e)
    if reason is None:
      raise
    raise WriteFailed(f"could not write while {what} ({reason}); fix the disk or its "
                      "permissions, then run the same command to resume from the latest "
                      "checkpoint") from e


class _OrbaxFailureToDebug(logging.Filter):
  """Turns orbax's logged tracebacks into DEBUG records, shown only at diffdyn's debug level.

  When a save fails, orbax logs the exception of each of its writer threads with a traceback
  (and asyncio logs the tasks orbax left unawaited) before the same exception reaches our save
  call, which reports it as one line. The records are detail of that line, not news.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if not _raised_in_orbax(record):
      return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return log.isEnabledFor(logging.DEBUG)


_ORBAX_FAILURE_FILTER = _OrbaxFailureToDebug()
_ORBAX_PATH_PART = f"{os.sep}orbax{os.sep}"


def _raised_in_orbax(record: logging.LogRecord) -> bool:
  if not record.exc_info or record.exc_info[2] is None:
    return False
  return any(_ORBAX_PATH_PART in frame.filename
             for frame in traceback.extract_tb(record.exc_info[2]))


def send_orbax_failures_to_debug() -> None:
  """Installs the filter on the loggers orbax (absl) and its event loops (asyncio) write to."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _ORBAX_FAILURE_FILTER not in logger.filters:
      logger.addFilter(_ORBAX_FAILURE_FILTER)


def default_cache_dir() -> str:
  return os.environ.get("DIFFDYN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "diffdyn")


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache, so a rerun skips the compiles it has seen.

  Returns its directory, or None (with a warning) when that cannot be written: the run then
  compiles everything afresh, but runs.
  """
  path = cache_dir or os.path.join(default_cache_dir(), "jax_cache")
  try:
    os.makedirs(path, exist_ok=True)
    _probe_write(path)
  except OSError as e:
    log.warning("compilation cache %s is unusable (%s); running without it, so every start "
                "compiles afresh: set DIFFDYN_CACHE to a writable directory", path,
                e.strerror or type(e).__name__)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  # JAX's default keeps only programs that took a second or more: a run's samplers and the
  # Inception network (a few tenths each) would compile again at every start and resume.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def _probe_write(directory: str) -> None:
  """Writes and removes a small file in `directory`; raises OSError where that fails."""
  fd, probe = tempfile.mkstemp(prefix=f".write_test_{os.getpid()}_", dir=directory)
  try:
    os.write(fd, b"ok")
    os.fsync(fd)
  finally:   # on a full disk the file exists but its bytes do not: it goes either way
    os.close(fd)
    os.remove(probe)


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and checks that a file can be written in it."""
  try:
    os.makedirs(workdir, exist_ok=True)
    _probe_write(workdir)
  except OSError as e:
    if is_disk_full(e):
      raise UserError(f"workdir {workdir!r} is on a full disk ({e.strerror}); free some space, "
                      "or pass a --workdir on another disk") from None
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir you "
                    "can write to") from None


@contextlib.contextmanager
def lock_workdir(workdir: str) -> Iterator[None]:
  """Holds `workdir` for one run for the block; another holder makes it raise UserError.

  The lock is an flock on `workdir/.lock`, which the kernel releases when the process ends,
  however it ends: a killed run leaves no lock behind that could block the next. The file
  names the holder (pid, host, start time) for the message another launch shows, and is
  removed when the block exits. Creates `workdir` if needed.
  """
  check_writable(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  fd = _acquire_lock(path, workdir)
  try:
    yield
  finally:
    # Removed while still locked: whoever opened it meanwhile sees it gone and retries.
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    os.close(fd)


def _acquire_lock(path: str, workdir: str) -> int:
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise UserError(f"workdir {workdir!r} is in use by {holder}; wait for that run to end "
                      "(or stop it), or pass another --workdir") from None
    except OSError as e:
      os.close(fd)
      raise UserError(f"workdir {workdir!r} cannot be locked ({e.strerror}): its filesystem "
                      "does not support file locks; pass a --workdir on a local disk") from None
    # The previous holder removes the file before it unlocks it: a lock won on a removed
    # file guards nothing, so take the one now at `path` instead.
    try:
      same_file = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same_file = False
    if same_file:
      break
    os.close(fd)
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
  try:
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode())
  except OSError:   # a full disk: the lock holds all the same, only its message is vaguer
    pass
  return fd


def _read_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0))
    return f"process {holder['pid']} on {holder['host']} (started {holder['started']})"
  except (OSError, ValueError, KeyError, TypeError):   # locked, but not yet written
    return "another process that is starting up"


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


# How every line JsonlWriter writes starts; a line cut off by a kill is a prefix of one.
_STEP_PREFIX = '{"step": '
_CUT_STEP = re.compile(r'\{"step": (\d+)[,}]')


def check_metrics(path: str, resume_step: int, *, keep_damaged: bool = False) -> None:
  """Readies metrics.jsonl for a run that resumes at `resume_step` (0: starts afresh), or refuses.

  Call it for each run directory before anything is written there. The file is an append-only
  record of complete lines, one per write, in order of step. Lines past `resume_step` are
  dropped (the resumed run writes them again), and so is a last line cut off mid-write whose
  step is past it or unreadable: a kill or a full disk cuts only the line being written, and
  the line being written is always past the latest checkpoint, since a step's lines are all
  written before that step is checkpointed.

  Everything else is damage, and raises UserError naming the file and line, changing nothing:
  a complete line that is not a JSON object with an integer step, a step lower than the one
  before it, a key written twice at one step (two runs writing the file at once), a cut last
  line at or before `resume_step` (the file lost data it had once), or a missing file when the
  run resumes from a checkpoint. With `keep_damaged`, the file is copied aside instead (never
  deleted) and the run goes on with the lines before the damage.
  """
  if not os.path.exists(path):
    if resume_step > 0:
      _refuse_or_keep(path, f"{path} is missing, but the run resumes from its checkpoint at "
                      f"step {resume_step}: the metrics of steps 1-{resume_step} are gone",
                      [], keep_damaged)
    return
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  cut = lines.pop()   # b"" when the file ends with a newline, as it does after a whole write
  # A whole record without its newline lost nothing (an editor may strip it): a line like any.
  newline_missing = bool(cut) and _parse_metrics_line(cut)[0] is None
  if newline_missing:
    lines.append(cut)
    cut = b""
  kept, dropped = [], 0
  last_step, seen = -1, {}   # seen: (step, key) -> the number of the line that holds it
  for number, raw in enumerate(lines, 1):
    problem, record = _parse_metrics_line(raw)
    if problem is None:
      problem = _out_of_order(record, last_step, seen)
    if problem is not None:
      _refuse_or_keep(path, f"{path}:{number}: {problem}", kept, keep_damaged)
      return
    last_step = record["step"]
    seen.update({(last_step, key): number for key in record})
    if last_step <= resume_step:
      kept.append(raw + b"\n")
    else:
      dropped += 1
  if cut:
    problem = _cut_line_problem(cut, resume_step, last_step)
    if problem is not None:
      _refuse_or_keep(path, f"{path}:{len(lines) + 1}: {problem}", kept, keep_damaged)
      return
  if dropped or cut:
    log.info("%s: dropped %d line(s) past step %d%s; the resumed run writes them again", path,
             dropped, resume_step, " and a line cut off mid-write" if cut else "")
  if dropped or cut or newline_missing:
    with reporting_write_errors(f"rewriting {path} for the resume at step {resume_step}"):
      _atomic_write_text(path, b"".join(kept).decode())


def _parse_metrics_line(raw: bytes) -> tuple[str | None, dict | None]:
  """(None, record), or (what is wrong, None)."""
  try:
    record = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    return "the line is not UTF-8 text", None
  except json.JSONDecodeError as e:
    return f"the line does not parse as JSON ({e.msg} at column {e.colno})", None
  step = record.get("step") if isinstance(record, dict) else None
  if not isinstance(step, int) or isinstance(step, bool):
    return "the line is not a metrics record (a JSON object with an integer step)", None
  return None, record


def _out_of_order(record: dict, last_step: int, seen: dict) -> str | None:
  step = record["step"]
  if step < last_step:
    return f"step {step} comes after step {last_step}"
  for key in record:
    if key not in ("step", "wall_time") and (step, key) in seen:
      return f"{key} at step {step} is already on line {seen[step, key]}"
  return None


def _cut_line_problem(cut: bytes, resume_step: int, last_step: int) -> str | None:
  """None if a last line cut off mid-write is what a kill leaves, else what is wrong with it."""
  text = cut.decode("utf-8", "replace")
  if _STEP_PREFIX.startswith(text) or re.fullmatch(r'\{"step": \d+', text):
    return None   # cut before its step is complete: it holds no value yet
  match = _CUT_STEP.match(text)
  if match is None:
    return "the last line is cut off, and is not the start of a metrics line"
  step = int(match.group(1))
  if step < last_step:
    return f"the last line is cut off, and its step {step} comes after step {last_step}"
  if step <= resume_step:
    return (f"the last line, of step {step}, is cut off, though the checkpoint of step "
            f"{resume_step} was saved after it was written: the file has lost data")
  return None


def _refuse_or_keep(path: str, problem: str, good_lines: list[bytes],
                    keep_damaged: bool) -> None:
  aside = _free_name(f"{path}.damaged")
  existed = os.path.exists(path)
  if not keep_damaged:
    allowed = (f"copy it aside to {aside} and resume with its first {len(good_lines)} line(s)"
               if existed else "resume without them")
    raise UserError(f"{problem}; nothing was changed: restore {os.path.basename(path)} from a "
                    f"backup, or pass --keep_damaged_metrics to {allowed}")
  with reporting_write_errors(f"setting the damaged {path} aside"):
    if existed:
      shutil.copy2(path, aside)
    _atomic_write_text(path, b"".join(good_lines).decode())
  log.warning("%s; %s, and the run goes on with its first %d line(s)", problem,
              f"the damaged file is copied to {aside}" if existed else "nothing to copy aside",
              len(good_lines))


def _free_name(path: str) -> str:
  """`path`, or `path.N` for the lowest N >= 2 that does not exist."""
  candidate, n = path, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.{n}"
  return candidate


class JsonlWriter:
  """Appends one JSON line per write to a file that `check_metrics` has readied.

  It removes nothing: opening it checks the file as `check_metrics` does (strictly, so damage
  stops the run) and creates it when missing, so that a file missing later, from a run with
  checkpoints, shows it was deleted.
  """

  def __init__(self, path: str, resume_step: int):
    self.path = path
    check_metrics(path, resume_step)
    with reporting_write_errors(f"creating {path}"):
      with open(path, "a"):
        pass

  def write(self, step: int, wall_time: float, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), "wall_time": round(float(wall_time), 3)}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    line = json.dumps(record, allow_nan=True) + "\n"
    # A line cut short here is past the latest checkpoint: the next resume drops it.
    with reporting_write_errors(f"writing the metrics of step {step} to {self.path}"):
      with open(self.path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# Keys too many or too fine for a log line (they stay in metrics.jsonl and TensorBoard).
_NOT_LOGGED = ("time/", "/probe/", "hutch_trace_probe/", "/block/", "loss_tbin/", "param_norm/")


class LoggingWriter:
  """Stands in for CLU's writers without TensorBoard: the headline scalars as log lines."""

  def write_scalars(self, step, scalars):
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in scalars.items()
                      if not any(part in k for part in _NOT_LOGGED))
    if shown:
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
    with reporting_write_errors(f"writing the TensorBoard summaries of step {step}"):
      self.clu.write_scalars(step, {k: v for k, v in scalars.items()
                                    if isinstance(v, (int, float)) and math.isfinite(v)})

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    if not self.enabled:
      return
    with reporting_write_errors(f"writing the TensorBoard images of step {step}"):
      self.clu.write_images(step, images)

  def flush(self) -> None:
    if self.enabled:
      with reporting_write_errors("flushing the TensorBoard summaries"):
        self.clu.flush()

  def close(self) -> None:
    if self.enabled:
      with reporting_write_errors("closing the TensorBoard summaries"):
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
    with reporting_write_errors(f"writing {path}"):
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
    with reporting_write_errors(f"writing {path}"):
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
  with reporting_write_errors(f"writing {path}"):
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
def append_config_history(workdir: str, config_dict: dict, start_step: int) -> None:
  """Appends the config a run starts (or resumes) with, and that step, to config_history.jsonl.

  config.json holds the latest config only; this file keeps every start's, one JSON line
  {"start_step", "started", "config"} each, so that steps trained under an earlier config stay
  attributable after --allow_config_change. A last line cut off by a kill during an earlier
  start is dropped first, with a warning: that start wrote nothing else.
  """
  path = os.path.join(workdir, CONFIG_HISTORY_FILE)
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  line = json.dumps({"start_step": int(start_step), "started": started,
                     "config": config_dict}) + "\n"
  with reporting_write_errors(f"writing {path}"):
    if os.path.exists(path):
      with open(path, "rb") as f:
        text = f.read()
      if text and not text.endswith(b"\n"):
        whole = text[:text.rfind(b"\n") + 1]
        log.warning("%s: dropped its last line, cut off %d bytes in (a start killed while "
                    "writing it)", path, len(text) - len(whole))
        _atomic_write_text(path, whole.decode())
    with open(path, "a") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())


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
    with quiet_absl():
      self.manager = ocp.CheckpointManager(self.directory, item_names=tuple(handlers),
                                           item_handlers=handlers, options=options)

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: Mapping[str, Any]) -> None:
    ocp = self._ocp
    log.debug("saving checkpoint at step %d", step)
    with reporting_write_errors(f"saving the checkpoint of step {step} in {self.directory}"):
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
    expected = tree_signature(template)
    for step in reversed(self.steps()):
      try:
        stored = self.stored_signature(step)
      except Exception as e:  # orbax raises many types for unreadable metadata
        self._failed(step, e)
        continue
      if stored != expected:
        raise StructureMismatch(f"step {step}: {describe_mismatch(stored, expected)}")
      try:
        return (*self.restore(step, template), step)
      except Exception as e:  # likewise for array files that are cut, garbled or missing
        self._failed(step, e)
    return None

  def restore(self, step: int, template):
    """(state, meta) of the checkpoint at `step`, into `template`'s structure; raises if not."""
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

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
def quiet_absl():
  """Orbax's warnings through absl off: it warns of every read-only directory it opens."""
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
    self.replicates = replicates   # a sweep's lines say how many runs each step is
    self._every = every_secs
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
    per = f" x {self.replicates} replicates" if self.replicates > 1 else ""
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
