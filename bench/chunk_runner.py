"""The run loop's chunk runners against K plain jitted steps, on this machine's default backend.

  python bench/chunk_runner.py [--steps 20] [--repeats 5]

For each size (the smoke model at width 8, batch 4, and at width 16, batch 64) it times a
chunk of K steps three ways, after a warm-up chunk, each chunk ended by block_until_ready:

  jitted step   K calls of jax.jit(step) in a Python loop: the reference the issue names;
  loop runner   train.ChunkRunner("loop"), what `train.chunk_runner="auto"` picks on a CPU;
  scan runner   train.ChunkRunner("scan"), one lax.scan of K steps (one dispatch).

It prints compile seconds apart from the steady-state median ms per step, and each runner's
ratio to the jitted step. Timings are of this machine only, under whatever else it runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffdyn import data as data_lib  # pylint: disable=wrong-import-position
from diffdyn import sweep  # pylint: disable=wrong-import-position
from diffdyn import train  # pylint: disable=wrong-import-position
from experiments import smoke  # pylint: disable=wrong-import-position

SIZES = {"width 8, batch 4": (8, 4), "width 16, batch 64": (16, 64)}


def _config(width: int, batch: int, runner: str):
  config = smoke.get_config()
  config.model.base_channels = width
  config.train.batch_size = batch
  config.train.chunk_runner = runner
  return config


def _time_chunks(run_chunk, state, repeats: int):
  """Median seconds of a chunk, after one warm-up chunk; returns (median, state)."""
  state = jax.block_until_ready(run_chunk(state))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = jax.block_until_ready(run_chunk(state))
    times.append(time.perf_counter() - start)
  return statistics.median(times), state


def measure(width: int, batch: int, steps: int, repeats: int) -> dict:
  out = {}
  for runner in ("loop", "scan"):
    config = _config(width, batch, runner)
    program = train.build_program(config, sweep.get_replicas(config, "/nonexistent"))
    images = jax.device_put(data_lib.load_images(config.data))
    hp, state = program.hyperparams, program.init_state()
    if runner == "loop":
      # The reference: the same step, jitted and donated, called K times by hand.
      start = time.perf_counter()
      step = jax.jit(program.runner.step, donate_argnums=0)
      compiled = step.lower(state, images, hp).compile()
      compile_s = time.perf_counter() - start

      def by_hand(s, compiled=compiled):
        for _ in range(steps):
          s = compiled(s, images, hp)
        return s

      seconds, state = _time_chunks(by_hand, state, repeats)
      out["jitted step"] = (compile_s, seconds / steps)
    start = time.perf_counter()
    program.runner.compiled(state, images, hp, steps)
    compile_s = time.perf_counter() - start
    seconds, state = _time_chunks(lambda s: program.runner(s, images, hp, steps), state, repeats)
    out[f"{runner} runner"] = (compile_s, seconds / steps)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20, help="K, steps per chunk")
  parser.add_argument("--repeats", type=int, default=5, help="timed chunks per runner")
  args = parser.parse_args(argv)
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), chunks of "
        f"{args.steps} steps, median of {args.repeats}")
  print(f"{'size':<20} {'way':<13} {'compile s':>10} {'ms/step':>9} {'vs jitted':>10}")
  for name, (width, batch) in SIZES.items():
    rows = measure(width, batch, args.steps, args.repeats)
    reference = rows["jitted step"][1]
    for way, (compile_s, per_step) in rows.items():
      print(f"{name:<20} {way:<13} {compile_s:>10.1f} {1e3 * per_step:>9.1f} "
            f"{per_step / reference:>9.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
