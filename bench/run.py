"""diffdyn against its PyTorch peers, on one GPU, in one invocation.

  python bench/run.py --out OUT [--update-md bench/BENCHMARKS.md]
  python bench/run.py --out OUT --smoke          # everything tiny on a CPU: checks the harness

Order matters: the peer (bench/peers_torch.py) and the end-to-end E6 run go first, each in its
own process, before this process touches the GPU (JAX reserves most of its memory once it
starts). Then diffdyn's figures run here. OUT gets diffdyn.json, peers_torch.json, the E6
run's directory and table.md, the rows BENCHMARKS.md holds. `--parts` runs a subset and
`--merge DIR` adds figures an earlier invocation on the same machine wrote to DIR.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

PARTS = ("peer", "e2e", "train", "replicates", "hutchinson", "inception", "sampling")
PEER_SCRIPT = os.path.join(ROOT, "bench", "peers_torch.py")
MARK_BEGIN, MARK_END = "<!-- bench:table:begin -->", "<!-- bench:table:end -->"


# ----------------------------------------------------------------------------------------------
# The peer and the end-to-end run, each in a process of its own.
# ----------------------------------------------------------------------------------------------


def run_peer(out_dir: str, budget_s: float) -> tuple[list[dict], str]:
  """The peer's figures (peers_torch.json), and a note on how the run went."""
  env = dict(os.environ, OUT=out_dir, PEER_BUDGET_S=str(budget_s), PYTHONUNBUFFERED="1")
  log_path = os.path.join(out_dir, "peers_torch.log")
  with open(log_path, "w") as log_file:
    proc = subprocess.run([sys.executable, PEER_SCRIPT], env=env, stdout=log_file,
                          stderr=subprocess.STDOUT, timeout=budget_s + 600, check=False)
  result = os.path.join(out_dir, "peers_torch.json")
  if proc.returncode != 0 or not os.path.exists(result):
    with open(log_path) as f:
      lines = [line.strip() for line in f if line.strip()]
    return [], f"peer failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"
  with open(result) as f:
    return json.load(f), "peer ran"


def e2e_overrides(scale: float, weights_path: str) -> list[str]:
  """launch.py flags for E6 on synthetic data, its step and sample counts scaled by `scale`."""
  def scaled(n, least=2):
    return max(least, int(round(n * scale)))
  steps = scaled(10_000, 4)
  return [
      "--config=experiments/e6.py", "--config.data.name=synthetic",
      f"--config.data.synthetic_num_images={scaled(50_000, 64)}",
      f"--config.train.total_steps={steps}",
      f"--config.train.log_every_steps={scaled(100)}",
      f"--config.train.checkpoint_every_steps={scaled(1000)}",
      f"--config.curvature.every_steps={scaled(100)}",
      f"--config.eval.fid_every_steps={scaled(2000)}",
      f"--config.eval.fid_num_samples={scaled(10_000)}",
      f"--config.eval.final_fid_num_samples={scaled(50_000)}",
      f"--config.eval.sample_batch_size={min(500, scaled(10_000))}",
      f"--config.fid.batch_size={min(500, scaled(10_000))}",
      f"--config.fid.inception_weights={weights_path}",
  ]


def run_e2e(out_dir: str, scale: float, extra: list[str]) -> tuple[dict, str]:
  """E6 end to end in a fresh process with an empty compile cache: wall time and its parts."""
  from diffdyn.fid import weights  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bench import measure  # pylint: disable=import-outside-toplevel
  weights_path = os.path.join(out_dir, "seeded_inception.npz")
  with np.load(measure.FID_RECIPE) as recipe:
    weights.save_npz_state_dict(weights.seeded_state_dict(recipe), weights_path)
  workdir = os.path.join(out_dir, "e6_run")
  cache = tempfile.mkdtemp(prefix="diffdyn_bench_cache_")
  env = dict(os.environ, DIFFDYN_CACHE=cache, PYTHONUNBUFFERED="1")
  args = [sys.executable, os.path.abspath(__file__), "--e2e-child", "--",
          *e2e_overrides(scale, weights_path), f"--workdir={workdir}", *extra]
  start = time.perf_counter()
  with open(os.path.join(out_dir, "e2e.log"), "w") as log_file:
    proc = subprocess.run(args, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                          check=False)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    return {}, f"E6 run failed (exit {proc.returncode}); see e2e.log"
  return {"wall_s": wall, **_e2e_parts(workdir)}, "E6 ran"


def _e2e_parts(workdir: str) -> dict[str, float]:
  """Seconds spent in each part of the run, from its metrics.jsonl and the child's report."""
  parts = {"compile_s": 0.0, "train_s": 0.0, "curvature_s": 0.0, "sample_s": 0.0,
           "inception_s": 0.0}
  steps_per_sec = None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      parts["compile_s"] = row.get("time/compile_seconds", parts["compile_s"])
      steps_per_sec = row.get("time/steps_per_sec", steps_per_sec)
      parts["curvature_s"] += row.get("time/curvature_seconds", 0.0)
      for key, value in row.items():
        if key.endswith("sample_seconds"):
          parts["sample_s"] += value
        elif key.endswith("inception_seconds"):
          parts["inception_s"] += value
  with open(os.path.join(workdir, "config.json")) as f:
    total_steps = json.load(f)["train"]["total_steps"]
  parts["train_s"] = total_steps / steps_per_sec if steps_per_sec else float("nan")
  report = os.path.join(workdir, "bench_child.json")
  if os.path.exists(report):
    with open(report) as f:
      parts.update(json.load(f))
  return parts


def e2e_child(argv: list[str]) -> None:
  """Runs launch.py's main in this process, then records the allocator's peak."""
  import launch  # pylint: disable=import-outside-toplevel
  from bench import measure  # pylint: disable=import-outside-toplevel
  launch.main(["launch.py", *argv])
  workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
  with open(os.path.join(workdir, "bench_child.json"), "w") as f:
    json.dump({"peak_mb": measure.process_peak_mb()}, f)


# ----------------------------------------------------------------------------------------------
# diffdyn's figures, in this process.
# ----------------------------------------------------------------------------------------------


def run_diffdyn(settings, parts: set[str]) -> tuple[list[dict], dict]:
  """The in-process figures of `parts`, as dicts, and the train step's analysis."""
  from bench import measure  # pylint: disable=import-outside-toplevel
  figures, analysis = [], {}
  scan_rate, step_ms = None, None
  if parts & {"train", "replicates", "hutchinson"}:
    for precision in settings.precisions:
      train_figures, step_analysis = measure.bench_train(settings, precision)
      figures += train_figures
      analysis[precision] = step_analysis
      if precision == "fp32":
        scan_rate = train_figures[1].value
        step_ms = 1e3 / scan_rate
  if "replicates" in parts:
    figures.append(measure.bench_replicates(settings, scan_rate))
  if "hutchinson" in parts:
    figures += measure.bench_hutchinson(settings, step_ms)
  if "inception" in parts:
    figures += measure.bench_inception(settings)
  if "sampling" in parts:
    figures += [measure.bench_sampling(settings, p) for p in settings.precisions]
  analysis["process_peak_mb"] = measure.process_peak_mb()
  return [dataclasses.asdict(f) for f in figures], analysis


# ----------------------------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
  label: str
  ours: str                        # diffdyn figure name
  peers: tuple[str, ...] = ()      # peer figure names; the one diffdyn is least ahead of counts
  target: str = ""
  # (ours, peer or None) -> whether the target is met, or None where it cannot be judged.
  met: Callable[[dict, dict | None], bool | None] | None = None
  speedup: bool = True             # False: the figures are ratios themselves, shown side by side


def _speedup(ours: dict, peer: dict) -> float:
  """How many times faster diffdyn is: rates divide one way, times the other."""
  if peer["unit"].startswith("s/"):
    return peer["value"] * 1e3 / ours["value"]   # ours in ms
  return ours["value"] / peer["value"]


def _at_least(times: float) -> Callable[[dict, dict | None], bool | None]:
  return lambda o, p: None if p is None else _speedup(o, p) >= times


def comparisons() -> list[Comparison]:
  return [
      Comparison("train steps/s, scan (fp32) vs the eager peer (AMP)", "train_scan_fp32",
                 ("torch_train_bc32_b4_eager",), ">= 300 steps/s and >= 20x",
                 lambda o, p: o["value"] >= 300 and (p is None or _speedup(o, p) >= 20)),
      Comparison("train steps/s, scan (fp32) vs torch.compile (AMP)", "train_scan_fp32",
                 ("torch_train_bc32_b4_reduce-overhead", "torch_train_bc32_b4_default"), ">= 6x",
                 _at_least(6)),
      Comparison("train steps/s, scan (bf16) vs the eager peer (AMP)", "train_scan_bf16",
                 ("torch_train_bc32_b4_eager",)),
      Comparison("train steps/s, one step per dispatch (fp32)", "train_step_fp32",
                 ("torch_train_bc32_b4_eager",)),
      Comparison("train steps/s, one step per dispatch (bf16)", "train_step_bf16",
                 ("torch_train_bc32_b4_eager",)),
      Comparison("replicates in one program, wall time", "replicates", (), "<= 2x one run",
                 lambda o, p: o["value"] <= 2),
      Comparison("Hutchinson measurement, peer's shape", "hutchinson", ("torch_hutch16_bc32_b4",)),
      Comparison("Hutchinson measurement in train steps", "hutchinson_over_step",
                 ("torch_hutch16_over_step_bc32",), "<= 3x", lambda o, p: o["value"] <= 3,
                 speedup=False),
      Comparison("Hutchinson measurement, E6's shape", "hutchinson_e6"),
      Comparison("Inception features (default precision)", "inception_default",
                 ("torch_pytorchfid_inception_fp32",), ">= 3x, at parity", _at_least(3)),
      Comparison("Inception features (precision highest)", "inception_highest",
                 ("torch_pytorchfid_inception_fp32",)),
      Comparison("DDPM sampling (bf16)", "sampling_bf16",
                 ("torch_ddpm50_sample_bc32_b1000_fp16",), ">= 10x", _at_least(10)),
      Comparison("DDPM sampling (fp32)", "sampling_fp32",
                 ("torch_ddpm50_sample_bc32_b1000_fp16",), ">= 10x", _at_least(10)),
      Comparison("E6 end to end, compile included", "e2e_e6", (), "<= 120 s",
                 lambda o, p: o["value"] <= 120),
  ]


def _fmt(value, digits=3) -> str:
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"


def table_rows(figures: list[dict], peers: list[dict], device: str, date: str,
               judge: bool = True) -> list[str]:
  """Markdown rows, one per comparison whose diffdyn figure was measured.

  Smoke figures (`judge=False`) are not held to the targets: their shapes are not the target's.
  """
  ours = {f["name"]: f for f in figures}
  theirs = {p["name"]: p for p in peers if p.get("value")}
  rows = ["| figure | diffdyn | peer | diffdyn / peer | target | met | compile s | "
          "steady ms | program MiB | how | device | date |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for c in comparisons():
    if c.ours not in ours:
      continue
    o = ours[c.ours]
    candidates = [theirs[name] for name in c.peers if name in theirs]
    if candidates and c.speedup:
      peer = min(candidates, key=lambda p: _speedup(o, p))
    else:
      peer = candidates[0] if candidates else None
    if peer is None:
      ratio = "peer not run" if c.peers else ""
    else:
      ratio = f"{_speedup(o, peer):.2f}x" if c.speedup else ""
    met = c.met(o, peer) if c.met is not None and judge else None
    met_text = {True: "yes", False: "**no**", None: ""}[met]
    peer_text = f"{_fmt(peer['value'])} {peer['unit']} ({peer['name']})" if peer else ""
    rows.append(f"| {c.label} | {_fmt(o['value'])} {o['unit']} | {peer_text} | {ratio} | "
                f"{c.target} | {met_text} | {_fmt(o['compile_s'])} | {_fmt(o['steady_ms'])} | "
                f"{_fmt(o['memory_mb'])} | {o['note']} | {device} | {date} |")
  return rows


def e2e_figure(result: dict) -> dict:
  note = ", ".join(f"{k} {v:.1f}" for k, v in result.items()
                   if k not in ("wall_s", "peak_mb") and v is not None)
  return {"name": "e2e_e6", "value": result["wall_s"], "unit": "s", "compile_s":
          result.get("compile_s"), "steady_ms": None, "memory_mb": result.get("peak_mb"),
          "note": note}


def update_markdown(path: str, rows: list[str]) -> None:
  """Replaces the table between the markers in `path` with `rows`."""
  with open(path) as f:
    text = f.read()
  if MARK_BEGIN not in text or MARK_END not in text:
    raise SystemExit(f"error: {path} has no {MARK_BEGIN} ... {MARK_END} block to fill")
  head, rest = text.split(MARK_BEGIN, 1)
  _, tail = rest.split(MARK_END, 1)
  with open(path, "w") as f:
    f.write(head + MARK_BEGIN + "\n" + "\n".join(rows) + "\n" + MARK_END + tail)


def _read_json(path: str, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="directory for the results")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"comma-separated subset of {','.join(PARTS)}")
  parser.add_argument("--merge", nargs="*", default=[],
                      help="earlier --out directories whose figures join this table")
  parser.add_argument("--e2e-scale", type=float, default=None,
                      help="scale E6's steps and sample counts (default 1, smoke 0.001)")
  parser.add_argument("--peer-budget", type=float, default=420.0, help="PEER_BUDGET_S")
  parser.add_argument("--update-md", default="", help="BENCHMARKS.md whose table to replace")
  parser.add_argument("--e2e-child", action="store_true", help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)
  if args.e2e_child:
    e2e_child([a for a in rest if a != "--"])
    return 0
  parts = set(args.parts.split(","))
  unknown = parts - set(PARTS)
  if unknown:
    parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
  os.makedirs(args.out, exist_ok=True)
  settings_name = "smoke" if args.smoke else "full"
  notes = []

  peers = []
  if "peer" in parts:
    peers, note = run_peer(args.out, args.peer_budget)
    notes.append(note)
  figures = []
  if "e2e" in parts:
    scale = args.e2e_scale if args.e2e_scale is not None else (0.001 if args.smoke else 1.0)
    extra = e2e_smoke_flags() if args.smoke else []
    result, note = run_e2e(args.out, scale, extra)
    notes.append(note)
    if result:
      figures.append(e2e_figure(result))

  import jax  # pylint: disable=import-outside-toplevel
  from bench import measure  # pylint: disable=import-outside-toplevel
  settings = measure.smoke_settings() if args.smoke else measure.full_settings()
  in_process, analysis = run_diffdyn(settings, parts)
  figures += in_process
  device = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  for directory in args.merge:
    earlier = _read_json(os.path.join(directory, "diffdyn.json"), {})
    figures += [f for f in earlier.get("figures", []) if f["name"] not in
                {g["name"] for g in figures}]
    peers = peers or _read_json(os.path.join(directory, "peers_torch.json"), [])
  result = {"device": device, "date": date, "settings": settings_name, "notes": notes,
            "figures": figures, "analysis": analysis}
  with open(os.path.join(args.out, "diffdyn.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  rows = table_rows(figures, peers, device, date, judge=not args.smoke)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write("\n".join(rows) + "\n")
  print("\n".join(rows))
  for note in notes:
    print(f"note: {note}")
  if args.update_md:
    update_markdown(args.update_md, rows)
  return 0


def e2e_smoke_flags() -> list[str]:
  """The E6 run shrunk to the smoke config's model and images, so a CPU finishes it."""
  return ["--config.data.image_size=16", "--config.model.image_size=16",
          "--config.model.base_channels=8", "--config.model.channel_mult=(1, 2)",
          "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=(8,)",
          "--config.diffusion.num_timesteps=100", "--config.curvature.num_probes=2",
          "--config.curvature.batch_size=4", "--config.eval.nfe=2", "--config.eval.grid_nfe=2",
          "--config.eval.grid_num_samples=4"]


if __name__ == "__main__":
  sys.exit(main())
