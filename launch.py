"""Runs one experiment: `python launch.py --config experiments/e6.py --workdir runs/e6`.

Override any config value with `--config.section.key=value`; the keys, their defaults and their
meaning are in diffdyn/configs/default.py, and `--show_config` prints the config a command would
run with (after its overrides) without running it. Running the same command again resumes the
run from its latest checkpoint. Mistakes in the input are reported as one line and exit status
2; a run that fails while training exits 3, and one stopped by Ctrl-C exits 130.
"""
import time

_STARTED = time.monotonic()   # before the imports, which take seconds of a run's wall time

import logging  # pylint: disable=wrong-import-position
import os  # pylint: disable=wrong-import-position
import re  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though its config differs.")
_KEEP_DAMAGED_METRICS = flags.DEFINE_bool(
    "keep_damaged_metrics", False,
    "Resume even though the workdir's metrics.jsonl is damaged or missing: the damaged file is "
    "copied aside (metrics.jsonl.damaged) and the run goes on with its lines before the damage.")
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print the config as it would run (after the --config.* overrides) "
    "and exit, touching no workdir; --workdir is not needed.")
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "info", ["debug", "info", "warning"],
    "diffdyn's log level; debug also names each phase (train chunk, metric write, evaluation, "
    "checkpoint) as it starts.")

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as a shell reports a process Ctrl-C ended

_HELP_FLAGS = ("-h", "-help", "--help", "--helpshort")
_HELPFULL_FLAGS = ("-helpfull", "--helpfull")
# How absl words a value its flag's parser rejects, for a --config.* override.
_BAD_OVERRIDE = re.compile(r"flag --config\.([\w.]+)=(.*?): ")


def fail(message: str, status: int, prefix: str = "error") -> None:
  # One write, so that no other thread's output can land inside the line.
  sys.stderr.write(f"{prefix}: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def print_help(full: bool) -> None:
  if full:
    flags_help = flags.FLAGS.get_help()
  else:   # absl heads them with the module's name, "__main__" for a script: say what they are
    listed = flags.FLAGS.module_help(sys.modules[__name__]).strip()
    flags_help = "flags:\n" + listed.split("\n", 1)[1]
  print(f"{__doc__.strip()}\n\n{flags_help}\n")
  if not full:
    print("--helpfull also lists the flags of the libraries launch.py uses.")


def parse_flags(argv):
  """Parses the flags and loads the config file; returns the config."""
  try:
    flags.FLAGS(argv)
    if not _CONFIG.value:
      fail("--config is required: an experiment file such as experiments/e6.py", EXIT_BAD_INPUT)
    config = _CONFIG.value   # the file is loaded, and overrides applied, on first access
    config.to_dict()         # a file that failed to load gives a stand-in that raises here
  except flags.IllegalFlagValueError as e:
    _fail_bad_override(e)
  except flags.Error as e:
    fail(_last_line(str(e)), EXIT_BAD_INPUT)
  except AttributeError as e:
    if "get_config" in str(e):   # the module loaded, but holds no get_config
      fail(f"--config {_config_path(argv)} defines no get_config(); point --config at a python "
           "file that defines get_config()", EXIT_BAD_INPUT)
    _fail_unknown_key(e, argv)
  except KeyError as e:   # with AttributeError, how ml_collections reports an unknown key
    _fail_unknown_key(e, argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(f"--config could not be loaded: {_last_line(str(e))}; point --config at a python file "
         "that defines get_config()", EXIT_BAD_INPUT)
  return config


def _fail_bad_override(error: flags.IllegalFlagValueError) -> None:
  from diffdyn import config as config_lib  # pylint: disable=import-outside-toplevel
  match = _BAD_OVERRIDE.match(str(error))
  expected = match and config_lib.expected_type(match.group(1))
  if not expected:
    fail(_last_line(str(error)), EXIT_BAD_INPUT)
  key, value = match.groups()
  fail(f"config key {key!r} must be {expected}, got {value!r} (in --config.{key}={value})",
       EXIT_BAD_INPUT)


def _config_path(argv) -> str:
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "file"


def _fail_unknown_key(error: LookupError | AttributeError, argv) -> None:
  from diffdyn import config as config_lib  # pylint: disable=import-outside-toplevel
  quoted = re.search(r"'([^'\\]+)", str(error))   # "'trian'\nDid you mean ..." has it first
  name = quoted.group(1) if quoted else str(error).strip("\"' ")
  given = [a for a in argv if a.startswith("--config.")
           and name in a.split("=", 1)[0].split(".")[1:]]
  if not given:
    fail(f"unknown config key {name!r} in a --config.* override; the keys are those of "
         "diffdyn/configs/default.py", EXIT_BAD_INPUT)
  key = given[0].split("=", 1)[0][len("--config."):]
  hint = config_lib.key_hint(key) or ("; the keys are those of diffdyn/configs/default.py "
                                      "(--show_config prints them)")
  fail(f"unknown config key {key!r} in {given[0]}{hint}", EXIT_BAD_INPUT)


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  head = lines[0] if lines else ""
  if "Traceback" in head:
    head = head.split("Traceback")[0].rstrip(": ")
  last = lines[-1] if len(lines) > 1 else ""
  return f"{head} ({last})" if last and last not in head else head


def _one_line(text: str) -> str:
  return " ".join(text.split())


def main(argv) -> None:
  """launch.py's command line; exits with status 2, 3 or 130 as the module docstring says."""
  try:
    _main(argv)
  except KeyboardInterrupt:   # Ctrl-C before the run's own handler is installed, or after it
    fail("Ctrl-C; run the same command to resume from the latest checkpoint", EXIT_INTERRUPTED,
         prefix="interrupted")


def _main(argv) -> None:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  if any(arg in _HELP_FLAGS + _HELPFULL_FLAGS for arg in argv[1:]):
    print_help(full=any(arg in _HELPFULL_FLAGS for arg in argv[1:]))
    return
  config = parse_flags(argv)
  from diffdyn.errors import RunFailed, UserError  # pylint: disable=import-outside-toplevel
  if _SHOW_CONFIG.value:
    from diffdyn import config as config_lib  # pylint: disable=import-outside-toplevel
    try:
      print(config_lib.validate(config), end="")
    except UserError as e:
      fail(str(e), EXIT_BAD_INPUT)
    return
  if not _WORKDIR.value:
    fail("--workdir is required: the directory for this run's checkpoints and metrics",
         EXIT_BAD_INPUT)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)   # orbax logs every file it writes
  # JAX logs each accelerator platform it looked for and did not find (TPU, on any GPU box).
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  logging.getLogger("diffdyn").setLevel(_LOG_LEVEL.value.upper())
  from diffdyn import train  # pylint: disable=import-outside-toplevel
  logging.getLogger("diffdyn").info("started in %.1f s (Python, JAX and diffdyn imports, the "
                                    "config)", time.monotonic() - _STARTED)
  try:
    final = train.train_and_evaluate(config, _WORKDIR.value,
                                     allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                                     keep_damaged_metrics=_KEEP_DAMAGED_METRICS.value)
  except UserError as e:
    fail(str(e), EXIT_BAD_INPUT)
  except RunFailed as e:
    fail(str(e), EXIT_RUN_FAILED)
  except KeyboardInterrupt:   # a second Ctrl-C stops at once, without a last checkpoint
    fail("Ctrl-C twice: stopped at once; run the same command to resume from the latest "
         "checkpoint", EXIT_INTERRUPTED, prefix="interrupted")
  total = config.train.total_steps
  if final.get("interrupted") == "SIGINT":
    fail(f"Ctrl-C at step {final['step']} of {total}, checkpointed there; run the same "
         "command to resume", EXIT_INTERRUPTED, prefix="interrupted")
  if final["step"] < total:
    logging.warning("preempted at step %d of %d; run the same command to resume", final["step"],
                    total)
    return   # exit status 0: the stop was asked for, and nothing is lost
  shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(final.items()) if not k.startswith("train/loss_tbin"))
  logging.info("final metrics: %s", shown)


if __name__ == "__main__":
  main(sys.argv)
