"""The fault suite: kills, preemption, non-finite losses, damaged checkpoints, full disks, bad input.

Each fault is checked against an uninterrupted run of the same config, exactly: every step is a
pure function of (seed, step) and the restored state, orbax restores arrays bitwise, and every
launch runs the same compiled programs on the same inputs. Only `wall_time` and the `time/` keys
(measurements of the run itself: timings, compile seconds) are left out of the comparisons.

The tests share an in-process run without curvature (`cheap_reference`); the kill test, with its
launched reference run, is in tests/test_kill.py, so that a pytest-xdist worker runs it beside
this file.
"""
import dataclasses
import errno
import json
import math
import os
import queue
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT
from conftest import assert_one_line_error
from conftest import one_error_line
from conftest import run_launch
from conftest import snapshot
from conftest import tiny_config
from conftest import tiny_flags
from diffdyn import io
from diffdyn import sweep
from diffdyn import train
from diffdyn.fid import weights as fid_weights

# The suite's tiny run (conftest.TINY): every launch traces and loads each program anew, which a
# small network makes cheap. No fault path depends on the network's shape, and the metrics of
# record are metrics.jsonl's.
SMOKE = tiny_flags()
LAUNCH_TIMEOUT = 600


# ----------------------------------------------------------------------------------------------
# Reading runs.
# ----------------------------------------------------------------------------------------------


def metric_lines(workdir):
  """metrics.jsonl as a list of dicts, in file order, without `wall_time` and `time/` keys.

  Fails on a cut-off or unparsable line and on a key written twice at one step. NaN becomes
  the string "NaN", so that two files with NaN in the same places compare equal.
  """
  with open(os.path.join(workdir, io.METRICS_FILE)) as f:
    text = f.read()
  assert text.endswith("\n"), f"the last line is cut off: {text[-200:]!r}"
  rows, seen = [], set()
  for line in text.splitlines():
    record = json.loads(line)
    step = record.pop("step")
    record.pop("wall_time")
    row = {"step": step}
    for key, value in record.items():
      assert (step, key) not in seen, f"{key} written twice at step {step}"
      seen.add((step, key))
      if not key.startswith(io.TIMING_PREFIX):
        row[key] = "NaN" if isinstance(value, float) and math.isnan(value) else value
    rows.append(row)
  return rows


def checkpoint_steps(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(name) for name in names if name.isdigit())


def checkpoint_arrays(workdir, step):
  """{leaf path: numpy array} of a saved train state, read by orbax without our code."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  tree = ocp.StandardCheckpointer().restore(path)
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_checkpoint(workdir, reference, step):
  got, want = checkpoint_arrays(workdir, step), checkpoint_arrays(reference, step)
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key


def assert_same_run(workdir, reference):
  """Same metric lines in the same order, and the same final checkpoint, bit for bit."""
  assert metric_lines(workdir) == metric_lines(reference)
  final = checkpoint_steps(reference)[-1]
  assert checkpoint_steps(workdir)[-1] == final
  assert_same_checkpoint(workdir, reference, final)


def copy_run(source, tmp_path, name="run"):
  dest = str(tmp_path / name)
  shutil.copytree(source, dest)
  return dest


# ----------------------------------------------------------------------------------------------
# Launching and interrupting runs.
# ----------------------------------------------------------------------------------------------


def child_env(cache):
  # One BLAS thread: FID's 2048 x 2048 eigendecompositions run ten times slower on a 2-core
  # box when BLAS threads contend with XLA's.
  return dict(os.environ, DIFFDYN_CACHE=cache, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
              OPENBLAS_NUM_THREADS="1")


@dataclasses.dataclass(frozen=True)
class Interruption:
  """Where a launch is interrupted: `max_delay` seconds at most after a sign of a phase.

  The sign is a stderr line matching `line` (the run's debug log names each phase as it
  starts), or the file `appears` (relative to the workdir) being written anew.
  """
  phase: str
  line: str = ""
  appears: str = ""
  max_delay: float = 0.0
  signal: int = signal.SIGKILL


def _stderr_lines(proc):
  lines = queue.Queue()

  def pump():
    for line in proc.stderr:
      lines.put(line)
    lines.put(None)

  threading.Thread(target=pump, daemon=True).start()
  return lines


def _file_stamp(path):
  return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def launch_and_interrupt(args, cache, workdir, interruption, rng):
  """Launches, waits for the interruption's sign, signals after a random delay; (rc, stderr)."""
  watched = os.path.join(workdir, interruption.appears) if interruption.appears else None
  stamp = _file_stamp(watched) if watched else None
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                          env=child_env(cache), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  lines, seen, deadline = _stderr_lines(proc), [], time.monotonic() + LAUNCH_TIMEOUT
  try:
    while True:
      assert time.monotonic() < deadline, f"no sign of {interruption.phase}"
      try:
        line = lines.get(timeout=0.02)
      except queue.Empty:
        line = ""
      if line is None:
        pytest.fail(f"the run ended (rc {proc.wait()}) before {interruption.phase}:\n"
                    + "".join(seen[-30:]))
      seen.append(line)
      if (interruption.line and re.search(interruption.line, line)
          or watched and _file_stamp(watched) != stamp):
        break
    time.sleep(rng.uniform(0.0, interruption.max_delay))
    proc.send_signal(interruption.signal)
    rc = proc.wait(timeout=LAUNCH_TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  while (line := lines.get()) is not None:
    seen.append(line)
  return rc, "".join(seen)


def launch(args, cache):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                        env=child_env(cache), capture_output=True, text=True,
                        timeout=LAUNCH_TIMEOUT)
  return proc.returncode, proc.stderr


# Seeds the random delay before each signal.
KILL_SEED = 7


@pytest.mark.slow
def test_ctrl_c_checkpoints_exits_130_and_the_same_command_finishes_the_run(
    cheap_reference, tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  args = [*SMOKE, *CHEAP_ARGS, "--log_level=debug", f"--workdir={workdir}"]
  rc, stderr = launch_and_interrupt(
      args, cache_dir, workdir,
      Interruption("Ctrl-C", line=r"training steps 0 to 10", max_delay=0.2,
                   signal=signal.SIGINT), random.Random(KILL_SEED))
  assert rc == 130, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  line = one_error_line(stderr, prefix="interrupted:")
  assert "Ctrl-C at step 10 of 40" in line and "run the same command" in line, line
  assert checkpoint_steps(workdir) == [10]
  rc, stderr = launch(args, cache_dir)
  assert rc == 0, stderr[-3000:]
  assert_same_run(workdir, cheap_reference)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    cheap_reference, tmp_path, cache_dir):
  workdir = copy_run(cheap_reference, tmp_path)
  poison_latest_checkpoint(workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  before = snapshot(checkpoints), metric_lines(workdir)
  rc, stderr = launch([*SMOKE, *CHEAP_ARGS, "--config.train.total_steps=50",
                       f"--workdir={workdir}"], cache_dir)
  assert rc == 3, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert re.search(r"non-finite loss at step 41\b", errors[0]), errors[0]
  # Nothing of the failed chunk was saved or written.
  assert (snapshot(checkpoints), metric_lines(workdir)) == before


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, no traceback, and an existing run left exactly as it was.
# ----------------------------------------------------------------------------------------------


def _config_case(*overrides, words):
  return list(overrides), words


CONFIG_CASES = {
    "unknown key": _config_case("--config.train.lr=0.1", words=["lr"]),
    "unknown section": _config_case("--config.optim.lr=0.1", words=["optim"]),
    "wrong type": _config_case("--config.train.batch_size=four", words=["batch_size"]),
    "negative steps": _config_case("--config.train.total_steps=-10",
                                   words=["train.total_steps", "> 0"]),
    "batch 0": _config_case("--config.train.batch_size=0", words=["train.batch_size"]),
    "unknown weighting": _config_case("--config.loss.weighting=snr",
                                      words=["loss.weighting", "'minsnr'"]),
    "gamma 0": _config_case("--config.loss.minsnr_gamma=0", words=["loss.minsnr_gamma", "> 0"]),
    "ema 1": _config_case("--config.train.ema_decay=1.0", words=["train.ema_decay", "[0, 1)"]),
    "nan learning rate": _config_case("--config.train.learning_rate=nan",
                                      words=["train.learning_rate", "finite"]),
    "unknown schedule": _config_case("--config.diffusion.schedule=quadratic",
                                     words=["diffusion.schedule", "'cosine'"]),
    "beta order": _config_case("--config.diffusion.beta_start=0.3",
                               words=["beta_start", "beta_end"]),
    "fp16": _config_case("--config.train.precision=fp16", words=["train.precision", "'bf16'"]),
    "unknown sampler": _config_case("--config.eval.sampler=euler",
                                    words=["eval.sampler", "'ddim'"]),
    "nfe above T": _config_case("--config.eval.nfe=1000", words=["eval.nfe", "num_timesteps"]),
    "one probe": _config_case("--config.curvature.num_probes=1",
                              words=["curvature.num_probes", ">= 2"]),
    "one checkpoint kept": _config_case("--config.train.keep_checkpoints=1",
                                        words=["train.keep_checkpoints", ">= 2"]),
    "image size mismatch": _config_case("--config.model.image_size=32",
                                        words=["model.image_size", "data.image_size"]),
    "dropout 1.5": _config_case("--config.model.dropout=1.5", words=["model.dropout"]),
}


def _bad_npz(folder):
  path = os.path.join(folder, "cifar.npz")
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 this is not a zip archive")
  return path


def _wrong_weights(folder):
  path = os.path.join(folder, fid_weights.WEIGHTS_FILENAME)
  with open(path, "wb") as f:
    f.write(b"not the Inception weights")
  return path


# name: (overrides given a scratch folder, words the error line must contain)
FILE_CASES = {
    "missing data file": (lambda d: ["--config.data.name=npz",
                                     "--config.data.path=/nonexistent/cifar.npz"],
                          ["data.path", "does not exist"]),
    "corrupt data file": (lambda d: ["--config.data.name=npz",
                                     f"--config.data.path={_bad_npz(d)}"],
                          ["cifar.npz", "not a readable .npz"]),
    "missing inception weights": (lambda d: ["--config.fid.enabled=True",
                                             "--config.fid.inception_weights=/nonexistent.npz"],
                                  ["/nonexistent.npz", "does not exist"]),
    "wrong-hash inception weights": (lambda d: ["--config.fid.enabled=True",
                                                f"--config.fid.inception_weights="
                                                f"{_wrong_weights(d)}"],
                                     ["sha256", "6726825d"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES) + sorted(FILE_CASES))
def test_bad_input_is_one_line_and_leaves_an_existing_run_alone(case, cheap_reference, tmp_path,
                                                                launch_main, capsys):
  workdir = copy_run(cheap_reference, tmp_path)
  if case in CONFIG_CASES:
    overrides, words = CONFIG_CASES[case]
  else:
    make_overrides, words = FILE_CASES[case]
    overrides = make_overrides(str(tmp_path))
  before = snapshot(workdir)
  # --allow_config_change takes the run past the config-change check to the input's own.
  status = launch_main(*SMOKE, f"--workdir={workdir}", "--allow_config_change", *overrides)
  assert status == 2
  line = one_error_line(capsys.readouterr().err)
  for word in words:
    assert word in line, line
  assert snapshot(workdir) == before


@pytest.mark.parametrize("case", ["missing file", "no get_config", "syntax error"])
def test_bad_config_file_is_one_line_and_leaves_an_existing_run_alone(case, cheap_reference,
                                                                      tmp_path, launch_main,
                                                                      capsys):
  workdir = copy_run(cheap_reference, tmp_path)
  bad = tmp_path / "experiment.py"
  words = ["experiment.py"]
  if case == "no get_config":
    bad.write_text("x = 1\n")
    words.append("get_config")
  elif case == "syntax error":
    bad.write_text("def get_config(:\n")
  before = snapshot(workdir)
  assert launch_main("--config", str(bad), f"--workdir={workdir}") == 2
  line = one_error_line(capsys.readouterr().err)
  for word in words:
    assert word in line, line
  assert snapshot(workdir) == before


def test_unwritable_workdir_is_one_line(tmp_path, cache_dir):
  if os.geteuid() == 0:
    target = "/proc/diffdyn_run"   # root may write anywhere else
  else:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    target = str(locked / "run")
  proc = run_launch([*SMOKE, f"--workdir={target}"], cache_dir)
  assert_one_line_error(proc, "not writable", "--workdir")
  assert not os.path.exists(target)


def test_resuming_with_another_config_is_refused_and_names_the_keys(cheap_reference, tmp_path,
                                                                   launch_main, capsys):
  workdir = copy_run(cheap_reference, tmp_path)
  before = snapshot(workdir)
  assert launch_main(*SMOKE, *CHEAP_ARGS, f"--workdir={workdir}",
                     "--config.loss.weighting=minsnr", "--config.train.ema_decay=0.99") == 2
  line = one_error_line(capsys.readouterr().err)
  for word in ("loss.weighting: 'constant' -> 'minsnr'", "train.ema_decay: 0.999 -> 0.99",
               "--allow_config_change"):
    assert word in line, line
  assert snapshot(workdir) == before


# ----------------------------------------------------------------------------------------------
# In-process faults, on a smoke run without curvature and FID.
# ----------------------------------------------------------------------------------------------

CHEAP_ARGS = ["--config.curvature.enabled=False"]


def cheap_config(**train_overrides):
  return tiny_config(**{"curvature.enabled": False,
                        **{f"train.{k}": v for k, v in train_overrides.items()}})


@pytest.fixture(scope="module")
def cheap_reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cheap") / "run")
  train.train_and_evaluate(cheap_config(), workdir)
  assert checkpoint_steps(workdir) == [20, 40]
  return workdir


def poison_latest_checkpoint(workdir):
  """Rewrites the latest checkpoint with parameters scaled by 1e30, as a diverging run has.

  The values are finite, so the checkpoint restores; the next forward pass overflows.
  """
  config = cheap_config()
  template = train.build_program(config, sweep.get_replicas(config, workdir)).abstract_state()
  ckpts = io.Checkpoints(os.path.join(workdir, "checkpoints"), keep=3)
  state, meta, step = ckpts.restore_latest(template)
  diverged = state.replace(params=jax.tree.map(lambda p: p * 1e30, state.params))
  ckpts.manager.delete(step)
  ckpts.save(step, diverged, meta)
  ckpts.close()


@pytest.mark.slow  # ten more steps on a copied run
def test_skipped_nonfinite_updates_are_counted(cheap_reference, tmp_path):
  workdir = copy_run(cheap_reference, tmp_path)
  # Step 41 takes a finite but enormous Adam step; every forward pass after it overflows.
  config = cheap_config(total_steps=50, learning_rate=1e30, skip_nonfinite_updates=True)
  final = train.train_and_evaluate(config, workdir, allow_config_change=True)
  assert final["step"] == 50
  assert final["train/nonfinite_skipped"] == 9
  # The mean is over the one kept step, not diluted by the skipped ones.
  assert np.isfinite(final["train/loss"])
  assert all(np.isfinite(a).all() for a in checkpoint_arrays(workdir, 50).values())


class FullDisk:
  """A fake filesystem layer: `open` for diffdyn.io whose files fail some writes with ENOSPC.

  A write that `fails(path, data)` puts half its bytes on disk first, as a full disk does.
  """

  def __init__(self, fails):
    self.fails = fails

  def open(self, path, mode="r", *args, **kwargs):
    f = open(path, mode, *args, **kwargs)  # pylint: disable=unspecified-encoding
    if "r" in mode:
      return f
    return _FailingFile(f, path, self.fails)


class _FailingFile:

  def __init__(self, f, path, fails):
    self._f, self._path, self._fails = f, path, fails

  def write(self, data):
    if self._fails(self._path, data):
      self._f.write(data[:len(data) // 2])
      self._f.flush()
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
    return self._f.write(data)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def test_disk_full_during_a_metrics_write(cheap_reference, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  disk = FullDisk(lambda path, data: path.endswith(io.METRICS_FILE) and '"step": 30' in data)
  monkeypatch.setattr(io, "open", disk.open, raising=False)
  with pytest.raises(io.DiskFull) as failure:
    train.train_and_evaluate(cheap_config(), workdir)
  message = str(failure.value)
  assert "\n" not in message
  assert "disk full while writing the metrics of step 30" in message
  assert "run the same command" in message
  with open(os.path.join(workdir, io.METRICS_FILE)) as f:
    assert not f.read().endswith("\n")   # the line of step 30 is cut off
  assert checkpoint_steps(workdir) == [20]
  monkeypatch.undo()   # space is back
  train.train_and_evaluate(cheap_config(), workdir)
  assert_same_run(workdir, cheap_reference)


def test_disk_full_during_a_checkpoint_save(cheap_reference, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  real_save = ocp.CheckpointManager.save

  def save_on_a_full_disk(manager, step, *args, **kwargs):
    if step != 40:
      return real_save(manager, step, *args, **kwargs)
    # What orbax leaves and raises when tensorstore meets a full disk (seen on a small tmpfs).
    partial = os.path.join(str(manager.directory), f"{step}.orbax-checkpoint-tmp", "state")
    os.makedirs(partial)
    with open(os.path.join(partial, "_sharding"), "w") as f:
      f.write("{")
    raise ValueError(f"RESOURCE_EXHAUSTED: Error writing in OCDBT database at {partial}: "
                     "Failed to write 311338 bytes: No space left on device "
                     "[os_error_code='28']")

  monkeypatch.setattr(ocp.CheckpointManager, "save", save_on_a_full_disk)
  with pytest.raises(io.DiskFull, match=r"disk full while saving the checkpoint of step 40"):
    train.train_and_evaluate(cheap_config(), workdir)
  assert checkpoint_steps(workdir) == [20]
  assert "40.orbax-checkpoint-tmp" in os.listdir(os.path.join(workdir, "checkpoints"))
  monkeypatch.undo()   # space is back
  train.train_and_evaluate(cheap_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]
  assert_same_run(workdir, cheap_reference)


def _garble(path):
  with open(path, "wb") as f:
    f.write(b"\0garbage")


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["garbled", "partial"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, cheap_reference, tmp_path,
                                                              caplog):
  workdir = copy_run(cheap_reference, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "40")
  files = sorted(os.path.join(root, name) for root, _, names in os.walk(latest)
                 for name in names)
  if damage == "garbled":
    for path in files:
      _garble(path)
  else:   # the array data cut short, and one file gone, as an interrupted copy leaves it
    for path in files:
      if os.sep + "d" + os.sep in path:
        _truncate(path)
    os.remove(next(p for p in files if p.endswith("manifest.ocdbt")))
  with caplog.at_level("WARNING", logger="diffdyn"):
    final = train.train_and_evaluate(cheap_config(), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("checkpoint at step 40" in w and "falling back" in w for w in warnings), warnings
  assert final["step"] == 40
  assert os.path.isdir(os.path.join(workdir, io.CORRUPT_CHECKPOINTS_DIR, "40"))
  assert_same_run(workdir, cheap_reference)


def _can_mount_tmpfs():
  probe = "mkdir -p /tmp/diffdyn_probe && mount -t tmpfs -o size=64k tmpfs /tmp/diffdyn_probe"
  try:
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe],
                          capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(cheap_reference, tmp_path, cache_dir):
  """A tmpfs that fills up during the second checkpoint, for real; then space comes back.

  The room is measured inside the same filesystem, not taken from another run: the run goes to
  its first checkpoint on a roomy tmpfs, which is then shrunk to what is used plus half a
  checkpoint. The rest of the run (a few metrics lines and grids, kilobytes) fits; the second
  checkpoint cannot, whatever a checkpoint weighs on this machine.
  """
  if not _can_mount_tmpfs():
    pytest.skip("mounting a tmpfs needs user namespaces (unshare), unavailable here")
  mount, out = tmp_path / "mnt", tmp_path / "out"
  mount.mkdir()
  launch_cmd = shlex.join([sys.executable, os.path.join(ROOT, "launch.py"), *SMOKE, *CHEAP_ARGS,
                           f"--workdir={mount}/run"])
  script = "\n".join([
      f"mount -t tmpfs -o size=64m tmpfs {mount}",
      f"{launch_cmd} --config.train.total_steps=20 2> {out}/first.log; echo $? > {out}/first.rc",
      f"used=$(du -sk {mount} | cut -f1); one=$(du -sk {mount}/run/checkpoints/20 | cut -f1)",
      f"mount -o remount,size=$((used + one / 2 + 4))k {mount}",
      f"{launch_cmd} 2> {out}/full.log; echo $? > {out}/full.rc",
      f"cp -a {mount}/run {out}/after_full",
      f"mount -o remount,size=64m {mount}",
      f"{launch_cmd} 2> {out}/resumed.log; echo $? > {out}/resumed.rc",
      f"cp -a {mount}/run {out}/resumed",
  ])
  out.mkdir()
  subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                 cwd=ROOT, env=child_env(cache_dir), check=True, timeout=3 * LAUNCH_TIMEOUT)
  assert (out / "first.rc").read_text().strip() == "0", (out / "first.log").read_text()[-3000:]
  full_log = (out / "full.log").read_text()
  assert (out / "full.rc").read_text().strip() == "3", full_log[-3000:]
  errors = [line for line in full_log.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "disk full while" in errors[0], full_log[-3000:]
  assert checkpoint_steps(str(out / "after_full")) == [20]
  assert (out / "resumed.rc").read_text().strip() == "0", (out / "resumed.log").read_text()[-3000:]
  assert_same_run(str(out / "resumed"), cheap_reference)


# ----------------------------------------------------------------------------------------------
# One writer per workdir, and a metrics record that is checked, never silently cut.
# ----------------------------------------------------------------------------------------------


def _start(args, cache):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                          env=child_env(cache), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["at once", "staggered"])
def test_a_second_launch_on_a_busy_workdir_exits_2_naming_the_holder(when, cheap_reference,
                                                                    tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  args = [*SMOKE, *CHEAP_ARGS, "--log_level=debug", f"--workdir={workdir}"]
  first = _start(args, cache_dir)
  if when == "staggered":
    # The second comes once the first is well into its run, and finds it still there: the
    # first is paused (SIGSTOP, holding its lock) until the second has been refused.
    for line in first.stderr:
      if "saved checkpoint at step 20" in line:
        break
    first.send_signal(signal.SIGSTOP)
    second = _start(args, cache_dir)
    second_err = second.communicate(timeout=LAUNCH_TIMEOUT)[1]
    first.send_signal(signal.SIGCONT)
    stderr = {"first": first.communicate(timeout=LAUNCH_TIMEOUT)[1], "second": second_err}
  else:
    second = _start(args, cache_dir)
    stderr = {name: proc.communicate(timeout=LAUNCH_TIMEOUT)[1]
              for name, proc in (("first", first), ("second", second))}
  procs = {"first": first, "second": second}
  codes = {name: proc.returncode for name, proc in procs.items()}
  # At once, either may win the lock; staggered, the first holds it.
  winner = "first" if when == "staggered" else min(codes, key=codes.get)
  loser = "second" if winner == "first" else "first"
  assert (codes[winner], codes[loser]) == (0, 2), stderr
  line = one_error_line(stderr[loser])
  assert f"in use by process {procs[winner].pid}" in line, line
  assert_same_run(workdir, cheap_reference)


@pytest.mark.parametrize("damage", ["a garbled middle line", "a cut last line", "no file"])
def test_damaged_metrics_stop_the_resume_and_change_nothing(damage, cheap_reference, tmp_path):
  workdir = copy_run(cheap_reference, tmp_path)
  path = os.path.join(workdir, io.METRICS_FILE)
  with open(path) as f:
    lines = f.readlines()
  if damage == "a garbled middle line":
    lines[2] = lines[2][:10] + "#garbled#" + lines[2][10:]
    expected = f"{io.METRICS_FILE}:3"
  elif damage == "a cut last line":
    lines[-1] = lines[-1][:len(lines[-1]) // 2]
    expected = "cut off"
  if damage == "no file":
    os.remove(path)
    expected = "is missing"
  else:
    with open(path, "w") as f:
      f.writelines(lines)
  before = snapshot(workdir)
  with pytest.raises(train.UserError, match=expected) as failure:
    train.train_and_evaluate(cheap_config(), workdir)
  assert "--keep_damaged_metrics" in str(failure.value)
  assert snapshot(workdir) == before
