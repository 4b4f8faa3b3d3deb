"""notebooks/colab.ipynb runs top to bottom on the CPU at smoke size, as CI executes it."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("nbclient")   # the test extra: nbclient, nbformat, ipykernel
pytest.importorskip("ipykernel")


def _execute_module():
  spec = importlib.util.spec_from_file_location("notebook_execute",
                                                os.path.join(ROOT, "notebooks", "execute.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _kernel_env(cwd: str, cache: str) -> dict:
  """The kernel's environment: CI's installed diffdyn, else (a bare checkout) the repo's."""
  env = dict(os.environ, DIFFDYN_CACHE=cache, TF_CPP_MIN_LOG_LEVEL="3")
  installed = subprocess.run([sys.executable, "-c", "import diffdyn"], cwd=cwd, env=env,
                             capture_output=True).returncode == 0
  if not installed:
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


def _outputs(nb, cell_type="code"):
  return [out for cell in nb.cells if cell.cell_type == cell_type for out in cell.get("outputs", [])]


@pytest.mark.slow
def test_the_notebook_runs_at_smoke_size_and_shows_real_figures(tmp_path, cache_dir):
  execute = _execute_module()
  workdir = tmp_path / "runs"
  # A failing cell raises CellExecutionError here, naming the cell and its traceback.
  nb = execute.execute(dict(execute.SMOKE_PARAMETERS, WORKDIR=str(workdir)), cwd=str(tmp_path),
                       env=_kernel_env(str(tmp_path), cache_dir))
  text = "".join(out.get("text", "") for out in _outputs(nb) if out.output_type == "stream")
  assert "E6: synthetic 8x8 images" in text and "40 steps" in text
  # FID is on only where the Inception weights can be had (not offline, as in CI).
  assert ("FID: on" in text) != ("FID: off, because" in text)
  for run in ("e6", "e5"):
    with open(workdir / run / "metrics.jsonl") as f:
      assert max(json.loads(line)["step"] for line in f) == 40
  # E6's loss, curvature and samples, then the report's loss, curvature and sample grids: each
  # a PNG file that the notebook displayed (FID figures only when FID ran).
  pngs = [out for out in _outputs(nb) if "image/png" in out.get("data", {})]
  assert len(pngs) >= 6
  with open(workdir / "report" / "criteria.json") as f:
    criteria = json.load(f)["criteria"]
  # The report found E5 as the baseline and E6 as the treatment and compared them.
  assert criteria["e6_vs_e5"].get("verdict") != "skipped", criteria["e6_vs_e5"]
  assert "e5" in criteria["e6_vs_e5"]["roles"] and "e6" in criteria["e6_vs_e5"]["roles"]
  markdown = "".join(out["data"].get("text/markdown", "") for out in _outputs(nb)
                     if "data" in out)
  assert "E6 vs E5" in markdown
