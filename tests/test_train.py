"""Training: exact resume across processes, determinism, events, and the train-state contract."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import run_launch
from diffdyn import train
from experiments import smoke

SMOKE = ["--config", "experiments/smoke.py"]


def read_metrics(workdir):
  """{step: {key: value}} with every line of a step merged; timing keys dropped."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      merged = rows.setdefault(record.pop("step"), {})
      record.pop("wall_time")
      assert not set(record) & set(merged), f"a key written twice at one step: {record}"
      merged.update({k: v for k, v in record.items() if not k.startswith("time/")})
  return rows


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
  workdir = str(tmp_path_factory.mktemp("straight"))
  proc = run_launch([*SMOKE, f"--workdir={workdir}"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_straight_run_writes_metrics_checkpoints_and_grids(straight_run):
  rows = read_metrics(straight_run)
  config = smoke.get_config()
  assert sorted(rows) == [10, 20, 30, 40]
  for step, row in rows.items():
    assert np.isfinite(row["train/loss"])
    assert all(f"train/loss_tbin/{b}" in row for b in range(10))
    assert "curvature/hutch_trace_mean" in row and "curvature/ref/hutch_trace_mean" in row
    assert f"curvature/hutch_trace_probe/{config.curvature.num_probes - 1}" in row
  assert sorted(os.listdir(os.path.join(straight_run, "checkpoints"))) == ["20", "40"]
  assert sorted(os.listdir(os.path.join(straight_run, "samples"))) == [
      "step_000020.png", "step_000040.png"]


def test_resume_in_a_fresh_process_replays_exactly(straight_run, tmp_path, cache_dir):
  workdir = str(tmp_path / "resumed")
  first = run_launch([*SMOKE, f"--workdir={workdir}", "--config.train.total_steps=20"], cache_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_launch([*SMOKE, f"--workdir={workdir}"], cache_dir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed" in second.stderr
  straight, resumed = read_metrics(straight_run), read_metrics(workdir)
  assert sorted(resumed) == sorted(straight)
  for step in straight:
    # Bitwise: every step is a pure function of (seed, step) and the restored state.
    assert resumed[step] == straight[step], step


def test_curvature_does_not_change_the_trajectory(straight_run, tmp_path, cache_dir):
  config = smoke.get_config()
  config.curvature.enabled = False
  workdir = str(tmp_path / "no_curvature")
  train.train_and_evaluate(config, workdir)
  without, with_curv = read_metrics(workdir), read_metrics(straight_run)
  assert [without[s]["train/loss"] for s in sorted(without)] == [
      with_curv[s]["train/loss"] for s in sorted(with_curv)]


def test_events_never_cross_a_scan():
  config = smoke.get_config()
  steps, step = [], 0
  while step < config.train.total_steps:
    step = train.next_event_step(config, step)
    steps.append(step)
  assert steps == [10, 20, 30, 40]
  assert train.due_events(config, 20) >= {"log", "checkpoint", "samples", "curvature"}
  assert "final" in train.due_events(config, 40) and "final" not in train.due_events(config, 20)


def test_train_step_is_pure_and_updates_ema():
  config = smoke.get_config()
  model = train.models.get_model(config.model)
  schedule = train.make_schedule(config)
  tx = train.make_optimizer(config.train)
  step_fn = jax.jit(train.get_train_step_fn(config, model, schedule, tx))
  images = jax.numpy.asarray(train.data_lib.synthetic_images(16, 16, 0))
  s0 = train.create_train_state(config, model, tx)
  a, b = step_fn(s0, images), step_fn(s0, images)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert int(a.step) == 1
  # EMA after one step: ema = d * p0 + (1 - d) * p1, with d = 0.999.
  d = config.train.ema_decay
  for p0, p1, e in zip(jax.tree.leaves(s0.params), jax.tree.leaves(a.params),
                       jax.tree.leaves(a.ema_params)):
    np.testing.assert_allclose(e, d * p0 + (1 - d) * p1, rtol=1e-6, atol=1e-7)


def test_config_change_on_resume_is_refused(straight_run):
  config = smoke.get_config()
  config.loss.weighting = "minsnr"
  with pytest.raises(train.UserError, match=r"loss.weighting: 'constant' -> 'minsnr'"):
    train.train_and_evaluate(config, straight_run)
