"""Training: the step, the chunk runners, exact resume, and a restore that never loses a run."""
import json
import os

import flax
import jax
import numpy as np
import pytest

from conftest import run_launch
from conftest import snapshot
from conftest import tiny_config
from conftest import tiny_flags
from diffdyn import data as data_lib
from diffdyn import io
from diffdyn import objective
from diffdyn import sweep
from diffdyn import train
from diffdyn.errors import RunFailed, UserError
from experiments import smoke

SMOKE = tiny_flags()


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


def tiny_program(config):
  replicas = sweep.get_replicas(config, "/nonexistent")
  return train.build_program(config, replicas)


# ----------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------


def test_every_random_stream_has_its_own_key():
  keys = objective.stream_keys(1077)
  step = objective.step_keys(keys["train"], 5)
  # A step's four uses and the run's six streams: no two alike. (With partitionable threefry,
  # fold_in(k, i) equals split(k, n)[i], which once made a step's dropout key its timestep key.)
  drawn = [*jax.tree.leaves(step), *keys.values()]
  assert len({np.asarray(k).tobytes() for k in drawn}) == len(drawn) == 10


def test_train_step_is_pure_and_updates_ema():
  config = tiny_config()
  program = tiny_program(config)
  step_fn = jax.jit(train.get_step_fn(
      program.model, program.schedule, program.tx, prediction="eps", batch_size=4,
      random_flip=True, ema_warmup=False, skip_nonfinite=False))
  images = jax.numpy.asarray(data_lib.synthetic_images(16, 8, 0))
  s0 = program.init_state()
  a, b = step_fn(s0, images, program.hyperparams), step_fn(s0, images, program.hyperparams)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert int(a.step) == 1
  # EMA after one step: ema = d * p0 + (1 - d) * p1, with d = 0.999; float32 rounding of the
  # two products and their sum stays within a few ulps (rtol 1e-6).
  d = config.train.ema_decay
  for p0, p1, e in zip(jax.tree.leaves(s0.params), jax.tree.leaves(a.params),
                       jax.tree.leaves(a.ema_params)):
    np.testing.assert_allclose(e, d * p0 + (1 - d) * p1, rtol=1e-6, atol=1e-7)


def test_ema_warmup_follows_its_formula_and_keeps_less_of_the_init():
  decay = 0.999
  steps = np.arange(4000)
  warm = np.asarray([objective.ema_decay_at(s, decay, True) for s in (0, 1, 8, 10_000)])
  # min(d, (1 + s) / (10 + s)) at s = 0, 1, 8 and far past where it reaches d.
  np.testing.assert_allclose(warm, [0.1, 2 / 11, 9 / 18, decay], rtol=1e-6)
  assert float(objective.ema_decay_at(3, decay, False)) == pytest.approx(decay)
  # The weight of the init after s updates is the product of the decays: 0.999**2000 = 13.5%
  # without warm-up, far less with it.
  without = decay ** 2000
  with_warmup = np.prod(np.minimum(decay, (1.0 + steps[:2000]) / (10.0 + steps[:2000])))
  assert without == pytest.approx(0.1352, abs=1e-4) and with_warmup < 1e-3


def test_scan_and_loop_runners_take_the_same_steps():
  config = tiny_config()
  results = {}
  for kind in train.CHUNK_RUNNERS:
    program = tiny_program(tiny_config(**{"train.chunk_runner": kind}))
    assert program.runner.kind == kind
    images = jax.device_put(data_lib.load_images(config.data))
    state = program.runner(program.init_state(), images, program.hyperparams, 3)
    results[kind] = jax.device_get(state)
  assert int(results["scan"].step) == int(results["loop"].step) == 3
  # XLA compiles a scan body and a lone step separately; their float32 results may differ in
  # rounding only, which stays far below 1e-5 relative over three steps.
  for a, b in zip(jax.tree.leaves(results["scan"]), jax.tree.leaves(results["loop"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_auto_chunk_runner_loops_on_the_cpu_and_scans_elsewhere():
  assert train.resolve_chunk_runner("auto", "cpu") == "loop"
  assert train.resolve_chunk_runner("auto", "gpu") == "scan"
  assert train.resolve_chunk_runner("scan", "cpu") == "scan"


def test_events_never_cross_a_chunk():
  config = smoke.get_config()
  steps, step = [], 0
  while step < config.train.total_steps:
    step = train.next_event_step(config, step)
    steps.append(step)
  assert steps == [10, 20, 30, 40]
  assert train.due_events(config, 20) >= {"log", "checkpoint", "samples", "curvature"}
  assert "final" in train.due_events(config, 40) and "final" not in train.due_events(config, 20)


# ----------------------------------------------------------------------------------------------
# Runs.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  final = train.train_and_evaluate(tiny_config(), workdir)
  assert final["step"] == 40
  return workdir


def test_straight_run_writes_metrics_checkpoints_and_grids(straight_run):
  rows = read_metrics(straight_run)
  config = smoke.get_config()
  assert sorted(rows) == [10, 20, 30, 40]
  for row in rows.values():
    assert np.isfinite(row["train/loss"])
    assert all(f"train/loss_tbin/{b}" in row for b in range(10))
    assert "curvature/hutch_trace_mean" in row and "curvature/ref/hutch_trace_mean" in row
    assert f"curvature/hutch_trace_probe/{config.curvature.num_probes - 1}" in row
  assert sorted(os.listdir(os.path.join(straight_run, "checkpoints"))) == ["20", "40"]
  for folder in ("samples", "samples_raw"):   # eval.grid_params="both"
    assert sorted(os.listdir(os.path.join(straight_run, folder))) == [
        "step_000020.png", "step_000040.png"]


def test_curvature_does_not_change_the_trajectory(straight_run, tmp_path):
  workdir = str(tmp_path / "no_curvature")
  train.train_and_evaluate(tiny_config(**{"curvature.enabled": False}), workdir)
  without, with_curv = read_metrics(workdir), read_metrics(straight_run)
  assert [without[s]["train/loss"] for s in sorted(without)] == [
      with_curv[s]["train/loss"] for s in sorted(with_curv)]


def test_ema_curvature_is_measured_beside_the_raw_with_the_same_probes(tmp_path):
  workdir = str(tmp_path / "both")
  train.train_and_evaluate(tiny_config(**{"curvature.params": "both",
                                           "train.total_steps": 10}), workdir)
  row = read_metrics(workdir)[10]
  raw, ema = row["curvature/hutch_trace_mean"], row["curvature/ema/hutch_trace_mean"]
  assert "curvature/ema/ref/hutch_trace_mean" in row
  # After 10 updates at decay 0.999 the EMA is 99% the initial network: its trace is that
  # network's, not the trained one's, so the two measurements must differ.
  assert np.isfinite(raw) and np.isfinite(ema) and raw != ema


def test_config_change_on_resume_is_refused(straight_run):
  with pytest.raises(UserError, match=r"loss.weighting: 'constant' -> 'minsnr'"):
    train.train_and_evaluate(tiny_config(**{"loss.weighting": "minsnr"}), straight_run)


def test_a_new_learning_rate_on_resume_is_used_and_logged(straight_run, tmp_path, caplog):
  # Without curvature, which leaves the trajectory as it is (the test above).
  workdir = str(tmp_path / "run")
  no_curvature = {"curvature.enabled": False}
  train.train_and_evaluate(tiny_config(**no_curvature, **{"train.total_steps": 20}), workdir)
  with caplog.at_level("WARNING", logger="diffdyn"):
    train.train_and_evaluate(tiny_config(**no_curvature, **{"train.learning_rate": 1e-3}),
                             workdir, allow_config_change=True)
  assert any("train.learning_rate: 0.0001 -> 0.001" in r.getMessage() for r in caplog.records)
  ckpts = io.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
  program = tiny_program(tiny_config())
  state, _, step = ckpts.restore_latest(program.abstract_state())
  ckpts.close()
  assert step == 40
  assert float(state.opt_state.hyperparams["learning_rate"]) == pytest.approx(1e-3)
  # Steps 21..40 ran at the new rate, so they differ from the straight run's.
  assert read_metrics(workdir)[40]["train/loss"] != read_metrics(straight_run)[40]["train/loss"]


# ----------------------------------------------------------------------------------------------
# A restore that tells damage from difference.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  """20 steps without curvature: the run the restore tests resume, change or damage."""
  workdir = str(tmp_path_factory.mktemp("short") / "run")
  train.train_and_evaluate(tiny_config(**{"curvature.enabled": False,
                                           "train.total_steps": 20}), workdir)
  return workdir


def _copy(source, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  dest = str(tmp_path / "copy")
  shutil.copytree(source, dest)
  return dest


def test_a_wider_model_is_refused_and_the_run_left_as_it_was(short_run, tmp_path, cache_dir):
  workdir = _copy(short_run, tmp_path)
  before = snapshot(workdir)
  proc = run_launch([*SMOKE, "--config.curvature.enabled=False", "--config.train.total_steps=20",
                     "--config.model.base_channels=16", "--allow_config_change",
                     f"--workdir={workdir}"], cache_dir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "model.base_channels: 8 -> 16" in errors[0] and "new --workdir" in errors[0]
  assert "another shape" in errors[0]   # the leaves whose shapes differ are named
  assert snapshot(workdir) == before


@flax.struct.dataclass
class _StateWithAField(train.TrainState):
  """The train state as a later release might define it: one field more."""
  grad_norm_ema: jax.Array = None


def test_a_state_with_another_field_is_refused_without_any_config_change(short_run, tmp_path,
                                                                        monkeypatch):
  workdir = _copy(short_run, tmp_path)
  before = snapshot(workdir)
  real_create = train.create_train_state

  def create_with_a_field(*args, **kwargs):
    state = real_create(*args, **kwargs)
    return _StateWithAField(**{f.name: getattr(state, f.name)
                               for f in train.TrainState.__dataclass_fields__.values()},
                            grad_norm_ema=jax.numpy.zeros(()))

  monkeypatch.setattr(train, "create_train_state", create_with_a_field)
  config = tiny_config(**{"curvature.enabled": False, "train.total_steps": 20})
  with pytest.raises(UserError, match=r"grad_norm_ema.*new --workdir"):
    train.train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before


def test_an_unreadable_checkpoint_is_reported_and_nothing_is_moved(short_run, tmp_path,
                                                                  monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  workdir = _copy(short_run, tmp_path)
  before = snapshot(workdir)

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied", os.path.join(workdir, "checkpoints", "20"))

  monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
  config = tiny_config(**{"curvature.enabled": False, "train.total_steps": 20})
  with pytest.raises(io.CheckpointReadError, match=r"step 20.*Permission denied.*nothing was"):
    train.train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before


def test_when_no_checkpoint_restores_the_run_stops_and_changes_nothing(short_run, tmp_path):
  workdir = _copy(short_run, tmp_path)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  before = snapshot(workdir)
  config = tiny_config(**{"curvature.enabled": False, "train.total_steps": 20})
  with pytest.raises(RunFailed, match=r"no checkpoint .* restores.*nothing was changed"):
    train.train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before
