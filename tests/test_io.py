"""Run I/O: metrics.jsonl checks, the workdir lock, failed writes, checkpoints, grids."""
import errno
import json
import logging
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdyn import io
from diffdyn.errors import UserError


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_jsonl_resume_drops_later_steps_and_cut_lines(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  w = io.JsonlWriter(path, resume_step=0)
  for step in (10, 20, 30):
    w.write(step, float(step), {"train/loss": step / 10, "x": np.float32(1.5)})
  with open(path, "a") as f:
    f.write('{"step": 40, "wall_ti')       # a kill in the middle of a write
  io.JsonlWriter(path, resume_step=20)
  rows = _lines(path)
  assert [r["step"] for r in rows] == [10, 20]
  assert rows[1] == {"step": 20, "wall_time": 20.0, "train/loss": 2.0, "x": 1.5}


def test_jsonl_keeps_a_clean_file_untouched(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  w = io.JsonlWriter(path, resume_step=0)
  w.write(5, 1.0, {"a": float("nan")})
  before = os.stat(path).st_mtime_ns
  io.JsonlWriter(path, resume_step=5)
  assert os.stat(path).st_mtime_ns == before
  assert np.isnan(_lines(path)[0]["a"])


def test_checkpoint_round_trip_and_fallback(tmp_path):
  ckpts = io.Checkpoints(str(tmp_path / "ckpt"), keep=3)
  state = {"w": jnp.arange(4.0), "step": jnp.array(3, jnp.int32)}
  ckpts.save(3, state, {"wall_time": 1.5})
  state2 = jax.tree.map(lambda a: a + 1, state)
  ckpts.save(4, state2, {"wall_time": 2.5})
  restored, meta, step = ckpts.restore_latest(state)
  assert step == 4 and meta == {"wall_time": 2.5}
  np.testing.assert_array_equal(restored["w"], state2["w"])
  # Damage the newest checkpoint: restore falls back to the one before it.
  for root, _, files in os.walk(tmp_path / "ckpt" / "4"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  restored, meta, step = io.Checkpoints(str(tmp_path / "ckpt"), keep=3).restore_latest(state)
  assert step == 3 and meta == {"wall_time": 1.5}
  np.testing.assert_array_equal(restored["w"], state["w"])


def test_image_grid_layout():
  imgs = np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(5)])
  grid = io.image_grid(imgs)
  # 5 images -> 3 columns x 2 rows of 4x4 tiles with 1-pixel gaps.
  assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
  assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 1 and grid[6, 1, 0] == 3
  assert grid[0, 0, 0] == 255


def _event_files(directory):
  return [name for name in os.listdir(directory) if name.startswith("events.out.tfevents")]


def test_tensorboard_switch_changes_only_the_summaries(tmp_path):
  pytest.importorskip("tensorflow")
  lines = {}
  for tensorboard in (True, False):
    workdir = tmp_path / str(tensorboard)
    workdir.mkdir()
    writer = io.MetricWriter(str(workdir), resume_step=0, wall_time_offset=0.0,
                             tensorboard=tensorboard)
    writer.write_scalars(10, {"train/loss": 0.5})
    writer.flush()
    writer.close()
    assert bool(_event_files(workdir)) == tensorboard
    with open(workdir / io.METRICS_FILE) as f:
      lines[tensorboard] = [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
                            for line in f]
  assert lines[True] == lines[False] == [{"step": 10, "train/loss": 0.5}]


# ----------------------------------------------------------------------------------------------
# metrics.jsonl: checked on resume, never silently cut.
# ----------------------------------------------------------------------------------------------


def _write_metrics(path, steps):
  """A metrics file as JsonlWriter writes it: one line per step, the train loss in each."""
  w = io.JsonlWriter(str(path), resume_step=0)
  for step in steps:
    w.write(step, float(step), {"train/loss": step / 100})
  return path.read_bytes()


def _rewrite_line(path, index, text):
  lines = path.read_bytes().split(b"\n")
  lines[index] = text
  path.write_bytes(b"\n".join(lines))


def test_check_metrics_drops_the_steps_a_resume_writes_again(tmp_path):
  path = tmp_path / io.METRICS_FILE
  original = _write_metrics(path, [10, 20, 30, 40])
  io.check_metrics(str(path), resume_step=20)
  # The first two lines of the file as written, byte for byte.
  assert path.read_bytes() == b"".join(original.splitlines(keepends=True)[:2])


@pytest.mark.parametrize("cut_at", [3, len('{"step": 3'), len('{"step": 30, "wall')])
def test_a_line_cut_by_a_kill_past_the_checkpoint_is_dropped(tmp_path, cut_at):
  path = tmp_path / io.METRICS_FILE
  original = _write_metrics(path, [10, 20, 30])
  lines = original.splitlines(keepends=True)
  path.write_bytes(b"".join(lines[:2]) + lines[2][:cut_at])   # killed while writing step 30
  io.check_metrics(str(path), resume_step=20)
  assert path.read_bytes() == b"".join(lines[:2])


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
  path = tmp_path / io.METRICS_FILE
  original = _write_metrics(path, [10, 20])
  path.write_bytes(original[:-1])
  io.check_metrics(str(path), resume_step=20)
  assert path.read_bytes() == original


DAMAGE = {
    # name: (damage done to a file of steps 10..40, resume step, words of the error)
    "garbled middle line": (lambda p: _rewrite_line(p, 1, b'{"step": 20, "train/lo#!'), 40,
                            [":2:", "does not parse"]),
    "garbled last line": (lambda p: _rewrite_line(p, 3, b"\x00\x00garbage"), 40,
                          [":4:", "does not parse"]),
    "not a record": (lambda p: _rewrite_line(p, 0, b'[1, 2]'), 40, [":1:", "integer step"]),
    "cut last line": (lambda p: p.write_bytes(p.read_bytes()[:-20]), 40,
                      [":4:", "step 40", "cut off", "checkpoint of step 40"]),
    "cut to garbage": (lambda p: p.write_bytes(p.read_bytes() + b"xyz"), 40,
                       [":5:", "cut off", "not the start"]),
    "step out of order": (lambda p: p.write_bytes(p.read_bytes() + b'{"step": 10, "x": 1}\n'), 40,
                          [":5:", "step 10 comes after step 40"]),
    "a step written twice": (lambda p: p.write_bytes(p.read_bytes()
                                                     + p.read_bytes().splitlines(True)[-1]), 40,
                             [":5:", "train/loss at step 40 is already on line 4"]),
    "missing": (os.remove, 40, ["is missing", "checkpoint at step 40"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_metrics_stop_the_resume_and_change_nothing(tmp_path, case):
  damage, resume_step, words = DAMAGE[case]
  path = tmp_path / io.METRICS_FILE
  _write_metrics(path, [10, 20, 30, 40])
  damage(path)
  before = sorted(os.listdir(tmp_path)), path.read_bytes() if path.exists() else None
  with pytest.raises(UserError) as failure:
    io.check_metrics(str(path), resume_step=resume_step)
  message = str(failure.value)
  assert "\n" not in message and "--keep_damaged_metrics" in message
  for word in words:
    assert word in message, message
  assert (sorted(os.listdir(tmp_path)), path.read_bytes() if path.exists() else None) == before
  # The writer a loop opens checks the same, and cuts nothing either.
  with pytest.raises(UserError):
    io.JsonlWriter(str(path), resume_step=resume_step)
  assert (sorted(os.listdir(tmp_path)), path.read_bytes() if path.exists() else None) == before


def test_keep_damaged_copies_the_file_aside_and_resumes_with_the_good_lines(tmp_path, caplog):
  path = tmp_path / io.METRICS_FILE
  original = _write_metrics(path, [10, 20, 30, 40])
  _rewrite_line(path, 2, b"garbage")
  damaged = path.read_bytes()
  with caplog.at_level("WARNING", logger="diffdyn"):
    io.check_metrics(str(path), resume_step=40, keep_damaged=True)
  assert (tmp_path / "metrics.jsonl.damaged").read_bytes() == damaged
  assert path.read_bytes() == b"".join(original.splitlines(keepends=True)[:2])
  assert any(":3:" in r.getMessage() and "metrics.jsonl.damaged" in r.getMessage()
             for r in caplog.records)
  # A second damage goes to a second copy: no copy is ever overwritten.
  path.write_bytes(b"garbage\n")
  io.check_metrics(str(path), resume_step=40, keep_damaged=True)
  assert (tmp_path / "metrics.jsonl.damaged").read_bytes() == damaged
  assert (tmp_path / "metrics.jsonl.damaged.2").read_bytes() == b"garbage\n"
  assert path.read_bytes() == b""


def test_a_fresh_writer_creates_the_file_so_a_missing_one_means_deleted(tmp_path):
  path = tmp_path / io.METRICS_FILE
  io.JsonlWriter(str(path), resume_step=0)
  assert path.read_bytes() == b""
  io.check_metrics(str(path), resume_step=5)   # a run checkpointed before its first log line
  io.check_metrics(str(tmp_path / "other.jsonl"), resume_step=0)   # nothing to resume


# ----------------------------------------------------------------------------------------------
# The workdir lock.
# ----------------------------------------------------------------------------------------------

_HOLD_LOCK = ("import sys\n"
              "from diffdyn import io\n"
              "with io.lock_workdir(sys.argv[1]):\n"
              "  print('locked', flush=True)\n"
              "  sys.stdin.read()\n")


def _lock_holder(workdir):
  """A process that holds `workdir`'s lock until its stdin closes; returns once it holds it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(workdir)], cwd=root,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "locked\n"
  return proc


def test_a_locked_workdir_names_its_holder_and_frees_when_it_ends(tmp_path):
  workdir = tmp_path / "run"
  holder = _lock_holder(workdir)
  try:
    with pytest.raises(UserError, match=rf"in use by process {holder.pid} on "
                                           rf"{socket.gethostname()} \(started 20") as failure:
      with io.lock_workdir(str(workdir)):
        pass
    assert "\n" not in str(failure.value) and "--workdir" in str(failure.value)
  finally:
    holder.stdin.close()
    holder.wait()
  assert holder.returncode == 0
  assert os.listdir(workdir) == []   # the lock file goes with its holder
  with io.lock_workdir(str(workdir)):
    assert os.listdir(workdir) == [io.LOCK_FILE]


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
  workdir = tmp_path / "run"
  holder = _lock_holder(workdir)
  holder.kill()   # SIGKILL: no code of the holder runs, the kernel drops its lock
  holder.wait()
  holder.stdin.close()
  assert io.LOCK_FILE in os.listdir(workdir)   # its file stays, naming a dead process
  with io.lock_workdir(str(workdir)):
    with open(workdir / io.LOCK_FILE) as f:
      assert json.load(f)["pid"] == os.getpid()


def test_one_process_cannot_lock_a_workdir_twice(tmp_path):
  with io.lock_workdir(str(tmp_path)):
    with pytest.raises(UserError, match=f"process {os.getpid()} "):
      with io.lock_workdir(str(tmp_path)):
        pass
  with io.lock_workdir(str(tmp_path)):   # released by the outer block
    pass


# ----------------------------------------------------------------------------------------------
# Failed writes: one line, no traceback, no stray files; an unusable cache is no failure.
# ----------------------------------------------------------------------------------------------

_SAVE_ON_A_FULL_DISK = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
logging.getLogger("absl").setLevel(logging.WARNING)
import numpy as np
from diffdyn import io
from diffdyn.errors import UserError
disk, routed = sys.argv[1], sys.argv[2] == "routed"
if routed:
  io.send_orbax_failures_to_debug()
try:   # 400 kB of incompressible arrays onto a 256 kB disk
  io.Checkpoints(os.path.join(disk, "checkpoints"), keep=2).save(
      1, {"w": np.random.default_rng(0).standard_normal(100_000, np.float32)}, {"wall_time": 0.0})
except io.DiskFull as e:
  sys.stderr.write(f"error: {e}\\n")
with open(os.path.join(disk, "filler"), "wb", buffering=0) as f:   # whatever room is left
  try:
    while True:
      f.write(bytes(4096))
  except OSError:
    pass
try:
  io.check_writable(disk)
except UserError as e:
  sys.stderr.write(f"error: {e}\\n")
print(sorted(name for name in os.listdir(disk) if name.startswith(".write_test")))
"""


def _run_on_small_tmpfs(script, *args):
  """Runs `python -c script MOUNT *args` on a fresh 256 kB tmpfs; (stdout, stderr)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  shell = ("mkdir -p /tmp/diffdyn_io_disk && mount -t tmpfs -o size=256k tmpfs /tmp/diffdyn_io_disk"
           " && exec \"$0\" -c \"$1\" /tmp/diffdyn_io_disk \"$2\"")
  proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell,
                         sys.executable, script, *args], cwd=root, capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu"))
  return proc.stdout, proc.stderr


def _can_mount_tmpfs():
  try:
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                          capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def test_a_save_on_a_full_disk_is_one_line_and_the_probe_leaves_nothing():
  if not _can_mount_tmpfs():
    pytest.skip("mounting a tmpfs needs user namespaces (unshare), unavailable here")
  # Without the routing, orbax's writer threads log their tracebacks: the case this guards.
  _, stderr = _run_on_small_tmpfs(_SAVE_ON_A_FULL_DISK, "plain")
  assert "Traceback" in stderr and "ERROR" in stderr, stderr[-3000:]
  stdout, stderr = _run_on_small_tmpfs(_SAVE_ON_A_FULL_DISK, "routed")
  lines = stderr.splitlines()
  assert len(lines) == 2, stderr[-3000:]
  assert lines[0].startswith("error: disk full while saving the checkpoint of step 1")
  assert lines[1].startswith("error: workdir") and "full disk" in lines[1]
  assert stdout.strip() == "[]"   # no .write_test_* file left on the full disk


def _record_raised_in(filename):
  """A log record carrying an exception whose traceback runs through `filename`."""
  try:
    code = compile("raise ValueError('RESOURCE_EXHAUSTED')", filename, "exec")
    exec(code)  # pylint: disable=exec-used
  except ValueError:
    exc_info = sys.exc_info()
  return logging.LogRecord("absl", logging.ERROR, "future.py", 1, "thread raised", None,
                           exc_info)


def test_orbax_failure_logs_show_only_at_debug_level():
  orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "future.py")
  quiet = io._OrbaxFailureToDebug()  # pylint: disable=protected-access
  logger = logging.getLogger("diffdyn")
  level = logger.level
  try:
    logger.setLevel(logging.INFO)
    assert not quiet.filter(_record_raised_in(orbax_file))
    other = _record_raised_in(os.path.join(os.sep, "site-packages", "mylib", "x.py"))
    assert quiet.filter(other) and other.levelname == "ERROR"
    logger.setLevel(logging.DEBUG)
    shown = _record_raised_in(orbax_file)
    assert quiet.filter(shown) and shown.levelname == "DEBUG"
  finally:
    logger.setLevel(level)


def test_a_failed_write_is_one_line_naming_what_and_why():
  with pytest.raises(io.WriteFailed, match=r"^could not write while saving X \(Input/output "
                                           r"error\); fix the disk"):
    with io.reporting_write_errors("saving X"):
      # How tensorstore reports an EIO from the kernel.
      raise ValueError("UNKNOWN: Error writing local file \"/d/x\": [os_error_code='5']")
  with pytest.raises(io.DiskFull, match="^disk full while saving X; free some space"):
    with io.reporting_write_errors("saving X"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  with pytest.raises(KeyError):   # not a write failure: not ours to reword
    with io.reporting_write_errors("saving X"):
      raise KeyError("x")


def test_an_unusable_cache_dir_is_a_warning(tmp_path, caplog, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  not_a_dir = tmp_path / "cache"
  not_a_dir.write_text("a file")
  with caplog.at_level("WARNING", logger="diffdyn"):
    assert io.enable_compilation_cache(str(not_a_dir / "jax_cache")) is None

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(io.tempfile, "mkstemp", read_only)   # root ignores a chmod
  with caplog.at_level("WARNING", logger="diffdyn"):
    assert io.enable_compilation_cache(str(tmp_path / "ro")) is None
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 2 and "Read-only file system" in warnings[1], warnings
  assert all("running without it" in w and "DIFFDYN_CACHE" in w for w in warnings)
  assert jax.config.jax_compilation_cache_dir == before


# ----------------------------------------------------------------------------------------------
# Config history.
# ----------------------------------------------------------------------------------------------


def _history(workdir):
  with open(os.path.join(workdir, io.CONFIG_HISTORY_FILE)) as f:
    return [json.loads(line) for line in f]


def test_config_history_keeps_every_start(tmp_path, caplog):
  io.append_config_history(str(tmp_path), {"train": {"learning_rate": 1e-4}}, 0)
  io.append_config_history(str(tmp_path), {"train": {"learning_rate": 2e-4}}, 20)
  rows = _history(tmp_path)
  assert [(r["start_step"], r["config"]["train"]["learning_rate"]) for r in rows] == [
      (0, 1e-4), (20, 2e-4)]
  assert rows[0]["started"][:2] == "20"   # an ISO date
  # A start killed while appending leaves a cut line: the next start drops it and appends.
  path = tmp_path / io.CONFIG_HISTORY_FILE
  path.write_bytes(path.read_bytes() + b'{"start_step": 40, "sta')
  with caplog.at_level("WARNING", logger="diffdyn"):
    io.append_config_history(str(tmp_path), {"train": {"learning_rate": 3e-4}}, 40)
  assert [r["start_step"] for r in _history(tmp_path)] == [0, 20, 40]
  assert any("cut off" in r.getMessage() for r in caplog.records)
