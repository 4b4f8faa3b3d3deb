"""launch.py's command line: help, --show_config, bad input into a fresh workdir, exit statuses.

Most cases call launch.main in this process (the `launch_main` fixture); bad config files and an
unwritable workdir are in test_faults.py, against an existing run.
"""
import os

import numpy as np
import pytest

from conftest import one_error_line
from conftest import run_launch
from diffdyn import train
from diffdyn.errors import RunFailed

SMOKE = ["--config", "experiments/smoke.py"]


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_lists_the_flags_and_where_the_config_keys_are(flag, launch_main, capsys):
  assert launch_main(flag) == 0
  out = capsys.readouterr().out
  for name in ("--config:", "--workdir:", "show_config:", "allow_config_change:",
               "keep_damaged_metrics:", "--log_level:", "diffdyn/configs/default.py"):
    assert name in out, out
  # --helpfull adds the libraries' flags, absl's own among them.
  assert ("--flagfile" in out) == (flag == "--helpfull")


def test_show_config_prints_the_config_with_its_overrides_and_writes_nothing(tmp_path,
                                                                             launch_main,
                                                                             capsys):
  workdir = tmp_path / "run"
  status = launch_main(*SMOKE, "--config.train.batch_size=8", f"--workdir={workdir}",
                       "--show_config")
  assert status == 0
  out = capsys.readouterr().out
  train_section = out.split("\ntrain:\n", 1)[1]
  assert "\n  batch_size: 8\n" in "\n" + train_section
  assert "name: smoke" in out and "synthetic_num_images: 256" in out   # the file's values
  assert not workdir.exists()


CASES = {
    # name: (overrides, words the one error line must hold)
    "unknown key": (["--config.train.lr=0.1"], ["'train.lr'", "learning_rate"]),
    "a key of another section": (["--config.train.seed=3"], ["'train.seed'",
                                                              "did you mean 'seed'"]),
    "a misspelt section": (["--config.trian.batch_size=3"], ["'trian.batch_size'",
                                                                "did you mean 'train.batch_size'"]),
    "a float for an integer": (["--config.train.batch_size=3.5"],
                               ["'train.batch_size'", "must be an integer", "'3.5'"]),
    "a word for a number": (["--config.train.learning_rate=fast"],
                            ["'train.learning_rate'", "must be a number", "'fast'"]),
    "a word for a bool": (["--config.train.tensorboard=maybe"],
                          ["'train.tensorboard'", "must be a bool"]),
    "negative steps": (["--config.train.total_steps=-10"], ["train.total_steps", "> 0"]),
    "unknown weighting": (["--config.loss.weighting=snr"], ["loss.weighting", "'minsnr'"]),
    "batch 0": (["--config.train.batch_size=0"], ["train.batch_size"]),
    "gamma 0": (["--config.loss.minsnr_gamma=0"], ["loss.minsnr_gamma", "> 0"]),
    "ema 1": (["--config.train.ema_decay=1.0"], ["train.ema_decay", "[0, 1)"]),
    "missing data file": (["--config.data.name=npz", "--config.data.path=/nonexistent.npz"],
                          ["data.path", "does not exist"]),
    "a key the source ignores": (["--config.data.path=/data/cifar.npz"],
                                 ["data.path", "ignored by data.name='synthetic'"]),
    "npz without a path": (["--config.data.name=npz"], ["data.name='npz' needs data.path"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_exits_2_with_one_line(case, tmp_path, launch_main, capsys):
  overrides, words = CASES[case]
  workdir = tmp_path / "run"
  assert launch_main(*SMOKE, f"--workdir={workdir}", *overrides) == 2
  line = one_error_line(capsys.readouterr().err)
  for word in words:
    assert word in line, line
  assert not workdir.exists()


def _npz(folder, images):
  path = os.path.join(folder, "images.npz")
  np.savez(path, images=images)
  return path


DATA_CASES = {
    # name: (images in the npz, overrides, words of the error line)
    "no images": (np.zeros((0, 16, 16, 3), np.uint8), [], ["holds 0 images"]),
    "1 channel": (np.zeros((8, 16, 16, 1), np.uint8), [], ["grayscale", "np.repeat"]),
    "4 channels": (np.zeros((8, 16, 16, 4), np.uint8), [], ["RGBA", "x[..., :3]"]),
    "NCHW": (np.zeros((8, 3, 16, 16), np.uint8), [], ["channels-first", "data.layout=NCHW"]),
    "floats": (np.zeros((8, 16, 16, 3), np.float32), [], ["must be uint8"]),
    "not square": (np.zeros((8, 16, 12, 3), np.uint8), [], ["16x12, not square"]),
    "another size": (np.zeros((8, 32, 32, 3), np.uint8), [], ["32x32", "data.image_size is 16"]),
    "NCHW declared, NHWC given": (np.zeros((8, 16, 16, 3), np.uint8),
                                  ["--config.data.layout=NCHW"], ["no channel axis after N",
                                                                  "data.layout=NHWC"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_exits_2_with_one_line_before_the_workdir_is_made(case, tmp_path, launch_main,
                                                                   capsys):
  images, overrides, words = DATA_CASES[case]
  workdir = tmp_path / "run"
  status = launch_main(*SMOKE, f"--workdir={workdir}", "--config.data.name=npz",
                       f"--config.data.path={_npz(str(tmp_path), images)}", *overrides)
  assert status == 2
  line = one_error_line(capsys.readouterr().err)
  for word in words:
    assert word in line, line
  assert not workdir.exists()


def test_missing_workdir_flag(launch_main, capsys):
  assert launch_main(*SMOKE) == 2
  assert "--workdir" in one_error_line(capsys.readouterr().err)


def _stub_run(result=None, raises=None):
  def run(config, workdir, **kwargs):
    del config, workdir, kwargs
    if raises is not None:
      raise raises
    return result
  return run


STOPS = {
    # name: (the run's result or exception, exit status, prefix and words of its one line)
    "Ctrl-C in the loop": (_stub_run({"step": 20, "interrupted": "SIGINT"}), 130,
                           "interrupted:", ["Ctrl-C at step 20 of 40", "run the same command"]),
    "Ctrl-C before the loop": (_stub_run(raises=KeyboardInterrupt()), 130, "interrupted:",
                               ["Ctrl-C", "run the same command"]),
    "a failed run": (_stub_run(raises=RunFailed("non-finite loss at step 41")), 3, "error:",
                     ["non-finite loss at step 41"]),
}


@pytest.mark.parametrize("case", sorted(STOPS))
def test_how_a_run_stops_is_its_exit_status_and_one_line(case, tmp_path, launch_main, capsys,
                                                          monkeypatch):
  run, status, prefix, words = STOPS[case]
  monkeypatch.setattr(train, "train_and_evaluate", run)
  assert launch_main(*SMOKE, f"--workdir={tmp_path / 'run'}") == status
  line = one_error_line(capsys.readouterr().err, prefix)
  for word in words:
    assert word in line, line


@pytest.mark.slow
def test_a_run_without_a_usable_cache_runs_quietly(tmp_path):
  """The TPU probe's INFO line is not shown; an unusable DIFFDYN_CACHE is a warning, not a stop."""
  not_a_dir = tmp_path / "cache"
  not_a_dir.write_text("a file, not a directory")
  tiny = ["--config.data.image_size=8", "--config.model.image_size=8",
          "--config.model.channel_mult=(1,)", "--config.model.attn_resolutions=()",
          "--config.train.tensorboard=False", "--config.curvature.enabled=False",
          "--config.train.total_steps=1", "--config.train.log_every_steps=1",
          "--config.train.checkpoint_every_steps=1", "--config.eval.fid_every_steps=1",
          "--config.eval.grid_num_samples=4"]
  proc = run_launch([*SMOKE, *tiny, f"--workdir={tmp_path / 'run'}"], str(not_a_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "tpu" not in proc.stderr.lower(), proc.stderr
  warnings = [line for line in proc.stderr.splitlines() if " WARNING " in line]
  assert len(warnings) == 1 and "compilation cache" in warnings[0], proc.stderr
