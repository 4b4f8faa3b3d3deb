"""bench/: the harness runs on a CPU and its table pairs diffdyn's figures with the peer's."""
import json

from bench import measure
from bench import run
from test_sweep import tiny_config


def _figure(name, value, unit, note=""):
  return {"name": name, "value": value, "unit": unit, "compile_s": 1.0, "steady_ms": 2.0,
          "memory_mb": 3.0, "note": note}


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
  rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ")
          for r in run.table_rows(figures, peers, "H100", "2026-01-01")[2:]}
  eager = rows["train steps/s, scan (fp32) vs the eager peer (AMP)"]
  assert eager[3:6] == ["40.00x", ">= 300 steps/s and >= 20x", "yes"]
  compiled = rows["train steps/s, scan (fp32) vs torch.compile (AMP)"]
  assert "reduce-overhead" in compiled[2] and compiled[3:6] == ["5.00x", ">= 6x", "**no**"]
  assert rows["Hutchinson measurement, peer's shape"][3] == "100.00x"  # 2 s against 20 ms
  assert rows["Hutchinson measurement in train steps"][3:6] == ["", "<= 3x", "**no**"]
  assert rows["E6 end to end, compile included"][5] == "yes"


def test_the_table_replaces_only_the_marked_block(tmp_path):
  path = tmp_path / "BENCHMARKS.md"
  path.write_text(f"intro\n{run.MARK_BEGIN}\nold\n{run.MARK_END}\noutro\n")
  run.update_markdown(str(path), ["| a |", "| b |"])
  assert path.read_text() == f"intro\n{run.MARK_BEGIN}\n| a |\n| b |\n{run.MARK_END}\noutro\n"


def test_smoke_figures_on_the_cpu(tmp_path):
  # The sweep tests' tiny config: its train and replicate scans are in the compile cache.
  settings = measure.smoke_settings(tiny_config())
  figures, analysis = run.run_diffdyn(settings, {"train", "replicates"})
  names = [f["name"] for f in figures]
  assert names == ["train_step_fp32", "train_scan_fp32", "replicates"]
  assert all(f["value"] > 0 and f["compile_s"] >= 0 for f in figures)
  assert analysis["fp32"]["flops"] > 0 and analysis["fp32"]["launches_per_step"] > 0
  rows = run.table_rows(figures, [], "cpu", "today", judge=False)
  assert len(rows) == 2 + 4   # header, rule, scan vs eager and vs compile, one step, replicates
  assert all("peer not run" in r for r in rows[2:5])
  json.dumps(analysis, default=str)
