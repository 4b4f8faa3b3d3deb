"""The DDPM UNet: the reference parameter count, shapes and the bf16 path."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffdyn import models
from diffdyn.configs import default as base
from experiments import smoke


def test_param_count_matches_ddpm_cifar10_reference():
  # Ho et al. (2020)'s CIFAR-10 model (ch=128, ch_mult (1,2,2,2), 2 res blocks, attention at
  # 16x16) has 35,746,307 parameters: the published count of the reference implementation.
  model_config = ml_collections.ConfigDict(base.get_config().model)
  model_config.base_channels = 128
  assert models.param_count(model_config) == 35_746_307


def test_param_count_scales_with_width():
  # Conv/dense weights dominate and scale with width squared: doubling the width gives
  # close to 4x the parameters (biases and norms scale linearly, so a bit under 4x).
  model_config = ml_collections.ConfigDict(base.get_config().model)
  n32 = models.param_count(model_config)
  model_config.base_channels = 64
  n64 = models.param_count(model_config)
  assert 3.9 < n64 / n32 < 4.0


def _small_model_config():
  """The smoke model at 8x8 with one level, attention (and dropout) kept: a few seconds of
  compiling on a CPU per program, against tens for the two-level 16x16 one."""
  model_config = ml_collections.ConfigDict(smoke.get_config().model)
  model_config.image_size, model_config.channel_mult = 8, (1,)
  model_config.attn_resolutions = (8,)
  return model_config


def _perturbed_params(model, image_size):
  # DDPM zero-initialises the layers closing each residual branch and the output conv, so a
  # fresh network outputs ~0 whatever its input; perturbing the weights makes effects visible.
  def init():
    params = models.init_params(model, jax.random.key(0), image_size)
    return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape),
                        params)
  return jax.jit(init)()   # one program, not hundreds of eager random draws


def test_forward_shape_dtype_and_dropout():
  model_config = _small_model_config()
  assert model_config.dropout > 0
  model = models.get_model(model_config)
  params = _perturbed_params(model, model_config.image_size)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  t = jnp.array([0, 99])
  apply = jax.jit(model.apply, static_argnames="train")
  out = apply({"params": params}, x, t, train=False)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # Deterministic mode ignores the dropout key; train mode with dropout > 0 depends on it.
  a = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(2)})
  b = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(a, b)
  bf16 = models.get_model(model_config, jnp.bfloat16)
  out16 = jax.jit(bf16.apply, static_argnames="train")({"params": params}, x, t, train=False)
  assert out16.dtype == jnp.float32
  # bf16 keeps ~3 significant digits; the outputs of the two precisions agree to a few percent.
  np.testing.assert_allclose(out16, out, atol=0.05 * float(jnp.abs(out).max()) + 1e-3)


def test_time_embedding_distinguishes_timesteps():
  model_config = _small_model_config()
  model = models.get_model(model_config)
  params = _perturbed_params(model, model_config.image_size)
  x = jnp.ones((2, 8, 8, 3))
  out = jax.jit(model.apply, static_argnames="train")({"params": params}, x, jnp.array([1, 90]),
                                                       train=False)
  assert not np.allclose(out[0], out[1])
