"""launch.py on bad input: one line on stderr naming the problem and the fix, exit status 2."""
import os

import pytest

from conftest import run_launch

SMOKE = ["--config", "experiments/smoke.py"]


def _assert_one_line_error(proc, *words):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for word in words:
    assert word in errors[0], errors[0]


CASES = {
    "unknown key": (["--config.train.lr=0.1"], ["lr"]),
    "negative steps": (["--config.train.total_steps=-10"], ["train.total_steps", "> 0"]),
    "unknown weighting": (["--config.loss.weighting=snr"], ["loss.weighting", "'minsnr'"]),
    "batch 0": (["--config.train.batch_size=0"], ["train.batch_size"]),
    "gamma 0": (["--config.loss.minsnr_gamma=0"], ["loss.minsnr_gamma", "> 0"]),
    "ema 1": (["--config.train.ema_decay=1.0"], ["train.ema_decay", "[0, 1)"]),
    "wrong type": (["--config.train.batch_size=four"], ["batch_size"]),
    "missing data file": (["--config.data.name=cifar10", "--config.data.path=/nonexistent.npz"],
                          ["data.path", "does not exist"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_exits_2_with_one_line(case, tmp_path, cache_dir):
  overrides, words = CASES[case]
  workdir = tmp_path / "run"
  proc = run_launch([*SMOKE, f"--workdir={workdir}", *overrides], cache_dir)
  _assert_one_line_error(proc, *words)
  # Nothing of a run was written.
  assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()


def test_missing_config_file(tmp_path, cache_dir):
  proc = run_launch(["--config", "experiments/nope.py", f"--workdir={tmp_path}"], cache_dir)
  _assert_one_line_error(proc, "nope.py")


def test_config_file_without_get_config(tmp_path, cache_dir):
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  proc = run_launch(["--config", str(bad), f"--workdir={tmp_path / 'run'}"], cache_dir)
  _assert_one_line_error(proc, "get_config")


def test_unwritable_workdir(tmp_path, cache_dir):
  if os.geteuid() == 0:
    target = "/proc/diffdyn_run"   # root may write anywhere else
  else:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    target = str(locked / "run")
  proc = run_launch([*SMOKE, f"--workdir={target}"], cache_dir)
  _assert_one_line_error(proc, "not writable", "--workdir")


def test_missing_workdir_flag(cache_dir):
  proc = run_launch(SMOKE, cache_dir)
  _assert_one_line_error(proc, "--workdir")
