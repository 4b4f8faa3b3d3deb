"""Model registry: `get_model(model_config)` and `param_count(model_config)`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffdyn.models import unet

MODELS = ("unet_cifar32",)


def get_model(model_config, dtype=jnp.float32) -> unet.UNet:
  """Builds the network named by `model_config.name` (the seeds' `unet_cifar32`)."""
  if model_config.name not in MODELS:
    raise ValueError(f"unknown model {model_config.name!r}; expected one of {MODELS}")
  return unet.UNet(
      base_channels=model_config.base_channels,
      channel_mult=tuple(model_config.channel_mult),
      num_res_blocks=model_config.num_res_blocks,
      attn_resolutions=tuple(model_config.attn_resolutions),
      dropout=model_config.dropout,
      dtype=dtype)


def init_params(model, rng, image_size: int, channels: int = 3):
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return model.init({"params": rng}, x, t, train=False)["params"]


def param_count(model_config) -> int:
  """Number of trainable parameters, from shapes alone (nothing is allocated)."""
  model = get_model(model_config)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), model_config.image_size,
                                              model_config.channels))
  return int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))
