"""Runs one experiment: `python launch.py --config experiments/e6.py --workdir runs/e6`.

Override any config value with `--config.section.key=value`. Running the same command again
resumes the run from its latest checkpoint. Mistakes in the input are reported as one line
and exit status 2.
"""
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though its config differs.")
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "info", ["debug", "info", "warning"],
    "diffdyn's log level; debug also names each phase (train chunk, metric write, evaluation, "
    "checkpoint) as it starts.")

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130   # as a shell reports a process ended by SIGINT


def fail(message: str, status: int) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def parse_flags(argv):
  """Parses the flags and loads the config file; returns the config."""
  try:
    flags.FLAGS(argv)
    if not _CONFIG.value:
      fail("--config is required: an experiment file such as experiments/e6.py", EXIT_BAD_INPUT)
    config = _CONFIG.value   # the file is loaded, and overrides applied, on first access
    config.to_dict()         # a file that failed to load gives a stand-in that raises here
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
  if not _WORKDIR.value:
    fail("--workdir is required: the directory for this run's checkpoints and metrics",
         EXIT_BAD_INPUT)
  return config


def _config_path(argv) -> str:
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "file"


def _fail_unknown_key(error: LookupError | AttributeError, argv) -> None:
  key = str(error).strip("\"' ")
  given = [a for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
  fail(f"unknown config key {key!r} in {given[0] if given else 'a --config.* override'}; "
       "the keys are those of diffdyn/configs/default.py", EXIT_BAD_INPUT)


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
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  config = parse_flags(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)   # orbax logs every file it writes
  logging.getLogger("diffdyn").setLevel(_LOG_LEVEL.value.upper())
  from diffdyn import io, train  # pylint: disable=import-outside-toplevel
  from diffdyn.errors import RunFailed, UserError  # pylint: disable=import-outside-toplevel
  io.enable_compilation_cache()
  try:
    final = train.train_and_evaluate(config, _WORKDIR.value,
                                     allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except UserError as e:
    fail(str(e), EXIT_BAD_INPUT)
  except RunFailed as e:
    fail(str(e), EXIT_RUN_FAILED)
  except KeyboardInterrupt:   # a second Ctrl-C: stopped at once
    print("interrupted (Ctrl-C twice): stopped without a checkpoint of the last steps; run the "
          "same command to resume from the latest checkpoint", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  if final.get("interrupted") == "SIGINT":
    print(f"interrupted at step {final['step']} of {config.train.total_steps} (Ctrl-C), with a "
          "checkpoint there; run the same command to resume", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  if final["step"] < config.train.total_steps:
    logging.warning("preempted at step %d of %d; run the same command to resume", final["step"],
                    config.train.total_steps)
    return   # exit status 0: the stop was asked for, and nothing is lost
  shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(final.items()) if not k.startswith("train/loss_tbin"))
  logging.info("final metrics: %s", shown)


if __name__ == "__main__":
  main(sys.argv)
