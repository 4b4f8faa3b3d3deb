"""Executes notebooks/colab.ipynb top to bottom with its parameters replaced, as CI does.

  python notebooks/execute.py --save    # refreshes the outputs saved in colab.ipynb

Parameters are injected the way papermill does it: a cell tagged "injected-parameters" right
after the cell tagged "parameters". `--save` executes with SMOKE_PARAMETERS (the CPU smoke size
that tests/test_notebook.py uses) and drops the injected cell before writing, so the saved
notebook keeps the Colab defaults and shows the outputs of a real run. Needs nbclient, nbformat
and ipykernel (`pip install ".[test,notebook]"`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import nbclient
import nbformat

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab.ipynb")
INJECTED = "injected-parameters"

# The smoke config shrunk further to 8x8 images and a one-level UNet without attention, and
# without the per-block and Gauss-Newton traces (as the test suite's tiny run), which keeps the
# two trainings, the figures and the report within about two minutes on two CPU cores. No
# install (CI installed diffdyn already), no TensorBoard.
SMOKE_PARAMETERS = {
    "SMOKE": True,
    "SWEEP": False,
    "TENSORBOARD": False,
    "INSTALL": "",
    "OVERRIDES": {"data.image_size": 8, "model.image_size": 8, "model.channel_mult": (1,),
                  "model.attn_resolutions": (), "curvature.blocks": False,
                  "curvature.ggn": False},
}


def _tags(cell) -> list[str]:
  return cell.get("metadata", {}).get("tags", [])


def inject(nb, parameters: dict) -> None:
  """Adds the cell that sets `parameters` after the "parameters" cell (replacing an old one)."""
  strip_injected(nb)
  (index,) = [i for i, cell in enumerate(nb.cells) if "parameters" in _tags(cell)]
  source = "# Injected by notebooks/execute.py\n" + "\n".join(
      f"{name} = {value!r}" for name, value in parameters.items())
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED]}))


def strip_injected(nb) -> None:
  nb.cells = [cell for cell in nb.cells if INJECTED not in _tags(cell)]


def execute(parameters: dict, cwd: str, env: dict | None = None, timeout: int = 900):
  """The executed notebook; raises nbclient.exceptions.CellExecutionError if a cell fails.

  The kernel runs in `cwd` with the environment `env` (default: this process's), on this
  Python (`python3` resolves to sys.executable), so it imports the diffdyn installed here.
  """
  nb = nbformat.read(NOTEBOOK, as_version=4)
  inject(nb, parameters)
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": cwd}})
  client.execute(env=dict(os.environ if env is None else env))
  return nb


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--save", action="store_true",
                      help="write the outputs into notebooks/colab.ipynb (without the injected cell)")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    nb = execute(dict(SMOKE_PARAMETERS, WORKDIR=os.path.join(tmp, "runs")), cwd=tmp)
  if args.save:
    strip_injected(nb)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
