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
logging.getLogger("absl").setLevel(logging.WARNING)


def _xla_flags_with(flag):
  """XLA_FLAGS with `flag` added, unless the variable sets that flag already."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if any(f.split("=")[0] == flag.split("=")[0] for f in flags):
    return " ".join(flags)
  return " ".join([*flags, flag])


def _xla_accepts(xla_flags):
  """Whether this jaxlib knows every flag in `xla_flags`: XLA aborts on an unknown one."""
  import subprocess  # pylint: disable=import-outside-toplevel
  probe = "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"
  return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300,
                        env=dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
                        ).returncode == 0


# The suite compiles far more than it computes. Two XLA:CPU flags make its compiles cheaper:
# optimisation level 0 (about half the compile time), and the older elemental emitters in place
# of the fusion emitters (a third less CPU time again for tests/test_evaluate.py's run, measured
# cold on 2 cores: 73.7 s against 48.8 s, and its programs run faster too). Every process of a
# test session (launched ones, and pytest-xdist's workers, inherit the variable) runs the same
# programs, so comparisons between runs hold as they do with XLA's defaults.
os.environ["XLA_FLAGS"] = _xla_flags_with("--xla_backend_optimization_level=0")
_flags = _xla_flags_with("--xla_cpu_use_fusion_emitters=false")
# Probed once, by the first process of a session: its workers and launches inherit the result.
# A newer jaxlib may drop the switch; the suite then runs with the fusion emitters.
if _flags != os.environ["XLA_FLAGS"] and _xla_accepts(_flags):
  os.environ["XLA_FLAGS"] = _flags


# The suite's one small run: experiments/smoke.py at 8x8 with a one-level UNet without attention,
# TensorBoard off and the extra curvature measurements off (tests/test_evaluate.py turns the
# smoke config's measurements back on). XLA:CPU's compile time grows with the number of ops,
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


# The files that take longest, longest first, by their times in the fresh-clone CI check.
# pytest-xdist's `--dist loadfile` hands out whole files, those with the most tests first; one
# long file handed out last leaves a core idle for its last minute or two. test_curvature
# starts beside test_kill and test_sweep because it builds none of the tiny run's programs,
# which those two compile in their first seconds: test_faults, started then too, compiled
# them a third time at once; started later, it loads them from the cache.
LONGEST_FIRST = ("test_kill.py", "test_curvature.py", "test_sweep.py", "test_faults.py",
                 "test_audit.py", "test_train.py", "test_evaluate.py", "test_bench.py")


def _file_rank(path):
  name = os.path.basename(path)
  return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


class _LongestFilesFirst:
  """A pytest-xdist plugin: `--dist loadfile` handing out the files of LONGEST_FIRST first."""

  @pytest.hookimpl(tryfirst=True)
  def pytest_xdist_make_scheduler(self, config, log):
    if config.getvalue("dist") != "loadfile":
      return None
    from xdist.scheduler import LoadFileScheduling  # pylint: disable=import-outside-toplevel

    class Scheduling(LoadFileScheduling):

      def _assign_work_unit(self, node):
        # A worker is handed its next file while it still runs the last tests of its current
        # one (it holds a test back until more arrive; a one-test file gets a second file at
        # once). One still busy with a long file gets the shortest left, so that the long
        # files go to workers that are free to start them.
        files = sorted(self.workqueue, key=_file_rank)   # stable: xdist's order, most tests first
        pending = [self._split_scope(nodeid) for work in self.assigned_work[node].values()
                   for nodeid, done in work.items() if not done]
        busy = any(_file_rank(path) < len(LONGEST_FIRST) for path in pending)
        self.workqueue.move_to_end(files[-1] if busy else files[0], last=False)
        super()._assign_work_unit(node)

    return Scheduling(config, log)


def pytest_configure(config):
  if config.pluginmanager.hasplugin("xdist"):
    config.pluginmanager.register(_LongestFilesFirst(), "diffdyn_longest_files_first")
  config.addinivalue_line(
      "markers", "slow: kills, multi-device runs and long samplers; `pytest -m 'not slow'` skips "
      "them for a quick loop (CI runs everything)")


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
  """One DIFFDYN_CACHE for the session: every test's programs, launched or in-process, go
  through one persistent compilation cache, so each is compiled once.

  Under pytest-xdist (`-n 3`) the workers share it, so a program one of them compiled is
  loaded by the other. (An entry read while the other worker is still writing it does not
  deserialize: JAX then warns and compiles the program itself.) The cache is on from each
  process's first test, not only from its first run: tests that build programs themselves
  (a step, an init) load them too. Nothing of a session lands in ~/.cache.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    path = base.parent / "diffdyn_cache"
    path.mkdir(exist_ok=True)
  else:
    path = tmp_path_factory.mktemp("diffdyn_cache")
  os.environ["DIFFDYN_CACHE"] = str(path)
  from diffdyn import io  # pylint: disable=import-outside-toplevel
  io.enable_compilation_cache()   # the directory launched runs use: DIFFDYN_CACHE/jax_cache
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
def launch_main(monkeypatch):
  """launch.main in this process: `launch_main(*args)` returns its exit status (0 if it returns).

  absl's FLAGS are process-wide. config_flags reads the --config.* overrides from sys.argv (set
  here to the call's argv) and defines a flag per override; after each call the flags are
  unparsed and those flags deleted, so the next call parses as a fresh process would. The log
  levels launch.main sets are put back too.
  """
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
