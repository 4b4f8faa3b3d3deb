"""What is specific to replicates: the grid of a sweep, its stacked arrays, devices and processes.

A sweep is the grid of `config.sweep`'s seeds and its non-empty variant tuples
(`minsnr_gamma`, `learning_rate`, `ema_decay`, `loss_weighting`). Its R replicates share one
jitted program (built by `train.py`, whose loop runs one run and a sweep alike): the train
state carries a leading run axis, the step is `jax.vmap`-ed over it, and what differs between
replicates enters as arrays, never as constants:

  * the per-timestep loss weights, (R, T): a weighting or a gamma is just another row;
  * the EMA decay, (R,);
  * the learning rate, inside the optimizer state (`objective.make_optimizer`).

A config that asks for no replicates is one run, unstacked: `Replicas.stacked` is False and
every helper here is then the identity. Each replicate of a sweep is a run of its own:
`workdir/<name>_seed<seed>/` holds its config.json (a single run's config, with its seed and
variant values), metrics.jsonl, samples and FID, so the analysis commands read it like any
other run. The sweep keeps its config.json and one checkpoint of the stacked state in `workdir`.

Replicate i follows the single run with its config to float tolerance: its step keys are
fold_in(train_key(seed_i), step) as in a single run. Batched convolutions may round
differently from unbatched ones, so losses agree to ~1e-6 relative, not bitwise.

Devices: the replicates are split over all devices (a 1-D Mesh, NamedSharding on the run
axis) when R divides evenly; otherwise each replicate's batch is split (data parallel), or,
when neither divides, everything is replicated. With several processes (multi-host),
`jax.distributed.initialize()` runs first when the environment says so, and process 0 writes
every file except the checkpoints, which orbax writes from all of them.

  python launch.py --config experiments/e6.py --workdir runs/e6x8 --config.sweep.seeds=8
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from diffdyn import config as config_lib
from diffdyn.errors import UserError

log = logging.getLogger("diffdyn")

# Sweep key -> (the config key each value sets, the tag naming the value in run names).
VARIANTS = {
    "loss_weighting": ("loss.weighting", ""),
    "minsnr_gamma": ("loss.minsnr_gamma", "gamma"),
    "learning_rate": ("train.learning_rate", "lr"),
    "ema_decay": ("train.ema_decay", "ema"),
}
MESH_AXIS = "devices"
SPLITS = ("auto", "replicas", "batch", "none")


def is_sweep(config) -> bool:
  """Whether `config` asks for replicates rather than one run (validation comes later)."""
  s = config.sweep
  try:
    return s.seeds > 1 or bool(s.seed_list) or any(s[key] for key in VARIANTS)
  except TypeError:  # a malformed value: the run's validation names it
    return False


# ----------------------------------------------------------------------------------------------
# The replicates of a sweep.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Replicate:
  name: str                                 # its run directory under the sweep's workdir
  config: ml_collections.FrozenConfigDict   # a single run's config: own seed and variant values


def sweep_seeds(config) -> list[int]:
  s = config.sweep
  if s.seed_list:
    if s.seeds not in (1, len(s.seed_list)):
      raise UserError(f"config sweep.seeds ({s.seeds}) must be 1 or the number of "
                      f"sweep.seed_list ({len(s.seed_list)}) when a seed list is given")
    return list(s.seed_list)
  if config.seed + s.seeds > 2**32:
    raise UserError(f"config seed + sweep.seeds ({config.seed} + {s.seeds}) must be <= 2**32")
  return [config.seed + i for i in range(s.seeds)]


def _format_value(value) -> str:
  return value if isinstance(value, str) else f"{value:g}"


def replicates(config) -> list[Replicate]:
  """The runs of `config`: itself for a single run; a sweep's, variant by variant, seed by seed.

  A replicate's config is the sweep's with the variant values set, its seed, and `sweep` back
  to a single run; a variant's values also extend `name` (e.g. "e6_gamma1"), so analysis
  groups each variant's seeds as one experiment.
  """
  if not is_sweep(config):
    return [Replicate(config.name, config_lib.validate(config))]
  axes = [(key, tuple(config.sweep[key])) for key in VARIANTS if config.sweep[key]]
  seeds = sweep_seeds(config)
  out = []
  for values in itertools.product(*(v for _, v in axes)):
    for seed in seeds:
      cfg = ml_collections.ConfigDict(config_lib.to_dict(config))
      suffix = ""
      for (key, _), value in zip(axes, values):
        target, tag = VARIANTS[key]
        section, field = target.split(".")
        cfg[section][field] = type(cfg[section][field])(value)
        suffix += f"_{tag}{_format_value(value)}"
      cfg.name = config.name + suffix
      cfg.seed = seed
      cfg.sweep.seeds = 1
      for key in ("seed_list", *VARIANTS):
        cfg.sweep[key] = ()
      out.append(Replicate(f"{cfg.name}_seed{seed}", config_lib.validate(cfg)))
  return out


# ----------------------------------------------------------------------------------------------
# Devices and processes.
# ----------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> bool:
  """Starts JAX's multi-process runtime when the environment describes a multi-process job.

  JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID set by hand, or a
  SLURM / Open MPI job of several tasks (JAX reads those itself). Call it before any JAX
  computation; returns whether it initialized.
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return False
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
                               process_id=int(env.get("JAX_PROCESS_ID", "0")))
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


@dataclasses.dataclass(frozen=True)
class Placement:
  """A 1-D mesh over the devices, and what the sweep splits over it."""
  mesh: Mesh
  split: str   # "replicas" (the run axis), "batch" (each replicate's batch) or "none"

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def per_replicate(self) -> NamedSharding:
    """Arrays with a leading run axis: the state and the hyperparameters."""
    spec = PartitionSpec(MESH_AXIS) if self.split == "replicas" else PartitionSpec()
    return NamedSharding(self.mesh, spec)

  @property
  def batch(self) -> NamedSharding | None:
    """One replicate's batch, split on its leading axis, when the batch is what is split."""
    return NamedSharding(self.mesh, PartitionSpec(MESH_AXIS)) if self.split == "batch" else None


def plan_placement(num_replicas: int, batch_size: int, devices=None,
                   split: str = "auto") -> Placement:
  """Splits the replicates over the devices if they divide evenly, else the batch, else nothing."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; expected one of {SPLITS}")
  if split == "auto":
    split = ("none" if n == 1 else "replicas" if num_replicas % n == 0
             else "batch" if batch_size % n == 0 else "none")
  if split == "replicas" and num_replicas % n or split == "batch" and batch_size % n:
    raise UserError(f"cannot split {split} over {n} devices: {num_replicas} replicates, batch "
                    f"{batch_size}; use a multiple of {n}")
  if n > 1 and split == "none":
    log.warning("%d replicates of batch %d do not divide over %d devices: every device runs "
                "everything", num_replicas, batch_size, n)
  return Placement(Mesh(np.asarray(devices), (MESH_AXIS,)), split)


def put(tree, sharding: NamedSharding):
  """Host arrays -> global arrays on `sharding` (every process passes the same values)."""
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree)


def fetch(tree):
  """Global arrays -> host numpy, whichever process holds which shard."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------------------------
# R runs as one program.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Replicas:
  """The runs one program trains, how they are laid out and where they live.

  `stacked`: every leaf of the state has a leading run axis of length R, and per-run
  functions are vmapped over it. A single run (a config that is no sweep) is unstacked: its
  state, checkpoints and compiled step are exactly a plain run's.
  """
  runs: tuple[Replicate, ...]
  run_dirs: tuple[str, ...]
  stacked: bool
  placement: Placement

  @property
  def size(self) -> int:
    return len(self.runs)

  @property
  def state_sharding(self) -> NamedSharding:
    return self.placement.per_replicate if self.stacked else self.placement.replicated

  def vmap(self, fn: Callable, in_axes) -> Callable:
    """`fn` over the run axis of the arguments `in_axes` marks (0), or `fn` itself if unstacked."""
    return jax.vmap(fn, in_axes=in_axes) if self.stacked else fn

  def stack(self, trees: Sequence[Any]):
    """Per-run host trees -> one tree (leading run axis if stacked), on the state's sharding."""
    tree = jax.tree.map(lambda *xs: np.stack(xs), *trees) if self.stacked else trees[0]
    return put(tree, self.state_sharding)

  def unstack(self, host_tree) -> list:
    """One host tree (from `fetch`) -> the per-run trees."""
    if not self.stacked:
      return [host_tree]
    return [jax.tree.map(lambda a, i=i: a[i], host_tree) for i in range(self.size)]

  def take_fn(self) -> Callable:
    """A jitted (state, i) -> run i's state, replicated on every device; compiled once for all i."""
    if not self.stacked:
      return lambda state, i: state
    return jax.jit(lambda state, i: jax.tree.map(lambda a: a[i], state),
                   out_shardings=self.placement.replicated)


def get_replicas(config, workdir: str, devices=None, split: str = "auto") -> Replicas:
  """The `Replicas` of a validated config: its runs, their directories and their placement."""
  runs = tuple(replicates(config))
  if not is_sweep(config):
    # One run on one device; spreading a run over devices is a sweep of one seed.
    device = (jax.local_devices() if devices is None else list(devices))[0]
    return Replicas(runs, (workdir,), False, plan_placement(1, 1, [device], "none"))
  run_dirs = tuple(os.path.join(workdir, r.name) for r in runs)
  placement = plan_placement(len(runs), config.train.batch_size, devices, split)
  return Replicas(runs, run_dirs, True, placement)
