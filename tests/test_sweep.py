"""Sweeps: replicates of one vmapped program follow single runs, are runs of their own, resume
exactly and run on several devices.

Every sweep here shares one tiny config (8x8 images, a one-level width-8 UNet, 4 steps), so the
train programs compile once per shape and the persistent cache serves the rest.
"""
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest
from conftest import ROOT
from conftest import run_launch
from diffdyn import sweep
from diffdyn import train
from diffdyn.analysis import runs as runs_lib
from diffdyn.errors import UserError
from diffdyn.configs import smoke as smoke_lib

TESTS = os.path.dirname(os.path.abspath(__file__))
# The suite's tiny run with a Min-SNR weighting (so that gamma variants differ), 4 steps, and
# every event at steps 2 and 4.
SWEEP_RUN = {"loss.weighting": "minsnr", "train.total_steps": 4, "train.log_every_steps": 2,
             "train.checkpoint_every_steps": 2, "curvature.enabled": False,
             "curvature.every_steps": 2, "eval.fid_every_steps": 4}
# Replicate i of a sweep runs batched convolutions where the single run runs unbatched ones;
# XLA may round those differently, so losses are held to float32 rounding over a few steps
# (they come out bitwise equal on the CPU today).
RTOL = 1e-5


def tiny_config(**overrides):
  return conftest.tiny_config(**{**SWEEP_RUN, **overrides})


def tiny_flags(**overrides):
  return conftest.tiny_flags(**{**SWEEP_RUN, **overrides})


def _flat(config):
  """{"section.key": value} of a two-level config."""
  return {f"{section}.{key}": value for section, fields in config.items()
          if hasattr(fields, "items") for key, value in fields.items()}


def read_metrics(run_dir):
  """{step: {key: value}} of a run's metrics.jsonl, timing keys left out."""
  rows = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      record.pop("wall_time")
      rows.setdefault(record.pop("step"), {}).update(
          {k: v for k, v in record.items() if not k.startswith("time/")})
  return rows


def losses(run_dir):
  rows = read_metrics(run_dir)
  return np.array([rows[s]["train/loss"] for s in sorted(rows) if "train/loss" in rows[s]])


class _Messages(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("single"))
  train.train_and_evaluate(tiny_config(), workdir, evaluators={})
  return workdir


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory):
  """Two seeds with curvature and sample grids: the sweep every per-replicate check reads."""
  workdir = str(tmp_path_factory.mktemp("seeds"))
  handler = _Messages()
  logging.getLogger("diffdyn").addHandler(handler)
  previous = logging.getLogger("diffdyn").level
  logging.getLogger("diffdyn").setLevel(logging.INFO)
  try:
    train.train_and_evaluate(
        tiny_config(**{"sweep.seeds": 2, "curvature.enabled": True}), workdir)
  finally:
    logging.getLogger("diffdyn").removeHandler(handler)
    logging.getLogger("diffdyn").setLevel(previous)
  return workdir, handler.messages


def test_replicates_are_the_grid_of_seeds_and_variants():
  config = tiny_config(**{"sweep.seeds": 2, "sweep.minsnr_gamma": (1.0, 5.0),
                          "sweep.loss_weighting": ("constant", "minsnr")})
  assert sweep.is_sweep(config) and not sweep.is_sweep(tiny_config())
  reps = sweep.replicates(config)
  assert [r.name for r in reps] == [
      f"smoke_{w}_gamma{g}_seed{s}" for w in ("constant", "minsnr") for g in (1, 5)
      for s in (1077, 1078)]
  last = reps[-1].config
  assert (last.seed, last.loss.weighting, last.loss.minsnr_gamma) == (1078, "minsnr", 5.0)
  assert last.name == "smoke_minsnr_gamma5" and last.sweep.seeds == 1
  assert not any(last.sweep[key] for key in sweep.VARIANTS) and not last.sweep.seed_list
  listed = sweep.replicates(tiny_config(**{"sweep.seed_list": (7, 3)}))
  assert [r.config.seed for r in listed] == [7, 3]
  with pytest.raises(UserError, match="sweep.seeds"):
    sweep.replicates(tiny_config(**{"sweep.seed_list": (7, 3), "sweep.seeds": 3}))


def _program(config):
  return train.build_program(config, sweep.get_replicas(config, "/nonexistent",
                                                        jax.devices()[:1]))


def test_variants_enter_the_program_as_arrays():
  grid = tiny_config(**{"sweep.learning_rate": (1e-4, 3e-4), "sweep.ema_decay": (0.9, 0.999)})
  program = _program(grid)
  hyperparams = jax.device_get(program.hyperparams)
  np.testing.assert_allclose(hyperparams.ema_decay, [0.9, 0.999, 0.9, 0.999], rtol=1e-6)
  assert hyperparams.loss_weights.shape == (4, grid.diffusion.num_timesteps)
  # The learning rate lives in each replicate's optimizer state; one seed, one init.
  state = program.init_state()
  np.testing.assert_allclose(state.opt_state.hyperparams["learning_rate"],
                             [1e-4, 1e-4, 3e-4, 3e-4], rtol=1e-6)
  for leaf in jax.tree.leaves(state.params):
    np.testing.assert_array_equal(leaf[0], leaf[2])


def test_a_single_run_is_unstacked_and_a_sweep_of_one_seed_is_stacked():
  single = _program(tiny_config())
  assert not single.replicas.stacked and single.replicas.run_dirs == ("/nonexistent",)
  one_seed = _program(tiny_config(**{"sweep.seed_list": (1077,)}))
  assert one_seed.replicas.stacked
  assert one_seed.replicas.run_dirs == ("/nonexistent/smoke_seed1077",)
  a, b = single.abstract_state(), one_seed.abstract_state()
  assert all(y.shape == (1, *x.shape) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_replicate_follows_the_single_run_and_seeds_differ(single_run, seed_sweep):
  workdir, _ = seed_sweep
  first = losses(os.path.join(workdir, "smoke_seed1077"))
  np.testing.assert_allclose(first, losses(single_run), rtol=RTOL)
  assert not np.allclose(losses(os.path.join(workdir, "smoke_seed1078")), first)


def test_each_replicate_is_a_run_of_its_own(seed_sweep):
  workdir, messages = seed_sweep
  runs = [runs_lib.load_run(os.path.join(workdir, f"smoke_seed{s}")) for s in (1077, 1078)]
  assert [r.seed for r in runs] == [1077, 1078]
  assert all(r.config["sweep"]["seeds"] == 1 and r.config["name"] == "smoke" for r in runs)
  groups = runs_lib.group_replicates(runs)
  assert len(groups) == 1 and groups[0].size == 2
  traces = [r.series("curvature/hutch_trace_mean") for r in runs]
  assert all(list(steps) == [2, 4] for steps, _ in traces)
  assert not np.allclose(traces[0][1], traces[1][1])
  for run in runs:
    assert [p.name for p in run.sample_grids()] == ["step_000004.png"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert json.load(open(os.path.join(workdir, "config.json")))["sweep"]["seeds"] == 2
  # One compiled curvature measurement serves both replicates (they share the loss weights).
  assert sum("compiled the curvature traces program" in m for m in messages) == 1


def test_a_gamma_variant_changes_the_weights_only(single_run, tmp_path):
  workdir = str(tmp_path / "gamma")
  train.train_and_evaluate(tiny_config(**{"sweep.minsnr_gamma": (1.0, 5.0)}), workdir)
  same = os.path.join(workdir, "smoke_gamma5_seed1077")
  other = os.path.join(workdir, "smoke_gamma1_seed1077")
  np.testing.assert_allclose(losses(same), losses(single_run), rtol=RTOL)
  assert not np.allclose(losses(other), losses(single_run))
  assert runs_lib.load_run(other).config["loss"]["minsnr_gamma"] == 1.0


@pytest.mark.slow
def test_four_devices_match_one(seed_sweep, tmp_path, cache_dir):
  # Four CPU devices exist only if XLA is told before it starts: hence a fresh process, which
  # runs 4 replicates (one per device) and 2 (each batch of 4 split over the devices). Only
  # the losses are compared: no evaluator runs.
  script = (f"import logging, sys; sys.path[:0] = [{ROOT!r}, {TESTS!r}]\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "from diffdyn import train\n"
            "from test_sweep import tiny_config\n"
            "for seeds, workdir in ((4, sys.argv[1]), (2, sys.argv[2])):\n"
            "  train.train_and_evaluate(tiny_config(**{'sweep.seeds': seeds}), workdir,\n"
            "                           evaluators={})\n")
  workdirs = [str(tmp_path / "replicas"), str(tmp_path / "batch")]
  env = dict(os.environ, DIFFDYN_CACHE=cache_dir,
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                       "--xla_force_host_platform_device_count=4".strip())
  proc = subprocess.run([sys.executable, "-c", script, *workdirs], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "4 replicates on 4 devices (split: replicas)" in proc.stderr
  assert "2 replicates on 4 devices (split: batch)" in proc.stderr
  one_device, _ = seed_sweep
  for workdir in workdirs:
    for name in ("smoke_seed1077", "smoke_seed1078"):
      np.testing.assert_allclose(losses(os.path.join(workdir, name)),
                                 losses(os.path.join(one_device, name)), rtol=RTOL)


@pytest.mark.slow  # a second sweep program, and a launch
def test_the_notebook_path_runs_a_sweep_config_as_launch_does(tmp_path, cache_dir):
  """train.train_and_evaluate on experiments/e5e6_sweep.py writes the replicates launch.py does."""
  from experiments import e5e6_sweep  # pylint: disable=import-outside-toplevel
  # One seed of each arm: the two replicates' program is the seed sweep's (same network, data
  # and steps), which the compilation cache already holds.
  overrides = {**conftest.TINY, **SWEEP_RUN, "sweep.seeds": 1, "fid.enabled": False,
               "data.name": "synthetic"}
  config = smoke_lib.smoke_size(e5e6_sweep.get_config())
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  smoke_sizes = _flat(smoke_lib.smoke_size(e5e6_sweep.get_config()))
  in_process = str(tmp_path / "notebook")
  final = train.train_and_evaluate(config, in_process)
  names = [f"e56_{w}_seed1077" for w in ("constant", "minsnr")]
  assert sorted(n for n in os.listdir(in_process) if n.startswith("e56_")) == names
  assert final["step"] == 4 and f"train/loss[{names[0]}]" in final
  launched = str(tmp_path / "launched")
  flags = [f"--config.{k}={v!r}".replace(" ", "") if isinstance(v, tuple)
           else f"--config.{k}={v}" for k, v in overrides.items()]
  shrunk = [f"--config.{k}={v!r}".replace(" ", "") if isinstance(v, tuple) else f"--config.{k}={v}"
            for k, v in smoke_sizes.items() if k not in overrides]
  proc = run_launch(["--config", "experiments/e5e6_sweep.py", *shrunk, *flags,
                     f"--workdir={launched}"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in names:
    # The same program on the same inputs in two processes: equal to the bit.
    np.testing.assert_array_equal(losses(os.path.join(in_process, name)),
                                  losses(os.path.join(launched, name)))
  # The constant and Min-SNR arms differ in their losses, not only in their names.
  assert not np.array_equal(losses(os.path.join(in_process, names[0])),
                            losses(os.path.join(in_process, names[1])))


def test_a_sweep_with_bad_seeds_is_one_line(tmp_path, launch_main, capsys):
  flags = tiny_flags(**{"sweep.seeds": 2, "sweep.seed_list": (5, 6, 7)})
  assert launch_main(*flags, f"--workdir={tmp_path / 'bad'}") == 2
  line = conftest.one_error_line(capsys.readouterr().err)
  assert "sweep.seeds (2) must be 1 or the number of sweep.seed_list (3)" in line, line
  assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_killed_sweep_resumes_exactly(seed_sweep, tmp_path, cache_dir):
  straight, _ = seed_sweep
  workdir = str(tmp_path / "killed")
  args = [sys.executable, os.path.join(ROOT, "launch.py"), "--log_level=debug",
          *tiny_flags(**{"sweep.seeds": 2, "curvature.enabled": True}), f"--workdir={workdir}"]
  env = dict(os.environ, DIFFDYN_CACHE=cache_dir, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stderr:   # killed right after its first checkpoint, mid-run
      if "saved checkpoint at step 2" in line:
        proc.kill()
        break
  finally:
    proc.kill()
    proc.wait()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  rerun = run_launch(args[2:], cache_dir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  for name in ("smoke_seed1077", "smoke_seed1078"):
    assert read_metrics(os.path.join(workdir, name)) == read_metrics(
        os.path.join(straight, name)), name
