"""The installable package: its wheel, its dependency floors, and an import outside the repo."""
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from conftest import ROOT

# Extras that CI does not install (.ci/run): their floors are not in constraints.txt.
UNTESTED_EXTRAS = ("torch", "cuda", "cuda12")


def _normalized(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _pins() -> dict[str, str]:
  pins = {}
  with open(os.path.join(ROOT, "constraints.txt")) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        name, version = line.split("==")
        pins[_normalized(name)] = version
  return pins


def test_every_floor_is_the_version_ci_installs():
  project = _pyproject()["project"]
  tested = [project["dependencies"]] + [
      reqs for extra, reqs in project["optional-dependencies"].items()
      if extra not in UNTESTED_EXTRAS]
  pins = _pins()
  checked = 0
  for requirement in (r for reqs in tested for r in reqs):
    name, floor = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9][^,;\s]*)", requirement).groups()
    assert pins.get(_normalized(name)) == floor, (
        f"{requirement}: constraints.txt pins {pins.get(_normalized(name))}; a floor must be "
        "the version CI tested")
    checked += 1
  assert checked >= 10 + 4   # the ten core dependencies and at least the extras' packages


def _copy_source(dest) -> str:
  """What a checkout builds from, away from the repo so that the build leaves it clean."""
  os.makedirs(dest)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), dest)
  shutil.copytree(os.path.join(ROOT, "diffdyn"), os.path.join(dest, "diffdyn"),
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  return str(dest)


def _source_files() -> set[str]:
  found = set()
  for folder, dirs, files in os.walk(os.path.join(ROOT, "diffdyn")):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    found |= {os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
              for f in files if f.endswith(".py")}
  return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  setuptools = pytest.importorskip("setuptools")
  if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
    pytest.skip("building a wheel offline needs setuptools >= 70.1, which has bdist_wheel (pip install '.[test]')")
  tmp = tmp_path_factory.mktemp("wheel")
  source = _copy_source(tmp / "src")
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                         "--no-build-isolation", "-q", "-w", str(tmp / "dist"), source],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = (tmp / "dist").glob("diffdyn-*.whl")
  return path


def test_the_wheel_holds_every_module_and_nothing_else(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
  modules = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert modules == _source_files()
  for subpackage in ("configs", "fid", "analysis", "models"):
    assert f"diffdyn/{subpackage}/__init__.py" in modules


def test_the_wheel_requires_no_tensorflow_and_no_test_tools(wheel):
  with zipfile.ZipFile(wheel) as z:
    (metadata,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    lines = z.read(metadata).decode().splitlines()
  core = [line.split(":", 1)[1].strip() for line in lines
          if line.startswith("Requires-Dist:") and "extra ==" not in line]
  names = {_normalized(re.match(r"[A-Za-z0-9_.\-]+", r).group()) for r in core}
  assert names == {"jax", "flax", "optax", "orbax-checkpoint", "ml-collections", "numpy", "scipy",
                   "matplotlib", "pillow", "absl-py"}
  extras = {line.split(":", 1)[1].strip() for line in lines if line.startswith("Provides-Extra:")}
  assert extras == {"tfds", "tensorboard", "torch", "test", "notebook", "cuda", "cuda12"}


def test_the_installed_wheel_imports_train_and_its_configs_outside_the_repo(wheel, tmp_path):
  site = tmp_path / "site"
  with zipfile.ZipFile(wheel) as z:
    z.extractall(site)
  code = ("import diffdyn; from diffdyn import config, train; from diffdyn.configs import e6, smoke\n"
          "config.validate(smoke.smoke_size(e6.get_config()))\n"
          "print(diffdyn.__file__, callable(train.train_and_evaluate))")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env=dict(env, PYTHONPATH=str(site)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  where, ok = proc.stdout.split()
  assert where == str(site / "diffdyn" / "__init__.py") and ok == "True"
