"""Reading run directories, the seed studies' criteria, overlay figures and reports.

  from diffdyn import analysis
  runs = analysis.load_runs(["runs/e5", "runs/e6"])
  groups = analysis.group_replicates(runs)
  result = analysis.criteria.e6_vs_e5(groups[0], groups[1])
  analysis.report.write_report(runs, "reports/e6_vs_e5")

or from a shell: python -m diffdyn.analysis report runs/e5 runs/e6 --out reports/e6_vs_e5
"""
from diffdyn.analysis import criteria
from diffdyn.analysis import curvature_detail
from diffdyn.analysis import plots
from diffdyn.analysis import report
from diffdyn.analysis import stats
from diffdyn.analysis import yardsticks
from diffdyn.analysis.criteria import Options
from diffdyn.analysis.report import write_report
from diffdyn.analysis.runs import Group
from diffdyn.analysis.runs import Run
from diffdyn.analysis.runs import RunFormatError
from diffdyn.analysis.runs import group_replicates
from diffdyn.analysis.runs import load_run
from diffdyn.analysis.runs import load_runs

__all__ = ["criteria", "curvature_detail", "plots", "report", "stats", "yardsticks", "Options",
           "write_report", "Group", "Run", "RunFormatError", "group_replicates", "load_run",
           "load_runs"]
