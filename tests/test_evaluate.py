"""Evaluators: every curvature measurement of the smoke config, and sample grids, in a real run."""
import json
import os

import numpy as np
import pytest
from PIL import Image

# Every curvature program (traces with blocks, Gauss-Newton, Lanczos for the preconditioned
# sharpness and the density) compiled and run once: the evaluators end to end.
pytestmark = pytest.mark.slow

from conftest import tiny_config
from diffdyn import train
from experiments import smoke


def test_the_smoke_config_turns_every_curvature_measurement_on():
  cc = smoke.get_config().curvature
  assert cc.enabled and cc.objective == "both" and cc.blocks and cc.ggn
  assert 0 < cc.precond_every_steps <= 20 and 0 < cc.density_every_steps <= 20


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The smoke config's measurements on the suite's tiny network, for 20 steps: curvature at 10
  and 20, Adam's preconditioned sharpness and the spectral density at 20."""
  smoke_curvature = smoke.get_config().curvature
  config = tiny_config(**{f"curvature.{k}": smoke_curvature[k]
                          for k in ("blocks", "ggn", "precond_every_steps",
                                    "density_every_steps")},
                       **{"train.total_steps": 20})
  workdir = str(tmp_path_factory.mktemp("smoke") / "run")
  train.train_and_evaluate(config, workdir)
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      rows.setdefault(record.pop("step"), {}).update(record)
  return workdir, rows, config


def test_blocks_add_up_to_the_trace_in_each_partition(smoke_run):
  _, rows, _ = smoke_run
  for prefix in ("curvature/", "curvature/ref/"):
    row = rows[10]
    total = row[prefix + "hutch_trace_mean"]
    for partition in ("stage", "kind"):
      parts = [v for k, v in row.items() if k.startswith(f"{prefix}block/{partition}/")
               and k.endswith("/hutch_trace_mean")]
      assert len(parts) >= 4
      # The same probes' quadratic forms split by parameter: the sum is the total up to
      # float32 rounding of a few dozen terms (1e-4 relative).
      assert sum(parts) == pytest.approx(total, rel=1e-4)
    assert row[prefix + "trace_per_param"] > 0


def test_gauss_newton_is_logged_beside_the_hessian_for_both_objectives(smoke_run):
  _, rows, _ = smoke_run
  for prefix in ("curvature/", "curvature/ref/"):
    ggn = rows[10][prefix + "ggn_trace_mean"]
    # G is positive semi-definite, so its trace is >= 0 for every probe's estimate too.
    assert ggn >= 0 and np.isfinite(rows[10][prefix + "ggn_trace_stderr"])


def test_preconditioned_sharpness_and_its_threshold_at_their_interval(smoke_run):
  _, rows, config = smoke_run
  assert "curvature/precond_sharpness" not in rows[10]
  t = config.train
  # 2 (1 + b1) / ((1 - b1) lr): 38 / lr for b1 = 0.9, computed here by hand.
  threshold = 2 * (1 + t.adam_b1) / ((1 - t.adam_b1) * t.learning_rate)
  for prefix in ("curvature/", "curvature/ref/"):
    assert rows[20][prefix + "precond_threshold"] == pytest.approx(threshold, rel=1e-6)
    assert rows[20][prefix + "precond_sharpness"] > 0


def test_the_spectral_density_is_saved_at_its_interval(smoke_run):
  workdir, _, _ = smoke_run
  assert os.listdir(os.path.join(workdir, "curvature_density")) == ["step_000020.npz"]
  with np.load(os.path.join(workdir, "curvature_density", "step_000020.npz")) as f:
    for name in ("train", "ref"):
      grid, density = f[f"{name}_grid"], f[f"{name}_density"]
      assert grid.shape == density.shape == (smoke.get_config().curvature.density_points,)
      assert (density >= 0).all()
      # Quadrature weights sum to 1 per run and the Gaussians sit inside the grid, so the
      # density integrates to about 1 (the tails past the grid's ends lose a little).
      assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=0.05)


def test_costs_and_the_probe_plan_are_logged(smoke_run):
  _, rows, config = smoke_run
  for key in ("time/curvature_train_steps", "time/curvature_ggn_train_steps"):
    assert rows[10][key] > 0
  for key in ("time/curvature_precond_train_steps", "time/curvature_density_train_steps"):
    assert rows[20][key] > 0
  # chunk_size=0 plans the chunk: all 4 smoke probes fit the 10 GiB default at once.
  assert rows[10]["time/curvature_plan/chunk_size"] == config.curvature.num_probes
  assert 0 < rows[10]["time/curvature_plan/planned_gib"] < config.curvature.max_memory_gb


def test_grids_of_both_parameter_sets_are_upscaled(smoke_run):
  workdir, _, config = smoke_run
  e = config.eval
  side = int(np.ceil(np.sqrt(e.grid_num_samples)))
  tile = config.model.image_size + 1
  for folder in ("samples", "samples_raw"):
    image = np.asarray(Image.open(os.path.join(workdir, folder, "step_000020.png")))
    assert image.shape == ((side * tile + 1) * e.grid_upscale,) * 2 + (3,)
