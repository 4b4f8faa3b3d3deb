"""Run I/O: metrics.jsonl resume semantics, checkpoints with fallback, grids."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdyn import io


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
