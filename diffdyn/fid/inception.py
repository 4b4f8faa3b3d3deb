"""The FID variant of InceptionV3 (as in pytorch-fid), its input pipeline and pool3 features.

Submodule and parameter names follow pytorch-fid's state_dict keys one to one, so that
`weights.params_from_torch_state_dict` is a renaming plus layout transposes.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffdyn.errors import UserError

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
# Bumped whenever the images -> features mapping changes, so cached statistics go stale.
PREPROCESSING_VERSION = "uint8/255-bilinear299-align_corners_false-2x-1-pool3-v1"

Padding = Sequence[tuple[int, int]]


def _pad(ph: int, pw: int) -> Padding:
  return ((ph, ph), (pw, pw))


class FrozenBatchNorm(nn.Module):
  """BatchNorm in inference form: the running statistics are parameters, never updated."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    mul = scale * jax.lax.rsqrt(var + BN_EPS)
    return x * mul + (bias - mean * mul)


class BasicConv(nn.Module):
  """Conv (no bias) -> frozen BatchNorm -> ReLU; pytorch-fid's BasicConv2d."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = ((0, 0), (0, 0))
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    # The kernel is always pytorch-fid's (weights.py), never an initialiser's: zeros keep the
    # trace of `param_shapes` (each FID run's start) to half that of a random init.
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=self.padding,
                use_bias=False, precision=self.precision, kernel_init=nn.initializers.zeros,
                name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3(x):
  # The padded border does not count towards the mean (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (FIDInceptionA)."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: the 35x35 -> 17x17 reduction."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (FIDInceptionC): factorised 7x7 convolutions."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    c7 = self.channels_7x7
    row = dict(kernel_size=(1, 7), padding=_pad(0, 3))
    col = dict(kernel_size=(7, 1), padding=_pad(3, 0))
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, name="branch7x7_2", **row)(b7)
    b7 = conv(192, name="branch7x7_3", **col)(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, name="branch7x7dbl_2", **col)(bd)
    bd = conv(c7, name="branch7x7dbl_3", **row)(bd)
    bd = conv(c7, name="branch7x7dbl_4", **col)(bd)
    bd = conv(192, name="branch7x7dbl_5", **row)(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: the 17x17 -> 8x8 reduction."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""
  max_pool: bool
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    row = dict(kernel_size=(1, 3), padding=_pad(0, 1))
    col = dict(kernel_size=(3, 1), padding=_pad(1, 0))
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, name="branch3x3_2a", **row)(b3),
                          conv(384, name="branch3x3_2b", **col)(b3)], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, name="branch3x3dbl_3a", **row)(bd),
                          conv(384, name="branch3x3dbl_3b", **col)(bd)], axis=-1)
    if self.max_pool:
      # The TF graph behind the FID weights max-pools here, unlike torchvision's InceptionE.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
    else:
      pooled = _avg_pool_3x3(x)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """Maps preprocessed (N, 299, 299, 3) images in [-1, 1] to (N, 2048) pool3 features."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    p = self.precision
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = InceptionA(32, p, name="Mixed_5b")(x)
    x = InceptionA(64, p, name="Mixed_5c")(x)
    x = InceptionA(64, p, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    x = InceptionC(128, p, name="Mixed_6b")(x)
    x = InceptionC(160, p, name="Mixed_6c")(x)
    x = InceptionC(160, p, name="Mixed_6d")(x)
    x = InceptionC(192, p, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def param_shapes() -> dict:
  """The Flax parameter tree of InceptionV3 as ShapeDtypeStructs (nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)["params"]


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix of PyTorch's bilinear resize with align_corners=False.

  Output pixel d samples the input at s = (d + 0.5) * in_size / out_size - 0.5, clamped at 0,
  and mixes pixels floor(s) and floor(s) + 1 (the last pixel repeats at the far edge).
  No antialiasing, as in F.interpolate's default.
  """
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def resize_bilinear(x, out_hw: tuple[int, int], precision=None):
  """Resizes float NHWC images like F.interpolate(mode='bilinear', align_corners=False)."""
  _, h, w, _ = x.shape
  if (h, w) == tuple(out_hw):
    return x
  mh = jnp.asarray(bilinear_matrix(h, out_hw[0]), x.dtype)
  mw = jnp.asarray(bilinear_matrix(w, out_hw[1]), x.dtype)
  return jnp.einsum("ph,nhwc,qw->npqc", mh, x, mw, precision=precision)


@functools.partial(jax.jit, static_argnames=("precision",))
def preprocess(images_uint8, precision=None):
  """uint8 NHWC -> float32 (N, 299, 299, 3) in [-1, 1], as pytorch-fid prepares its input."""
  x = images_uint8.astype(jnp.float32) / 255.0
  x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE), precision=precision)
  return 2.0 * x - 1.0


@functools.partial(jax.jit, static_argnames=("precision",))
def pool3(params, x, precision=None):
  """Preprocessed images -> (N, 2048) float32 pool3 features."""
  return InceptionV3(precision=precision).apply({"params": params}, x)


def check_images(images) -> np.ndarray:
  """Returns `images` as a uint8 (N, H, W, 3) array, or raises UserError."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
    raise UserError(f"FID expects a non-empty uint8 NHWC batch with 3 channels, got shape "
                    f"{images.shape}; pass images as (N, H, W, 3)")
  if images.dtype != np.uint8:
    raise UserError(f"FID expects uint8 images, got {images.dtype}; convert them first "
                    "(diffusion.to_uint8 for model outputs in [-1, 1])")
  return images


def inception_features(params, images_uint8_nhwc, batch_size: int = 500, *,
                       precision=None) -> np.ndarray:
  """(N, 2048) float64 pool3 features of uint8 NHWC images.

  Images go through in batches of min(batch_size, N); the last one is padded, so a given
  (batch, image size) compiles once. `precision` is passed to every convolution and to
  the resize (None: JAX's default, or the `jax.default_matmul_precision` in force).
  """
  images = check_images(images_uint8_nhwc)
  if batch_size < 1:
    raise UserError(f"fid batch_size must be >= 1, got {batch_size}")
  n = images.shape[0]
  batch = min(batch_size, n)
  params = jax.device_put(params)
  out, pending = [], None
  for start in range(0, n, batch):
    chunk = images[start:start + batch]
    if len(chunk) < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:],
                                              np.uint8)])
    feats = pool3(params, preprocess(chunk, precision=precision), precision=precision)
    # Fetch the previous batch while this one runs.
    if pending is not None:
      out.append(np.asarray(pending, np.float64))
    pending = feats
  out.append(np.asarray(pending, np.float64))
  return np.concatenate(out)[:n]
