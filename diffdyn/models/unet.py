"""The DDPM UNet of Ho et al. (2020), in Flax.

ResNet blocks (GroupNorm, SiLU, a projection of the time embedding, dropout), self-attention
at the resolutions listed in `attn_resolutions`, strided-conv downsampling and
nearest-neighbour + conv upsampling. Attention is plain einsum so that forward-mode
differentiation (the curvature probes' jvp-of-grad) works through it.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def default_init(scale: float = 1.0):
  # DDPM initialises with fan-average uniform variance scaling; a scale of 0 (the layers
  # that close each residual branch) is kept tiny rather than exactly 0 so gradients flow.
  return nn.initializers.variance_scaling(max(scale, 1e-10), "fan_avg", "uniform")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer timesteps, [sin | cos], as in the DDPM reference."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GroupNorm(nn.Module):
  """GroupNorm with up to 32 groups, computed in float32 whatever the activation dtype."""
  max_groups: int = 32

  @nn.compact
  def __call__(self, x):
    groups = math.gcd(self.max_groups, x.shape[-1])
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=jnp.float32)(x).astype(x.dtype)


class ResnetBlock(nn.Module):
  out_ch: int
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    h = nn.swish(GroupNorm()(x))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=default_init())(h)
    h = h + nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init())(
        nn.swish(temb))[:, None, None, :]
    h = nn.swish(GroupNorm()(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=default_init(0.0))(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init(), name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = GroupNorm()(x)
    q, k, v = (nn.Dense(c, dtype=self.dtype, kernel_init=default_init(), name=n)(h)
               for n in ("q", "k", "v"))
    q, k, v = (a.reshape(b, hgt * wid, c) for a in (q, k, v))
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hgt, wid, c)
    h = nn.Dense(c, dtype=self.dtype, kernel_init=default_init(0.0), name="proj_out")(h)
    return x + h


class Downsample(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # Asymmetric (0, 1) padding, as the reference's PyTorch port pads before a stride-2 conv.
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                   dtype=self.dtype, kernel_init=default_init())(x)


class Upsample(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, h * 2, w * 2, c), method="nearest")
    return nn.Conv(c, (3, 3), dtype=self.dtype, kernel_init=default_init())(x)


class UNet(nn.Module):
  """eps-network: (x_t in NHWC, integer t of shape (B,)) -> output of the same shape as x_t."""
  base_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    ch, dt = self.base_channels, self.dtype
    out_channels = x.shape[-1]
    temb = timestep_embedding(t, ch)
    temb = nn.Dense(4 * ch, dtype=dt, kernel_init=default_init())(temb)
    temb = nn.Dense(4 * ch, dtype=dt, kernel_init=default_init())(nn.swish(temb))

    def res(h, out_ch):
      return ResnetBlock(out_ch, self.dropout, dt)(h, temb, train)

    hs = [nn.Conv(ch, (3, 3), dtype=dt, kernel_init=default_init())(x.astype(dt))]
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res(hs[-1], ch * mult)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(dt)(h)
        hs.append(h)
      if level != len(self.channel_mult) - 1:
        hs.append(Downsample(dt)(hs[-1]))

    h = res(hs[-1], hs[-1].shape[-1])
    h = AttnBlock(dt)(h)
    h = res(h, h.shape[-1])

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = res(jnp.concatenate([h, hs.pop()], axis=-1), ch * mult)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(dt)(h)
      if level != 0:
        h = Upsample(dt)(h)

    h = nn.swish(GroupNorm()(h))
    h = nn.Conv(out_channels, (3, 3), dtype=dt, kernel_init=default_init(0.0))(h)
    return h.astype(jnp.float32)
