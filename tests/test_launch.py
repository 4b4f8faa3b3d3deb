"""launch.py on bad input into a fresh workdir: one error line, exit 2, no run written.

Bad config files and an unwritable workdir are in test_faults.py, against an existing run.
"""
import pytest

from conftest import assert_one_line_error
from conftest import run_launch

SMOKE = ["--config", "experiments/smoke.py"]


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
  assert_one_line_error(proc, *words)
  # Nothing of a run was written.
  assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()


def test_missing_workdir_flag(cache_dir):
  proc = run_launch(SMOKE, cache_dir)
  assert_one_line_error(proc, "--workdir")
