"""The training objective: random streams, batch draw, per-example loss, optimizer, EMA decay.

Pure functions over arrays and pytrees, no I/O. `train.py` builds its step from them and
`evaluate.py` its measurements, so both see one definition of the loss a run optimises.

Random numbers: a run's root key is `PRNGKey(seed)`; each stream (`STREAMS`) is
`fold_in(root, index)`. The train stream's key of step s is `fold_in(train_key, s)`, split
into one key per use (data, timesteps, noise, dropout), so no two uses share a key.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import optax

from diffdyn import data as data_lib
from diffdyn import diffusion

NUM_LOSS_BINS = 10
# Independent random streams of a run, all derived from its seed.
STREAMS = ("init", "train", "curvature", "probe_batch", "sample", "grid")


def stream_keys(seed) -> dict[str, jax.Array]:
  """{stream: key} for a run's seed (a Python int, or a traced uint32 under vmap)."""
  root = jax.random.PRNGKey(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(STREAMS)}


@flax.struct.dataclass
class StepKeys:
  """The keys one train step uses, each for one purpose."""
  data: jax.Array
  timesteps: jax.Array
  noise: jax.Array
  dropout: jax.Array


def step_keys(train_key: jax.Array, step: jax.Array) -> StepKeys:
  # One split into four: with partitionable threefry, split(k, n)[i] == fold_in(k, i), so a
  # key taken by fold_in(step_key, i) beside a split of step_key would repeat one of them.
  data, timesteps, noise, dropout = jax.random.split(jax.random.fold_in(train_key, step), 4)
  return StepKeys(data, timesteps, noise, dropout)


@dataclasses.dataclass(frozen=True)
class Batch:
  x0: jax.Array
  t: jax.Array
  noise: jax.Array


def draw_batch(keys: StepKeys, images: jax.Array, batch_size: int, num_timesteps: int,
               random_flip: bool) -> Batch:
  """Images (uniform, with replacement), timesteps (uniform over [0, T)) and noise of a step."""
  x0 = data_lib.sample_batch(images, keys.data, batch_size, random_flip)
  t = jax.random.randint(keys.timesteps, (batch_size,), 0, num_timesteps)
  noise = jax.random.normal(keys.noise, x0.shape, jnp.float32)
  return Batch(x0, t, noise)


def get_residual_fn(model, schedule: diffusion.Schedule, prediction: str) -> Callable:
  """(params, x0, t, noise, dropout_rng=None) -> (B, ...) float32 prediction minus its target.

  The per-example loss is the mean square of this residual; the curvature probes' Gauss-Newton
  trace differentiates it. With `dropout_rng` None the network runs deterministically
  (evaluation mode), as the curvature probes need.
  """

  def residual(params, x0, t, noise, dropout_rng=None):
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    train = dropout_rng is not None
    rngs = {"dropout": dropout_rng} if train else {}
    out = model.apply({"params": params}, x_t, t, train=train, rngs=rngs)
    target = diffusion.prediction_target(schedule, x0, t, noise, prediction)
    return out.astype(jnp.float32) - target.astype(jnp.float32)

  return residual


def get_per_example_loss_fn(model, schedule: diffusion.Schedule, prediction: str) -> Callable:
  """(params, x0, t, noise, dropout_rng=None) -> (B,) unweighted MSE of the prediction target."""
  residual = get_residual_fn(model, schedule, prediction)

  def per_example_loss(params, x0, t, noise, dropout_rng=None):
    r = residual(params, x0, t, noise, dropout_rng)
    return jnp.square(r).reshape(r.shape[0], -1).mean(axis=1)

  return per_example_loss


def weighted_loss(per_example: jax.Array, t: jax.Array, loss_weights: jax.Array) -> jax.Array:
  """mean_i w[t_i] l_i: the scalar a run minimises, for per-timestep weights (T,)."""
  return jnp.mean(loss_weights[t] * per_example)


def _adam(learning_rate, *, b1: float, b2: float, eps: float, warmup_steps: int,
          grad_clip_norm: float) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if warmup_steps > 0:
    parts.append(optax.scale_by_schedule(optax.linear_schedule(0.0, 1.0, warmup_steps)))
  parts.append(optax.scale(-learning_rate))
  return optax.chain(*parts)


def make_optimizer(learning_rate: float, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   warmup_steps: int = 0, grad_clip_norm: float = 0.0
                   ) -> optax.GradientTransformation:
  """Adam (with optional global-norm clipping and linear warm-up) whose learning rate is state.

  The learning rate lives in the optimizer state (`opt_state.hyperparams["learning_rate"]`),
  so replicates of a sweep with different rates share one program, and a resumed run can be
  given a new rate by setting it there (`with_learning_rate`).
  """
  factory = lambda learning_rate: _adam(learning_rate, b1=b1, b2=b2, eps=eps,
                                        warmup_steps=warmup_steps, grad_clip_norm=grad_clip_norm)
  return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def with_learning_rate(opt_state, learning_rate):
  """`opt_state` of `make_optimizer` with its learning rate replaced (any shape: (R,) for R runs)."""
  current = opt_state.hyperparams["learning_rate"]
  rate = jnp.broadcast_to(jnp.asarray(learning_rate, current.dtype), current.shape)
  return opt_state._replace(hyperparams=dict(opt_state.hyperparams, learning_rate=rate))


def adam_moments(opt_state) -> tuple[object, object, jax.Array]:
  """(mu, nu, count) of the Adam inside `make_optimizer`'s state."""
  inner = opt_state.inner_state
  adam_state = next(s for s in inner if isinstance(s, optax.ScaleByAdamState))
  return adam_state.mu, adam_state.nu, adam_state.count


def ema_decay_at(step: jax.Array, decay: jax.Array, warmup: bool) -> jax.Array:
  """The EMA decay of update number `step` (0 for the first update).

  Without warm-up it is `decay` throughout, so after s updates the average still holds
  decay**s of the initial parameters. With warm-up it is min(decay, (1 + step) / (10 + step)):
  0.1 at the first update, reaching `decay` after about 10 / (1 - decay) updates.
  """
  decay = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, decay: jax.Array):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf in the params' dtype."""
  new_weight = 1.0 - decay
  old_weight = 1.0 - new_weight   # as 1 - (1 - d) rounds, so that d = 0 copies the params
  return jax.tree.map(lambda new, old: new_weight * new + old_weight * old, params, ema_params)
