"""Kill anywhere: SIGKILL at ten points and SIGTERM at one, then the same command finishes the run.

The reference is a launched tiny run with curvature every 10 steps, checkpoints at 20 and 40 and
FID at the end; each interrupted launch resumes from what the previous one left. Its own file
(the helpers are test_faults') so that pytest-xdist runs these minutes of launches beside the
rest of the fault suite.
"""
import os
import random
import re
import signal

import numpy as np
import pytest

from conftest import ROOT
from diffdyn.fid import weights as fid_weights
from test_faults import KILL_SEED
from test_faults import SMOKE
from test_faults import Interruption
from test_faults import assert_same_run
from test_faults import checkpoint_steps
from test_faults import launch
from test_faults import launch_and_interrupt
from test_faults import metric_lines


# ----------------------------------------------------------------------------------------------
# The launched reference: smoke with curvature every 10 steps, checkpoints at 20 and 40, and FID
# at the end (seeded stand-in Inception weights, 2 samples, fixed reference statistics: one FID
# costs seconds on a CPU, not minutes).
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fid")
  with np.load(os.path.join(ROOT, "tests", "fixtures", "fid_parity.npz")) as f:
    recipe = {k: f[k] for k in ("seed", "conv_gain", "shift_std", "names", "shapes")}
  weights = str(folder / "inception.npz")
  fid_weights.save_npz_state_dict(fid_weights.seeded_state_dict(recipe), weights)
  stats = str(folder / "reference_stats.npz")
  np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
  return weights, stats


@pytest.fixture(scope="module")
def fault_args(fid_files):
  weights, stats = fid_files
  return [*SMOKE, "--log_level=debug",
          "--config.fid.enabled=True", f"--config.fid.inception_weights={weights}",
          f"--config.fid.reference_stats={stats}",
          "--config.eval.fid_every_steps=1000",   # past the end: FID only at the final step
          "--config.eval.fid_num_samples=2", "--config.eval.final_fid_num_samples=2",
          "--config.fid.batch_size=2"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir, fault_args):
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  rc, stderr = launch([*fault_args, f"--workdir={workdir}"], cache_dir)
  assert rc == 0, stderr[-3000:]
  lines = metric_lines(workdir)
  # The phases the kill test interrupts are all in this run.
  assert [r["step"] for r in lines if "train/loss" in r] == [10, 20, 30, 40]
  assert [r["step"] for r in lines if "curvature/hutch_trace_mean" in r] == [10, 20, 30, 40]
  assert [r["step"] for r in lines if "eval/final/fid" in r] == [40]
  assert checkpoint_steps(workdir) == [20, 40]
  return workdir


# Ten kills and one SIGTERM, in the order the run meets them; a sign at step s appears in
# every launch, since each resumes from a checkpoint at or before s.
INTERRUPTIONS = [
    Interruption("the train scan", line=r"training steps 0 to 10", max_delay=0.5),
    Interruption("a metrics write", line=r"writing metrics at step 10", max_delay=0.01),
    Interruption("a curvature measurement", line=r"running curvature at step 10", max_delay=2.0),
    # Anywhere in the seconds between the first chunk and the first checkpoint.
    Interruption("a random time", line=r"training steps 0 to 10", max_delay=3.0),
    Interruption("a checkpoint save", line=r"saving checkpoint at step 20", max_delay=0.05),
    # SIGTERM while a launch loads its curvature program (seconds, the first time in a process),
    # at step 10 or 30 by where the last kill left the checkpoints.
    Interruption("preemption", line=r"running curvature at step", max_delay=0.5,
                 signal=signal.SIGTERM),
    Interruption("the train scan", line=r"training steps 30 to 40", max_delay=0.5),
    Interruption("a metrics write", line=r"writing metrics at step 40", max_delay=0.01),
    Interruption("a curvature measurement", line=r"running curvature at step 40", max_delay=2.0),
    # The final evaluation draws two grids (EMA and raw params), then the FID samples.
    Interruption("a FID evaluation", line=r"running samples at step 40", max_delay=3.0),
    Interruption("a checkpoint save", line=r"saving checkpoint at step 40", max_delay=0.05),
]


@pytest.mark.slow
def test_killed_anywhere_the_same_command_finishes_the_same_run(reference_run, tmp_path,
                                                               cache_dir, fault_args):
  workdir = str(tmp_path / "run")
  args = [*fault_args, f"--workdir={workdir}"]
  rng = random.Random(KILL_SEED)
  assert sum(i.signal == signal.SIGKILL for i in INTERRUPTIONS) >= 10
  for interruption in INTERRUPTIONS:
    rc, stderr = launch_and_interrupt(args, cache_dir, workdir, interruption, rng)
    if interruption.signal == signal.SIGTERM:
      # Preemption: the step in flight finishes its evaluations, and its metrics and a
      # checkpoint are written before a clean exit.
      assert rc == 0, stderr[-3000:]
      stopped = re.search(r"preempted at step (\d+) of 40", stderr)
      assert stopped, stderr[-3000:]
      step = int(stopped.group(1))
      assert checkpoint_steps(workdir)[-1] == step
      assert metric_lines(workdir) == [r for r in metric_lines(reference_run)
                                       if r["step"] <= step]
    else:
      assert rc == -signal.SIGKILL, f"{interruption.phase}: rc {rc}\n{stderr[-3000:]}"
  rc, stderr = launch(args, cache_dir)
  assert rc == 0, stderr[-3000:]
  assert_same_run(workdir, reference_run)
  with open(os.path.join(workdir, "samples", "step_000040.png"), "rb") as f:
    grid = f.read()
  with open(os.path.join(reference_run, "samples", "step_000040.png"), "rb") as f:
    assert grid == f.read()
