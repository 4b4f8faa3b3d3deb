"""Test setup: the repo root on sys.path (for `experiments`), quiet logs, a shared compile cache."""
import hashlib
import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA:CPU at optimisation level 0: compiles take about half as long, and the suite compiles far
# more than it computes. Every process of a test session (launched ones inherit the variable)
# runs the same programs, so comparisons between runs hold as they do at the default level.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
logging.getLogger("absl").setLevel(logging.WARNING)


# The suite's one small run: experiments/smoke.py at 8x8 with a one-level UNet without attention,
# TensorBoard off and the extra curvature measurements off (tests/test_evaluate.py runs the
# whole smoke config, attention included). XLA:CPU's compile time grows with the number of ops,
# not their size. Test modules share the run so that each of its programs compiles once per
# session: the persistent cache serves every later run of it, launched processes included.
TINY = {"data.image_size": 8, "model.image_size": 8, "model.channel_mult": (1,),
        "model.attn_resolutions": (), "train.tensorboard": False, "curvature.blocks": False,
        "curvature.ggn": False, "curvature.precond_every_steps": 0,
        "curvature.density_every_steps": 0}


def tiny_config(**overrides):
  """experiments/smoke.py with TINY and then `overrides` ({"section.key": value}) applied."""
  from experiments import smoke  # pylint: disable=import-outside-toplevel
  config = smoke.get_config()
  for key, value in {**TINY, **overrides}.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def tiny_flags(**overrides):
  """The same run as launch.py's flags."""
  return ["--config", "experiments/smoke.py",
          *(f"--config.{k}={v!r}".replace(" ", "") if isinstance(v, tuple)
            else f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items())]


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: kills, multi-device runs and long samplers; `pytest -m 'not slow'` skips "
      "them for a quick loop (CI runs everything)")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One DIFFDYN_CACHE for the session: launched runs reuse each other's compiled programs.

  Under pytest-xdist (`-n 3`) the workers share it, so a program one of them compiled is
  loaded by the other. (An entry read while the other worker is still writing it does not
  deserialize: JAX then warns and compiles the program itself.)
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    path = base.parent / "diffdyn_cache"
    path.mkdir(exist_ok=True)
  else:
    path = tmp_path_factory.mktemp("diffdyn_cache")
  os.environ["DIFFDYN_CACHE"] = str(path)
  return str(path)


def assert_one_line_error(proc, *words):
  """launch.py's contract for bad input: exit 2, one `error:` line holding `words`, no traceback."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = one_error_line(proc.stderr)
  for word in words:
    assert word in line, line


def run_launch(args, cache, timeout=600):
  """Runs launch.py in a fresh process; returns the CompletedProcess."""
  import subprocess  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, DIFFDYN_CACHE=cache, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(directory):
  """{relative path: (size, mtime_ns, sha1)} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
      stat = os.stat(path)
      out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns, digest)
  return out
@pytest.fixture
def launch_main(monkeypatch, cache_dir):
  """launch.main in this process: `launch_main(*args)` returns its exit status (0 if it returns).

  absl's FLAGS are process-wide. config_flags reads the --config.* overrides from sys.argv (set
  here to the call's argv) and defines a flag per override; after each call the flags are
  unparsed and those flags deleted, so the next call parses as a fresh process would. The log
  levels launch.main sets are put back too.
  """
  del cache_dir   # launch.main turns the compilation cache on: the session's, not ~/.cache
  import launch  # pylint: disable=import-outside-toplevel
  loggers = [logging.getLogger(name) for name in ("absl", "diffdyn", "jax._src.xla_bridge")]
  levels = [logger.level for logger in loggers]

  def call(*args):
    argv = ["launch.py", *args]
    monkeypatch.setattr(sys, "argv", argv)
    try:
      launch.main(argv)
    except SystemExit as e:
      return 0 if e.code is None else e.code
    finally:
      reset_flags()
      _forget_config_module(args)
      for logger, level in zip(loggers, levels):
        logger.setLevel(level)
    return 0

  return call


def _forget_config_module(args):
  """Drops the module config_flags loaded a --config file as (named after the file).

  A later --config file of the same name would otherwise run in that module's namespace and
  inherit its get_config, as no fresh process would.
  """
  paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
  paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
  for path in (os.path.abspath(p) for p in paths):
    for name, module in list(sys.modules.items()):
      if getattr(module, "__file__", None) == path and not name.startswith("experiments"):
        del sys.modules[name]


def reset_flags():
  """absl's FLAGS as before launch.main parsed them: defaults, and no --config.* field flags."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.unparse_flags()
  for name in [name for name in flags.FLAGS if name.startswith("config.")]:
    delattr(flags.FLAGS, name)


def one_error_line(stderr, prefix="error:"):
  """The single line of `stderr` that starts with `prefix`; fails on none, several, a traceback."""
  assert "Traceback" not in stderr, stderr[-2000:]
  lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
  assert len(lines) == 1, stderr[-2000:]
  return lines[0]
