"""Test setup: the repo root on sys.path (for `experiments`), quiet logs, a shared compile cache."""
import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
logging.getLogger("absl").setLevel(logging.WARNING)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~10 s on a 2-core CPU")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One DIFFDYN_CACHE for the session: launched runs reuse each other's compiled programs."""
  path = tmp_path_factory.mktemp("diffdyn_cache")
  os.environ["DIFFDYN_CACHE"] = str(path)
  return str(path)


def assert_one_line_error(proc, *words):
  """launch.py's contract for bad input: exit 2, one `error:` line holding `words`, no traceback."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for word in words:
    assert word in errors[0], errors[0]


def run_launch(args, cache, timeout=600):
  """Runs launch.py in a fresh process; returns the CompletedProcess."""
  import subprocess  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, DIFFDYN_CACHE=cache, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
