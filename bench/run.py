"""diffdyn against its PyTorch peers on one GPU: one command, one time budget.

  python bench/run.py --budget-s 420 --out OUT [--update-md bench/BENCHMARKS.md]
  python bench/run.py --smoke --budget-s 60 --out OUT      # every part tiny, on a CPU

The parts (PARTS) run one after another in a fixed priority order, each in a process of its
own that is killed, with everything it started, at the part's time cap or when the budget
runs out, whichever comes first. A part is not started when less of the budget is left than
it needs at the least; it is reported as skipped, with the reason. OUT/bench.json and
OUT/table.md are rewritten after every part, so a run cut short keeps every part it finished
(and what a cut part had measured). Each part's process starts with the GPU to itself: JAX
and torch each take most of its memory when they start.

`--parts` runs a subset, `--merge DIR` adds the figures of an earlier run on the same machine
to the table, `--work` is where the parts' logs and the E6 run go (default: a new temporary
directory, named in bench.json). The smoke run's figures check the harness only: they are
not benchmark results (with DIFFDYN_CACHE set, its compile seconds may be cache reads).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench import hlo  # pylint: disable=wrong-import-position  (no JAX: the GPU stays free)

PEER_SCRIPT = os.path.join(ROOT, "bench", "peers_torch.py")
PEER_NO_CUDA_EXIT = 3   # peers_torch.py's exit status without a CUDA device
MARK_BEGIN, MARK_END = "<!-- bench:table:begin -->", "<!-- bench:table:end -->"
SMOKE_NOTICE = ("CPU smoke run: tiny shapes that check the harness; these figures are not "
                "benchmark results (not measured on a GPU)")
E2E_TARGET_S = 120.0
# E6 shrunk for the CPU smoke run, as --config.* overrides (launch.py gets them as flags):
# 8x8 images, a one-level width-8 UNet, 100 timesteps, two probes and samples.
SMOKE_OVERRIDES = {
    "data.synthetic_num_images": 64, "data.image_size": 8, "model.image_size": 8,
    "model.base_channels": 8, "model.channel_mult": (1,), "model.num_res_blocks": 1,
    "model.attn_resolutions": (), "diffusion.num_timesteps": 100,
    # DDPM's betas scaled by 1000/T, as validation asks of a 100-step linear schedule.
    "diffusion.beta_start": 1e-3, "diffusion.beta_end": 0.2, "curvature.num_probes": 2,
    "curvature.batch_size": 2, "eval.grid_num_samples": 2, "eval.grid_nfe": 2,
    "eval.sample_batch_size": 2,
}


@dataclasses.dataclass(frozen=True)
class Part:
  name: str
  side: str            # "diffdyn", "peer" (bench/peers_torch.py) or "e2e"
  cap_s: float         # the most it may run
  least_s: float       # not started with less of the budget left
  smoke_cap_s: float
  smoke_least_s: float
  peer_parts: str = ""   # PEER_PARTS of a peer part


# The priority order. GPU caps and floors are estimates for an H200 (compiles of tens
# of seconds; the peer's times from shared/bench/README.md); smoke floors are what each part
# took at least on a 2-core CPU, so that a short smoke budget skips rather than cuts.
PARTS = (
    Part("train", "diffdyn", 150, 60, 40, 8),
    Part("replicates", "diffdyn", 75, 30, 30, 5),
    Part("hutchinson", "diffdyn", 75, 30, 30, 6),
    Part("peer_train", "peer", 150, 30, 30, 5, "train"),
    Part("peer_hutchinson", "peer", 45, 20, 30, 5, "hutch"),
    Part("sampling", "diffdyn", 75, 25, 30, 5),
    Part("peer_sampling", "peer", 40, 15, 30, 5, "sampling"),
    Part("inception", "diffdyn", 60, 25, 40, 10),
    Part("peer_inception", "peer", 30, 10, 30, 5, "inception"),
    Part("e2e", "e2e", 600, 30, 600, 25),
)
PART_NAMES = tuple(p.name for p in PARTS)


# ----------------------------------------------------------------------------------------------
# Running a part's process.
# ----------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
  """In the child: a kill of the orchestrator, even SIGKILL, takes this process with it."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass   # not Linux: the child outlives a SIGKILL of the orchestrator


def _kill_group(pid: int) -> None:
  try:
    os.killpg(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run_process(cmd: list[str], env: dict, cap_s: float, log_path: str) -> int | None:
  """Runs `cmd` in a process group of its own; its exit status, or None if cut at `cap_s`.

  The group is killed when the command returns too, so nothing it started (torch.compile's
  workers, say) runs on into the next part.
  """
  with open(log_path, "w") as log_file:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent)
    try:
      return proc.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
      return None
    finally:
      _kill_group(proc.pid)
      proc.wait()


def last_line(path: str) -> str:
  if not os.path.exists(path):
    return "no output"
  with open(path, errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[-1][:300] if lines else "no output"


def _write_json(path: str, value) -> None:
  """Replaces `path` whole: a kill mid-write leaves the previous version."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1, default=str)
  os.replace(path + ".tmp", path)


def _read_json(path: str, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------
# diffdyn's parts, each in a child process: `run.py --part NAME --work DIR`.
# ----------------------------------------------------------------------------------------------


def _figure_value(figures: list[dict], name: str) -> float | None:
  return next((f["value"] for f in figures if f["name"] == name), None)


def smoke_config():
  """The config of the smoke run's parts: E6 with SMOKE_OVERRIDES."""
  from bench import measure  # pylint: disable=import-outside-toplevel
  config = measure.e6_config()
  for key, value in SMOKE_OVERRIDES.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def part_child(name: str, work: str, smoke: bool) -> None:
  """Runs diffdyn's part `name`, rewriting WORK/NAME.json after every figure."""
  from bench import measure  # pylint: disable=import-outside-toplevel
  if smoke and os.environ.get("DIFFDYN_CACHE"):
    from diffdyn import io  # pylint: disable=import-outside-toplevel
    io.enable_compilation_cache()   # smoke only: a second smoke run reuses the first's compiles
  settings = measure.smoke_settings(smoke_config()) if smoke else measure.full_settings()
  train_figures = _read_json(os.path.join(work, "train.json"), {}).get("figures", [])
  scan_rate = _figure_value(train_figures, "train_scan_fp32")
  figures = {
      "train": lambda: measure.bench_train(settings),
      "replicates": lambda: measure.bench_replicates(settings, scan_rate),
      "hutchinson": lambda: measure.bench_hutchinson(settings,
                                                     scan_rate and 1e3 / scan_rate),
      "sampling": lambda: measure.bench_sampling(settings),
      "inception": lambda: measure.bench_inception(settings),
  }[name]()
  path = os.path.join(work, f"{name}.json")
  report = {"device": measure.device_kind(), "figures": []}
  _write_json(path, report)
  for figure in figures:
    report["figures"].append(dataclasses.asdict(figure))
    report["process_peak_mb"] = measure.process_peak_mb()
    _write_json(path, report)
    print(f"{figure.name}: {figure.value:.4g} {figure.unit}", flush=True)


# ----------------------------------------------------------------------------------------------
# E6 end to end: launch.py in a child process with an empty compile cache, cut at its cap.
# ----------------------------------------------------------------------------------------------


def e2e_flags(smoke: bool, weights_path: str) -> list[str]:
  """launch.py's flags: E6 on synthetic CIFAR-sized data, or smoke-sized without FID.

  TensorBoard is off: it needs TensorFlow, which the GPU image lacks; metrics.jsonl, which
  the phases are read from, is written either way.
  """
  flags = ["--config=experiments/e6.py", "--config.data.name=synthetic",
           "--config.train.tensorboard=False"]
  if not smoke:
    return flags + ["--config.data.synthetic_num_images=50000",
                    f"--config.fid.inception_weights={weights_path}"]
  return flags + [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
                  for k, v in SMOKE_OVERRIDES.items()] + ["--config.fid.enabled=False"]


def e2e_child(argv: list[str]) -> None:
  """Runs launch.py's main in this process, then records the allocator's peak."""
  import launch  # pylint: disable=import-outside-toplevel
  from bench import measure  # pylint: disable=import-outside-toplevel
  launch.main(["launch.py", *argv])
  workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
  with open(os.path.join(workdir, "bench_child.json"), "w") as f:
    json.dump({"peak_mb": measure.process_peak_mb()}, f)


def run_e2e(work: str, smoke: bool, cap_s: float) -> tuple[str, str, dict]:
  """(status, reason, summary) of E6 end to end, stopped at `cap_s` (its setup included)."""
  setup_start = time.monotonic()
  weights_path = ""
  if not smoke:
    import numpy as np  # pylint: disable=import-outside-toplevel
    from diffdyn.fid import weights  # pylint: disable=import-outside-toplevel  (numpy only)
    weights_path = os.path.join(work, "seeded_inception.npz")
    with np.load(os.path.join(ROOT, "tests", "fixtures", "fid_parity.npz")) as recipe:
      weights.save_npz_state_dict(weights.seeded_state_dict(recipe), weights_path)
  workdir = os.path.join(work, "e6_run")
  env = dict(os.environ, DIFFDYN_CACHE=tempfile.mkdtemp(prefix="e6_cache_", dir=work),
             PYTHONUNBUFFERED="1")
  cmd = [sys.executable, os.path.abspath(__file__), "--e2e-child", "--",
         *e2e_flags(smoke, weights_path), f"--workdir={workdir}"]
  cap_s = max(cap_s - (time.monotonic() - setup_start), 1.0)
  start = time.monotonic()
  code = run_process(cmd, env, cap_s, os.path.join(work, "e2e.log"))
  wall = time.monotonic() - start
  if code not in (0, None):
    return "failed", f"exit {code}: {last_line(os.path.join(work, 'e2e.log'))}", {}
  summary = e2e_summary(workdir, wall, completed=code == 0)
  if code is None:
    return "cut", f"stopped at its cap of {cap_s:.0f} s", summary
  return "done", "", summary


def _metrics_rows(workdir: str) -> list[dict]:
  rows = []
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break   # the line a kill cut short
  return rows


def e2e_summary(workdir: str, wall_s: float, completed: bool) -> dict:
  """Steps done, seconds per phase and, for a run stopped early, the projected total.

  Phases come from metrics.jsonl: the train scan's compile, training (steps / steps per s),
  curvature, sampling and Inception; `other_s` is the rest of the wall time (process start,
  data, reference statistics, the other compiles, checkpoints). The projection adds the work
  left at the rates seen: the remaining steps, curvature measurements and FID samples (the
  latter only once one FID evaluation was seen). Checkpoints and sample grids still to come
  are left out, so it is a lower bound.
  """
  rows = _metrics_rows(workdir)
  config = _read_json(os.path.join(workdir, "config.json"), {})
  tr, cc, ev = config.get("train", {}), config.get("curvature", {}), config.get("eval", {})

  def last(key):
    return next((r[key] for r in reversed(rows) if key in r), None)

  steps_done = max((r["step"] for r in rows), default=0)
  steps_per_s = last("time/steps_per_sec")
  curvature = [r["time/curvature_seconds"] for r in rows if "time/curvature_seconds" in r]
  fid = {"sample": [], "inception": []}
  for row in rows:
    for key, value in row.items():
      for kind in fid:
        if key.startswith("time/") and key.endswith(f"{kind}_seconds"):
          fid[kind].append((key.split("/")[1], value))
  phases = {"compile_s": last("time/compile_seconds") or 0.0,
            "train_s": steps_done / steps_per_s if steps_per_s else 0.0,
            "curvature_s": sum(curvature),
            "sample_s": sum(v for _, v in fid["sample"]),
            "inception_s": sum(v for _, v in fid["inception"])}
  phases["other_s"] = wall_s - sum(phases.values())
  out = {"wall_s": wall_s, "completed": completed, "steps_done": steps_done,
         "total_steps": tr.get("total_steps"), "steps_per_s": steps_per_s, **phases}
  peak = _read_json(os.path.join(workdir, "bench_child.json"), {}).get("peak_mb")
  out["peak_mb"] = peak
  if completed:
    out["projected_s"] = wall_s
    return out
  if not steps_per_s or not tr:
    out["projected_s"], out["projection"] = None, "cut before the first log step: no rate seen"
    return out
  total = tr["total_steps"]
  left = (total - steps_done) / steps_per_s
  notes = []
  if cc.get("enabled") and curvature:
    left += (total // cc["every_steps"] - len(curvature)) * sum(curvature) / len(curvature)
  elif cc.get("enabled"):
    notes.append("no curvature measurement seen: curvature is left out")
  fid_note = "FID not reached: its sampling and Inception are left out"
  if fid["sample"]:
    per_image = (phases["sample_s"] + phases["inception_s"]) / _fid_images_seen(fid, ev)
    milestones = total // ev["fid_every_steps"]
    seen = sum(1 for prefix, _ in fid["sample"] if prefix == "val")
    left += per_image * ((milestones - seen) * ev["fid_num_samples"]
                         + ev["final_fid_num_samples"])
    fid_note = "FID at the rate of the evaluations seen"
  notes += [fid_note, "checkpoints and grids left out"]
  out["projected_s"] = wall_s + left
  out["projection"] = ("lower bound: the wall time so far plus the work left at the rates "
                       f"seen ({'; '.join(notes)})")
  return out


def _fid_images_seen(fid: dict, ev: dict) -> int:
  return sum(ev["fid_num_samples"] if prefix == "val" else ev["final_fid_num_samples"]
             for prefix, _ in fid["sample"])


def e2e_figure(summary: dict, status: str) -> dict | None:
  """The table's E6 figure: the wall time, or the projection of a run that was cut."""
  value = summary.get("wall_s") if summary.get("completed") else summary.get("projected_s")
  if value is None:
    return None
  phases = ", ".join(f"{k[:-2]} {summary[k]:.1f} s" for k in
                     ("compile_s", "train_s", "curvature_s", "sample_s", "inception_s",
                      "other_s"))
  note = f"{summary['steps_done']} of {summary['total_steps']} steps; {phases}"
  if status == "cut":
    note = (f"cut after {summary['wall_s']:.0f} s, projected ({summary['projection']}); "
            + note)
  return {"name": "e2e_e6", "value": value, "unit": "s" if status == "done" else "s projected",
          "compile_s": summary.get("compile_s"), "steady_ms": None,
          "memory_mb": summary.get("peak_mb"), "note": note, "cost": None,
          "lower_bound": status == "cut"}


# ----------------------------------------------------------------------------------------------
# The orchestrator.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
  """bench.json: what every part did and every figure it measured."""
  smoke: bool
  budget_s: float
  work: str
  started: str
  date: str = dataclasses.field(default_factory=lambda: datetime.date.today().isoformat())
  notice: str = ""
  device: str = ""
  parts: list[dict] = dataclasses.field(default_factory=list)
  figures: list[dict] = dataclasses.field(default_factory=list)
  peers: list[dict] = dataclasses.field(default_factory=list)
  e2e: dict = dataclasses.field(default_factory=dict)
  process_peak_mb: dict = dataclasses.field(default_factory=dict)
  elapsed_s: float = 0.0


def run_part(part: Part, work: str, smoke: bool, cap_s: float, report: Report) -> tuple[str, str]:
  """Runs one part within `cap_s`, adds what it measured to `report`; (status, reason)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if not smoke:
    env.pop("DIFFDYN_CACHE", None)   # compile seconds are real compiles, not cache reads
  log_path = os.path.join(work, f"{part.name}.log")
  if part.side == "e2e":
    status, reason, summary = run_e2e(work, smoke, cap_s)
    report.e2e = summary
    figure = e2e_figure(summary, status)
    if figure:
      report.figures.append(figure)
    return status, reason
  if part.side == "peer":
    out = os.path.join(work, part.name)
    os.makedirs(out, exist_ok=True)
    env.update(OUT=out, PEER_QUICK="1", PEER_PARTS=part.peer_parts)
    code = run_process([sys.executable, PEER_SCRIPT], env, cap_s, log_path)
    report.peers += _read_json(os.path.join(out, "peers_torch.json"), [])
    if code == PEER_NO_CUDA_EXIT:
      return "skipped", "no CUDA device: the peer runs only on a GPU"
  else:
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part.name, "--work", work]
    code = run_process(cmd + (["--smoke"] if smoke else []), env, cap_s, log_path)
    measured = _read_json(os.path.join(work, f"{part.name}.json"), {})
    report.figures += measured.get("figures", [])
    report.device = report.device or measured.get("device", "")
    report.process_peak_mb[part.name] = measured.get("process_peak_mb")
  if code is None:
    return "cut", f"stopped at its cap of {cap_s:.0f} s (the figures it finished are kept)"
  if code != 0:
    return "failed", f"exit {code}: {last_line(log_path)}"
  return "done", ""


def peer_unavailable() -> str:
  """Why the peer cannot run here, or "" (a missing CUDA device shows when it starts)."""
  missing = [m for m in ("torch", "diffusers", "pytorch_fid")
             if importlib.util.find_spec(m) is None]
  if missing:
    return (f"{', '.join(missing)} not installed: the peer needs torch with CUDA, diffusers "
            "and pytorch-fid")
  return ""


def derived_peer_figures(peers: list[dict]) -> list[dict]:
  """The peer's Hutchinson in train steps, where its two parts ran in separate processes."""
  names = {p["name"]: p for p in peers}
  hutch, step = names.get("torch_hutch16_bc32_b4"), names.get("torch_train_bc32_b4_eager")
  if "torch_hutch16_over_step_bc32" in names or not (hutch and step):
    return []
  return [{"name": "torch_hutch16_over_step_bc32", "value": hutch["value"] * step["value"],
           "unit": "x train step",
           "derived": "torch_hutch16_bc32_b4 x torch_train_bc32_b4_eager, same run"}]


def run_all(parts: list[str], out: str, work: str, smoke: bool, budget_s: float,
            merge: list[str]) -> Report:
  """Runs `parts` in PARTS's order within `budget_s`, writing OUT's files after each."""
  start = time.monotonic()
  report = Report(smoke=smoke, budget_s=budget_s, work=work,
                  started=datetime.datetime.now().isoformat(timespec="seconds"),
                  notice=SMOKE_NOTICE if smoke else "")
  for part in PARTS:
    left = budget_s - (time.monotonic() - start)
    least, cap = ((part.smoke_least_s, part.smoke_cap_s) if smoke
                  else (part.least_s, part.cap_s))
    began = time.monotonic()
    unavailable = peer_unavailable() if part.side == "peer" else ""
    if part.name not in parts:
      status, reason = "skipped", "not in --parts"
    elif unavailable:
      status, reason = "skipped", unavailable
    elif left < least:
      status, reason = "skipped", (f"budget: {max(left, 0):.0f} s left of {budget_s:.0f}, "
                                   f"the part needs at least {least:.0f} s")
    else:
      cap = min(cap, left)
      print(f"[{time.monotonic() - start:5.0f} s] {part.name}: up to {cap:.0f} s", flush=True)
      status, reason = run_part(part, work, smoke, cap, report)
    report.parts.append({"name": part.name, "status": status, "reason": reason,
                         "seconds": round(time.monotonic() - began, 1),
                         "cap_s": None if status == "skipped" else round(cap, 1)})
    print(f"[{time.monotonic() - start:5.0f} s] {part.name}: {status}"
          + (f" ({reason})" if reason else ""), flush=True)
    report.elapsed_s = round(time.monotonic() - start, 1)
    write_outputs(report, out, merge)
  return report


def write_outputs(report: Report, out: str, merge: list[str], update_md: str = "") -> list[str]:
  """bench.json and table.md (and the BENCHMARKS.md block, if asked); returns the table."""
  _write_json(os.path.join(out, "bench.json"), dataclasses.asdict(report))
  figures, peers = list(report.figures), report.peers + derived_peer_figures(report.peers)
  for directory in merge:
    earlier = _read_json(os.path.join(directory, "bench.json"), {})
    have = {f["name"] for f in figures + peers}
    figures += [f for f in earlier.get("figures", []) if f["name"] not in have]
    peers += [p for p in earlier.get("peers", []) if p["name"] not in have]
  statuses = {p["name"]: p for p in report.parts}
  lines = table_lines(figures, peers, statuses, report.device or "unknown device", report.date,
                      judge=not report.smoke)
  if report.smoke:
    lines = [f"**{SMOKE_NOTICE}.**", ""] + lines
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  if update_md:
    update_markdown(update_md, lines)
  return lines


# ----------------------------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
  label: str
  ours: str                        # diffdyn figure name
  part: str                        # the part that measures it
  peers: tuple[str, ...] = ()      # peer figure names; the one diffdyn is least ahead of counts
  peer_part: str = ""
  target: str = ""
  # (ours, peer or None) -> whether the target is met, or None where it cannot be judged.
  met: Callable[[dict, dict | None], bool | None] | None = None
  speedup: bool = True             # False: the figures are ratios themselves, shown side by side
  bound_by: str = ""               # the figure whose program bounds a miss (default: ours)


def _speedup(ours: dict, peer: dict) -> float:
  """How many times faster diffdyn is: rates divide one way, times the other."""
  if peer["unit"].startswith("s/"):
    return peer["value"] * 1e3 / ours["value"]   # ours in ms
  return ours["value"] / peer["value"]


def _at_least(times: float) -> Callable[[dict, dict | None], bool | None]:
  return lambda o, p: None if p is None else _speedup(o, p) >= times


def _e2e_met(ours: dict, peer: dict | None) -> bool | None:
  del peer
  if ours.get("lower_bound"):   # a cut run's projection: it can only show a miss
    return False if ours["value"] > E2E_TARGET_S else None
  return ours["value"] <= E2E_TARGET_S


def comparisons() -> list[Comparison]:
  eager = ("torch_train_bc32_b4_eager",)
  compiled = ("torch_train_bc32_b4_reduce-overhead", "torch_train_bc32_b4_default")
  sampler = ("torch_ddpm50_sample_bc32_b1000_fp16",)
  inception = ("torch_pytorchfid_inception_fp32",)
  return [
      Comparison("train steps/s, scan (fp32) vs the eager peer (AMP)", "train_scan_fp32",
                 "train", eager, "peer_train", ">= 300 steps/s and >= 20x",
                 lambda o, p: o["value"] >= 300 and (p is None or _speedup(o, p) >= 20)),
      Comparison("train steps/s, scan (fp32) vs torch.compile (AMP)", "train_scan_fp32",
                 "train", compiled, "peer_train", ">= 6x", _at_least(6)),
      Comparison("train steps/s, scan (bf16) vs the eager peer (AMP)", "train_scan_bf16",
                 "train", eager, "peer_train"),
      Comparison("train steps/s, one step per dispatch (fp32)", "train_step_fp32", "train",
                 eager, "peer_train"),
      Comparison("train steps/s, one step per dispatch (bf16)", "train_step_bf16", "train",
                 eager, "peer_train"),
      Comparison("replicates in one program, wall time", "replicates", "replicates",
                 target="<= 2x one run", met=lambda o, p: o["value"] <= 2,
                 bound_by="replicate_steps"),
      Comparison("replicates in one program, throughput", "replicate_steps", "replicates"),
      Comparison("Hutchinson measurement, peer's shape", "hutchinson", "hutchinson",
                 ("torch_hutch16_bc32_b4",), "peer_hutchinson"),
      Comparison("Hutchinson measurement in train steps", "hutchinson_over_step", "hutchinson",
                 ("torch_hutch16_over_step_bc32",), "peer_hutchinson", "<= 3x",
                 lambda o, p: o["value"] <= 3, speedup=False, bound_by="hutchinson"),
      Comparison("Hutchinson measurement, E6's shape", "hutchinson_e6", "hutchinson"),
      Comparison("DDPM sampling (bf16)", "sampling_bf16", "sampling", sampler, "peer_sampling",
                 ">= 10x", _at_least(10)),
      Comparison("DDPM sampling (fp32)", "sampling_fp32", "sampling", sampler, "peer_sampling",
                 ">= 10x", _at_least(10)),
      Comparison("Inception features (default precision)", "inception_default", "inception",
                 inception, "peer_inception", ">= 3x, at parity", _at_least(3)),
      Comparison("Inception features (precision highest)", "inception_highest", "inception",
                 inception, "peer_inception"),
      Comparison("E6 end to end, compile included", "e2e_e6", "e2e", target="<= 120 s",
                 met=_e2e_met),
  ]


def _fmt(value, digits=3) -> str:
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _not_measured(part: str, statuses: dict) -> str:
  state = statuses.get(part)
  if state is None:
    return f"not measured: {part} not run"
  if state["status"] == "done":
    return f"not measured: not among {part}'s figures"
  reason = f": {state['reason']}" if state["reason"] else ""
  return f"not measured: {part} {state['status']}{reason}"


def table_lines(figures: list[dict], peers: list[dict], statuses: dict, device: str, date: str,
                judge: bool = True) -> list[str]:
  """The markdown table (one row per comparison), the parts, and bounds for missed targets.

  Smoke figures (`judge=False`) are not held to the targets: their shapes are not the target's.
  """
  ours = {f["name"]: f for f in figures}
  theirs = {p["name"]: p for p in peers if p.get("value")}
  rows = ["| figure | diffdyn | peer | diffdyn / peer | target | met | compile s | "
          "steady ms | program MiB | how | device | date |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  missed = []
  for c in comparisons():
    if c.ours not in ours:
      rows.append(f"| {c.label} | {_not_measured(c.part, statuses)} | | | {c.target} | | | | | "
                  f"| {device} | {date} |")
      continue
    o = ours[c.ours]
    candidates = [theirs[name] for name in c.peers if name in theirs]
    if candidates and c.speedup:
      peer = min(candidates, key=lambda p: _speedup(o, p))
    else:
      peer = candidates[0] if candidates else None
    if peer is None:
      peer_text = _not_measured(c.peer_part, statuses) if c.peers else ""
      ratio = ""
    else:
      peer_text = f"{_fmt(peer['value'])} {peer['unit']} ({peer['name']})"
      ratio = f"{_speedup(o, peer):.2f}x" if c.speedup else ""
    met = c.met(o, peer) if c.met is not None and judge else None
    if met is False:
      missed.append((c, o))
    met_text = {True: "yes", False: "**no**", None: ""}[met]
    rows.append(f"| {c.label} | {_fmt(o['value'])} {o['unit']} | {peer_text} | {ratio} | "
                f"{c.target} | {met_text} | {_fmt(o['compile_s'])} | {_fmt(o['steady_ms'])} | "
                f"{_fmt(o['memory_mb'])} | {o['note']} | {device} | {date} |")
  rows += ["", "| part | status | seconds | cap s | reason |", "|---|---|---|---|---|"]
  rows += [f"| {p['name']} | {p['status']} | {p['seconds']} | {_fmt(p['cap_s'])} | "
           f"{p['reason']} |" for p in statuses.values()]
  if missed:
    rows += ["", "Bounds on the missed targets (XLA's counts of the program on this device):", ""]
    rows += [f"- {c.label}: {miss_bound(ours.get(c.bound_by or c.ours, o), device)}"
             for c, o in missed]
  return rows


def miss_bound(figure: dict, device: str) -> str:
  """The launch and FLOP counts that bound a figure's program, and the floors they set."""
  if figure["name"] == "e2e_e6":
    return f"its phases: {figure['note']}"
  cost = figure.get("cost")
  if not cost:
    return f"no program analysis for {figure['name']}"
  loop = cost["iterations"] > 1
  unit = "iteration" if loop else "call"
  launches = cost.get("launches_loop_body") if loop else (
      cost.get("launches_entry", 0) + cost.get("launches_loop_body", 0) if "launches_entry" in cost
      else None)
  measured_ms = figure["steady_ms"] / cost["iterations"]
  text = (f"{figure['name']}, per {unit}: measured {measured_ms:.3g} ms; "
          f"{cost['flops'] / 1e9:.3g} GFLOP, {cost['bytes'] / 1e9:.3g} GB accessed")
  if launches is not None:
    text += f", {launches} kernel launches"
  machines = hlo.machines(device)
  if not machines:
    return text + f" (no peak rates known for {device}: no floors)"
  floors = {k: hlo.floors_ms(cost["flops"], cost["bytes"], launches or 0, m)
            for k, m in machines.items()}
  text += (f". Floors: FLOPs {floors['fp32']['flops_ms']:.3g} ms at fp32, "
           f"{floors['tf32']['flops_ms']:.3g} at TF32, {floors['bf16']['flops_ms']:.3g} at bf16; "
           f"memory {floors['fp32']['bytes_ms']:.3g} ms")
  if launches is not None:
    text += f"; launches {floors['fp32']['launch_ms']:.3g} ms at 2 us each"
  return text


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


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="directory for bench.json and table.md")
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="seconds the whole run may take (default 420)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU")
  parser.add_argument("--parts", default=",".join(PART_NAMES),
                      help=f"comma-separated subset of {','.join(PART_NAMES)}")
  parser.add_argument("--merge", nargs="*", default=[],
                      help="earlier --out directories whose figures join this table")
  parser.add_argument("--work", default="", help="logs and the E6 run (default: a new temp dir)")
  parser.add_argument("--update-md", default="", help="BENCHMARKS.md whose table to replace")
  parser.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)
  parser.add_argument("--e2e-child", action="store_true", help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)
  if args.e2e_child:
    e2e_child([a for a in rest if a != "--"])
    return 0
  if rest:
    fail(f"unknown arguments {' '.join(rest)}; see --help")
  if args.part:
    part_child(args.part, args.work, args.smoke)
    return 0
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PART_NAMES))
  if unknown:
    fail(f"--parts names {', '.join(unknown)}; choose from {','.join(PART_NAMES)}")
  if not args.out:
    fail("--out is required: the directory for bench.json and table.md")
  if args.budget_s <= 0:
    fail(f"--budget-s must be > 0 seconds, got {args.budget_s:g}")
  for directory in args.merge:
    if not os.path.exists(os.path.join(directory, "bench.json")):
      fail(f"--merge {directory} holds no bench.json; name an earlier --out directory")
  if args.update_md and args.smoke:
    fail("--update-md takes a GPU run's table; a --smoke run's figures are not benchmark results")
  if args.update_md:
    if not os.path.isfile(args.update_md):
      fail(f"--update-md {args.update_md} does not exist; name bench/BENCHMARKS.md")
    with open(args.update_md) as f:
      if MARK_BEGIN not in f.read():
        fail(f"--update-md {args.update_md} has no {MARK_BEGIN} block to fill")
  os.makedirs(args.out, exist_ok=True)
  work = args.work or tempfile.mkdtemp(prefix="diffdyn_bench_")
  os.makedirs(work, exist_ok=True)
  print(f"parts' logs and the E6 run: {work}", flush=True)
  report = run_all(parts, args.out, work, args.smoke, args.budget_s, args.merge)
  print("\n".join(write_outputs(report, args.out, args.merge, args.update_md)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
