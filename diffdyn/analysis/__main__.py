"""Command line: python -m diffdyn.analysis report RUN_DIR... --out DIR [options].

python -m diffdyn.analysis audit RUN_DIR [--out DIR] [options]: the sampler audit.

Bad input (a missing or malformed run, an unknown run name) prints one line naming the
file and line, and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Sequence

from diffdyn import errors
from diffdyn.analysis import criteria
from diffdyn.analysis import report
from diffdyn.analysis import runs as runs_lib

_DEFAULTS = criteria.Options()


class _OneLineParser(argparse.ArgumentParser):
  """Usage errors as one line on stderr (exit 2), like every other input error here."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
  parser = _OneLineParser(prog="python -m diffdyn.analysis",
                          description="Reports and seed-study criteria for diffdyn runs.")
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
  rep = commands.add_parser(
      "report", help="write report.md, criteria.json and figures for runs",
      description="Overlay figures and the seed studies' criteria (E6 vs E5, E7, "
                  "curvature-FID association) for any number of runs. Runs whose configs "
                  "differ only in seed are replicates and are summarised by their mean.")
  rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
  rep.add_argument("--out", required=True, metavar="DIR", help="where the report goes")
  rep.add_argument("--baseline", metavar="NAME", help="E6 criteria: the baseline (E5) run")
  rep.add_argument("--treatment", metavar="NAME", help="E6 criteria: the treatment (E6) run")
  rep.add_argument("--e7", nargs=3, metavar=("E7A", "E7B", "E7C"),
                   help="E7 roles: reference, longer, wider (default: runs named e7a/b/c)")
  rep.add_argument("--late-window", nargs=2, type=float, metavar=("START", "END"),
                   default=_DEFAULTS.late_window,
                   help="E6 (a) window as fractions of total steps (default: %(default)s)")
  rep.add_argument("--spike-window", nargs=2, type=float, metavar=("START", "END"),
                   default=_DEFAULTS.spike_window,
                   help="E6 (b) window as fractions of total steps (default: %(default)s)")
  rep.add_argument("--spike-factor", type=float, default=_DEFAULTS.spike_factor,
                   help="the seeds' literal spike line: this times the baseline median "
                        "(level-sensitive, not used in the verdict; default: %(default)s)")
  rep.add_argument("--spike-k", type=float, default=_DEFAULTS.spike_k,
                   help="detrended spike: more than this many robust SDs (MAD) above the "
                        "run's rolling median (default: %(default)s)")
  rep.add_argument("--spike-median-window", type=int, default=_DEFAULTS.spike_median_window,
                   metavar="POINTS", help="logged points in the rolling median, odd "
                   "(default: %(default)s)")
  rep.add_argument("--curvature-drop", type=float, default=_DEFAULTS.curvature_drop,
                   help="E6 (a) success: relative drop at least this (default: %(default)s)")
  rep.add_argument("--fid-tolerance", type=float, default=_DEFAULTS.fid_tolerance,
                   help="E6 (c) success: final FID change at most +this (default: %(default)s)")
  rep.add_argument("--practical-threshold", type=float, default=_DEFAULTS.practical_threshold,
                   help="E7: smallest relative best-FID improvement that counts as '<<' "
                        "(default: %(default)s)")
  rep.add_argument("--confidence", type=float, default=_DEFAULTS.confidence,
                   help="confidence level of every interval (default: %(default)s)")
  _add_audit_parser(commands)
  return parser


def _add_audit_parser(commands) -> None:
  aud = commands.add_parser(
      "audit", help="is it the sampler, the training or the EMA? weighs the evidence",
      description="Draws samples from the same x_T with DDPM over all timesteps (the "
                  "reference), the run's own FID and grid samplers and controls (DDPM-50 "
                  "respaced and with respacing=none, DDIM-20), with the EMA and the raw "
                  "parameters; compares each with the data and with the reference, reads "
                  "the quality trend over training and the EMA's initialisation weight, and "
                  "writes the verdict, audit.md, audit.json, grids and a side-by-side figure.")
  aud.add_argument("run", metavar="RUN_DIR", help="a run directory (config.json, checkpoints/)")
  aud.add_argument("--out", metavar="DIR", help="where the audit goes (default: RUN_DIR/audit)")
  aud.add_argument("--num-samples", type=int, default=500, metavar="N",
                   help="samples per sampler configuration (default: %(default)s)")
  aud.add_argument("--batch-size", type=int, metavar="B",
                   help="samples per batch (default: the run's eval.sample_batch_size)")
  aud.add_argument("--inception-weights", metavar="FILE",
                   help="FID Inception weights, .pth or .npz (default: the run's, else a "
                        "cached copy, else no FID)")
  aud.add_argument("--reference-stats", metavar="FILE",
                   help="the data's FID mu/sigma .npz (default: the run's, else computed)")
  aud.add_argument("--no-fid", action="store_true", help="skip FID even if weights are found")
  aud.add_argument("--nfe", type=int, default=50, metavar="N",
                   help="steps of the two DDPM-50 controls (default: %(default)s)")
  aud.add_argument("--ddim-nfe", type=int, default=20, metavar="N",
                   help="steps of the DDIM-20 control (default: %(default)s)")
  aud.add_argument("--seed", type=int, default=0, metavar="S",
                   help="the noise shared by every configuration (default: %(default)s)")
  aud.add_argument("--params", default="both", metavar="{ema,raw,both}",
                   help="sample with the EMA parameters, the raw ones, or both side by side "
                        "(default: %(default)s)")


def run_audit(args: argparse.Namespace, argv: Sequence[str]) -> int:
  # Imported here: it brings in JAX, which `report` does not need.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from diffdyn import io  # pylint: disable=import-outside-toplevel
  from diffdyn.analysis import audit  # pylint: disable=import-outside-toplevel
  io.enable_compilation_cache()  # as launch.py: a second audit of a config skips compiling
  command = "python -m diffdyn.analysis " + " ".join(shlex.quote(a) for a in argv)
  result = audit.run_audit(args.run, args.out, num_samples=args.num_samples,
                           batch_size=args.batch_size, seed=args.seed,
                           inception_weights=args.inception_weights,
                           reference_stats=args.reference_stats, use_fid=not args.no_fid,
                           ddpm_nfe=args.nfe, ddim_nfe=args.ddim_nfe, params=args.params,
                           command=command)
  for warning in result["warnings"]:
    print(f"warning: {warning}", file=sys.stderr)
  for line in audit.summary_lines(result):
    print(line)
  out = args.out or os.path.join(args.run, audit.AUDIT_DIR)
  print(f"wrote {os.path.join(out, audit.REPORT_FILE)}")
  return 0


def _options(args: argparse.Namespace) -> criteria.Options:
  return criteria.Options(
      late_window=tuple(args.late_window), spike_window=tuple(args.spike_window),
      spike_factor=args.spike_factor, spike_k=args.spike_k,
      spike_median_window=args.spike_median_window, curvature_drop=args.curvature_drop,
      fid_tolerance=args.fid_tolerance, practical_threshold=args.practical_threshold,
      confidence=args.confidence)


def _summary_lines(result: dict) -> list[str]:
  """The headline verdicts, for the terminal; the report has the numbers."""
  lines = []
  e6 = result["e6_vs_e5"]
  if e6.get("verdict") == criteria.SKIPPED:
    lines.append(f"E6 vs E5: skipped ({e6['reason']})")
  else:
    lines.append(f"E6 vs E5 ({e6['treatment']} vs {e6['baseline']}): useful probe "
                 f"{e6['overall']['verdict']}")
    for name, block in (("late window", e6["train_objective"]["mean_change"]),
                        ("spike window", e6["train_objective"]["detrended_spikes"])):
      for rows in block.get("per_run", {}).values():
        for row in rows:
          lines.append(f"  {name} for {row['run']}: steps {row['steps'][0]}-{row['steps'][1]}")
  e7 = result["e7"]
  if e7.get("verdict") == criteria.SKIPPED:
    lines.append(f"E7: skipped ({e7['reason']})")
  else:
    lines.append(f"E7: {e7['interpretation']['text']}")
  assoc = result["curvature_fid_association"]
  if assoc.get("verdict") == criteria.SKIPPED:
    lines.append(f"curvature-FID association: skipped ({assoc['reason']})")
  else:
    lines.append(f"curvature-FID association ({assoc['parameters']} parameters): n = "
                 f"{assoc['n']}, Spearman {assoc['readings']['spearman']}, partial given step "
                 f"{assoc['readings']['partial_spearman_given_step']}")
  return lines


def run_report(args: argparse.Namespace, argv: Sequence[str]) -> int:
  options = _options(args)
  loaded = runs_lib.load_runs(args.runs)
  for run in loaded:
    for warning in run.warnings:
      print(f"warning: {warning}", file=sys.stderr)
  command = "python -m diffdyn.analysis " + " ".join(shlex.quote(a) for a in argv)
  path = report.write_report(loaded, args.out, options, args.baseline, args.treatment,
                             args.e7, command=command)
  with open(path.parent / report.CRITERIA_FILE, encoding="utf-8") as f:
    written = json.load(f)
  for line in _summary_lines(written["criteria"]):
    print(line)
  print(f"wrote {path}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  try:
    if args.command == "report":
      return run_report(args, argv)
    if args.command == "audit":
      return run_audit(args, argv)
  except errors.UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except OSError as e:
    # Reading is checked file by file; this is the report directory that cannot be written.
    print(f"error: cannot write the report: {e.filename}: {e.strerror}", file=sys.stderr)
    return 2
  return 2


if __name__ == "__main__":
  sys.exit(main())
