"""bench/: the budgeted run, its table, and the figures' plumbing, on a CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import measure
from bench import run
from conftest import ROOT
from conftest import assert_one_line_error
from test_sweep import tiny_config

RUN = os.path.join(ROOT, "bench", "run.py")
STATUSES = {"done", "cut", "failed", "skipped"}


def _figure(name, value, unit, note="", cost=None):
  return {"name": name, "value": value, "unit": unit, "compile_s": 1.0, "steady_ms": 2.0,
          "memory_mb": 3.0, "note": note, "cost": cost}


def _done(*names):
  return {n: {"name": n, "status": "done", "reason": "", "seconds": 1.0, "cap_s": 9.0}
          for n in names}


def _rows(lines):
  """{figure label: its cells} of the comparison table at the top of `lines`."""
  rows = {}
  for line in lines[2:]:
    if not line:
      break
    cells = line.split(" | ")
    rows[cells[0].lstrip("| ")] = cells
  return rows


def test_rows_pair_each_figure_with_the_slowest_peer_gap():
  figures = [_figure("train_scan_fp32", 400.0, "steps/s"),
             _figure("hutchinson", 20.0, "ms/measurement"),
             _figure("hutchinson_over_step", 4.0, "x one train step"),
             _figure("e2e_e6", 100.0, "s")]
  peers = [{"name": "torch_train_bc32_b4_eager", "value": 10.0, "unit": "steps/s"},
           {"name": "torch_train_bc32_b4_default", "value": 40.0, "unit": "steps/s"},
           {"name": "torch_train_bc32_b4_reduce-overhead", "value": 80.0, "unit": "steps/s"},
           {"name": "torch_hutch16_bc32_b4", "value": 2.0, "unit": "s/measurement"},
           {"name": "torch_hutch16_over_step_bc32", "value": 36.7, "unit": "x train step"}]
  statuses = _done(*run.PART_NAMES)
  rows = _rows(run.table_lines(figures, peers, statuses, "H100", "2026-01-01"))
  eager = rows["train steps/s, scan (fp32) vs the eager peer (AMP)"]
  assert eager[3:6] == ["40.00x", ">= 300 steps/s and >= 20x", "yes"]
  compiled = rows["train steps/s, scan (fp32) vs torch.compile (AMP)"]
  assert "reduce-overhead" in compiled[2] and compiled[3:6] == ["5.00x", ">= 6x", "**no**"]
  assert rows["Hutchinson measurement, peer's shape"][3] == "100.00x"  # 2 s against 20 ms
  assert rows["Hutchinson measurement in train steps"][3:6] == ["", "<= 3x", "**no**"]
  assert rows["E6 end to end, compile included"][5] == "yes"


def test_figures_not_measured_name_their_part_and_why():
  statuses = _done("train", "peer_train")
  statuses["hutchinson"] = {"name": "hutchinson", "status": "skipped", "seconds": 0.0,
                            "cap_s": None, "reason": "budget: 3 s left of 20"}
  lines = run.table_lines([_figure("train_scan_fp32", 400.0, "steps/s")], [], statuses, "cpu",
                          "today", judge=False)
  rows = _rows(lines)
  assert rows["Hutchinson measurement, peer's shape"][1] == (
      "not measured: hutchinson skipped: budget: 3 s left of 20")
  assert rows["DDPM sampling (bf16)"][1] == "not measured: sampling not run"
  assert rows["train steps/s, scan (fp32) vs the eager peer (AMP)"][2] == (
      "not measured: not among peer_train's figures")
  assert "| hutchinson | skipped | 0.0 |  | budget: 3 s left of 20 |" in lines


def test_a_missed_target_shows_the_counts_that_bound_it():
  # Reference by hand: 6.7 GFLOP at the H200's 67 TFLOP/s fp32 peak is 0.1 ms; 1000 launches
  # at the assumed 2 us each are 2 ms; 4.8 GB at 4.8 TB/s is 1 ms. Printed to 3 digits.
  cost = {"flops": 6.7e9, "bytes": 4.8e9, "launches_entry": 7, "launches_loop_body": 1000,
          "iterations": 100}
  figure = _figure("train_scan_fp32", 100.0, "steps/s", cost=cost)
  figure["steady_ms"] = 1000.0   # 100 steps: 10 ms each
  lines = run.table_lines([figure], [], _done(*run.PART_NAMES), "NVIDIA H200", "today")
  bound = next(line for line in lines if line.startswith("- train steps/s, scan (fp32) vs the"))
  assert "per iteration: measured 10 ms; 6.7 GFLOP, 4.8 GB accessed, 1000 kernel" in bound
  assert "FLOPs 0.1 ms at fp32" in bound and "memory 1 ms" in bound
  assert "launches 2 ms at 2 us each" in bound


def test_the_table_replaces_only_the_marked_block(tmp_path):
  path = tmp_path / "BENCHMARKS.md"
  path.write_text(f"intro\n{run.MARK_BEGIN}\nold\n{run.MARK_END}\noutro\n")
  run.update_markdown(str(path), ["| a |", "| b |"])
  assert path.read_text() == f"intro\n{run.MARK_BEGIN}\n| a |\n| b |\n{run.MARK_END}\noutro\n"


def _write_run(workdir, rows, total_steps=1000):
  workdir.mkdir()
  config = {"train": {"total_steps": total_steps},
            "curvature": {"enabled": True, "every_steps": 100},
            "eval": {"fid_every_steps": 500, "fid_num_samples": 10, "final_fid_num_samples": 50}}
  (workdir / "config.json").write_text(json.dumps(config))
  lines = [json.dumps(r) for r in rows]
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 3")   # a cut line


def test_a_cut_e2e_run_is_projected_from_the_rates_it_saw(tmp_path):
  rows = [{"step": s, "wall_time": 0.0, "time/steps_per_sec": 50.0,
           "time/compile_seconds": 10.0, "time/curvature_seconds": 0.5} for s in (100, 200)]
  _write_run(tmp_path / "no_fid", rows)
  summary = run.e2e_summary(str(tmp_path / "no_fid"), wall_s=20.0, completed=False)
  assert summary["steps_done"] == 200
  # By hand: 200 steps at 50/s is 4 s of training, 2 x 0.5 s of curvature, 10 s compile; the
  # rest of the 20 s wall is other. Left: 800 steps at 50/s (16 s) and 8 more curvature
  # measurements at 0.5 s (4 s), so 20 + 16 + 4 = 40 s. FID was never reached.
  assert (summary["train_s"], summary["curvature_s"], summary["other_s"]) == (4.0, 1.0, 5.0)
  assert summary["projected_s"] == pytest.approx(40.0, rel=1e-12)
  assert "FID not reached" in summary["projection"]
  figure = run.e2e_figure(summary, "cut")
  assert figure["unit"] == "s projected" and figure["lower_bound"]
  # A projection under the target cannot show it met; one over it shows a miss.
  assert run.comparisons()[-1].met(figure, None) is None

  rows.append({"step": 500, "wall_time": 0.0, "time/val/fid_milestone/sample_seconds": 3.0,
               "time/val/fid_milestone/inception_seconds": 1.0})
  _write_run(tmp_path / "fid", rows)
  summary = run.e2e_summary(str(tmp_path / "fid"), wall_s=100.0, completed=False)
  # By hand: 10 samples took 4 s (0.4 s each); left are 1 milestone of 10 and the final 50,
  # 24 s; 500 steps at 50/s, 10 s; 8 curvature measurements, 4 s: 100 + 24 + 10 + 4 = 138 s,
  # a lower bound over the 120 s target.
  assert summary["projected_s"] == pytest.approx(138.0, rel=1e-12)
  assert run.comparisons()[-1].met(run.e2e_figure(summary, "cut"), None) is False


@pytest.mark.slow
def test_train_figures_carry_their_program_cost():
  settings = measure.smoke_settings(tiny_config())
  figures = list(measure.bench_train(settings))
  assert [f.name for f in figures] == ["train_scan_fp32", "train_step_fp32"]
  for f in figures:
    assert f.value > 0 and f.compile_s > 0 and f.steady_ms > 0
    assert f.cost["flops"] > 0 and f.cost["launches_entry"] > 0
  # The scan keeps its loop: its body is one step's launches.
  assert figures[0].cost["iterations"] == settings.scan_length
  assert figures[0].cost["launches_loop_body"] > 0


@pytest.mark.parametrize("args, words", [
    (["--out", "x", "--budget-s", "0"], ["--budget-s", "> 0"]),
    (["--out", "x", "--parts", "train,nope"], ["nope", "choose from"]),
    (["--budget-s", "5"], ["--out is required"]),
    (["--out", "x", "--smoke", "--update-md", "BENCHMARKS.md"], ["--update-md", "not benchmark"]),
])
def test_bad_arguments_are_one_line(tmp_path, args, words):
  proc = subprocess.run([sys.executable, RUN, *args], cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
  assert_one_line_error(proc, *words)
  assert not (tmp_path / "x").exists()


def _smoke_env(cache_dir):
  return dict(os.environ, DIFFDYN_CACHE=cache_dir, PYTHONUNBUFFERED="1",
              TF_CPP_MIN_LOG_LEVEL="3")


@pytest.mark.slow
def test_a_short_budget_skips_the_parts_that_do_not_fit(tmp_path, cache_dir):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, RUN, "--smoke", "--budget-s", "20", "--out", str(out),
                         "--work", str(tmp_path / "work")], cwd=ROOT, env=_smoke_env(cache_dir),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  report = json.loads((out / "bench.json").read_text())
  parts = {p["name"]: p for p in report["parts"]}
  assert list(parts) == list(run.PART_NAMES)
  assert all(p["status"] in STATUSES - {"failed"} for p in parts.values()), parts
  # E6's smoke floor (25 s) exceeds the whole budget, so it is skipped however fast the rest.
  assert parts["e2e"]["status"] == "skipped" and "budget" in parts["e2e"]["reason"]
  assert all(parts[n]["status"] == "skipped" for n in run.PART_NAMES if n.startswith("peer"))
  assert report["notice"] == run.SMOKE_NOTICE
  table = (out / "table.md").read_text()
  assert table.startswith(f"**{run.SMOKE_NOTICE}.**")
  assert f"| e2e | skipped | 0.0 |  | {parts['e2e']['reason']} |" in table
  assert f"not measured: e2e skipped: {parts['e2e']['reason']}" in table
  assert "**no**" not in table and "| yes |" not in table   # smoke figures are not judged
  for f in report["figures"]:
    assert f["value"] > 0, f


def _children_of_run(work: str) -> list[int]:
  """Processes whose command line names `work`: the parts a run started."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if work.encode() in f.read():
          pids.append(int(pid))
    except OSError:   # it ended while being read
      continue
  return pids


@pytest.mark.slow
def test_a_killed_run_keeps_the_json_of_its_finished_parts(tmp_path, cache_dir):
  out, work = tmp_path / "out", str(tmp_path / "work")
  # 60 s: after the first part there is budget left, so the next part runs when it is killed.
  proc = subprocess.Popen([sys.executable, RUN, "--smoke", "--budget-s", "60", "--out",
                           str(out), "--work", work], cwd=ROOT, env=_smoke_env(cache_dir),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  try:
    report = None
    while proc.poll() is None:   # until the first part is recorded (no clock: a slow CPU waits)
      path = out / "bench.json"
      report = json.loads(path.read_text()) if path.exists() else None
      if report and report["parts"]:
        break
      time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  after = json.loads((out / "bench.json").read_text())   # whole: it is replaced, not rewritten
  assert after["parts"][:len(report["parts"])] == report["parts"]
  assert after["parts"][0]["name"] == "train" and after["parts"][0]["status"] in STATUSES
  measured = json.loads((tmp_path / "work" / "train.json").read_text())["figures"]
  kept = [f["name"] for f in after["figures"] if f["name"].startswith("train_")]
  assert kept == [f["name"] for f in measured]
  # The part running at the kill dies with the run (PR_SET_PDEATHSIG); wait for it to go.
  for _ in range(300):
    if not _children_of_run(work):
      break
    time.sleep(0.1)
  assert not _children_of_run(work)
