"""Training images: CIFAR-10 (tfds, a local .npz or a cifar-10-batches-py folder) or synthetic.

A data set is one uint8 NHWC numpy array. It goes onto the device once; `sample_batch` draws
batches (with flips) inside the jitted train step, so no host pipeline runs during training.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from diffdyn import tf_support
from diffdyn.errors import UserError

_LOCAL_HINT = ("point the config at a local copy: --config.data.path=/path/to/cifar-10-batches-py "
               "(the folder from cifar-10-python.tar.gz) or an .npz holding uint8 NHWC 'images'")


def synthetic_images(num_images: int, image_size: int, seed: int) -> np.ndarray:
  """Deterministic structured images: a colour gradient, a disc and stripes per image.

  They have edges, flat regions and texture at several scales, so a small model learns
  something visible in a few hundred steps, and a seed fixes them exactly.
  """
  rng = np.random.default_rng(seed)
  n, s = num_images, image_size
  yy, xx = np.meshgrid(np.linspace(0, 1, s), np.linspace(0, 1, s), indexing="ij")
  c0, c1, c2 = (rng.uniform(0, 1, (n, 1, 1, 3)) for _ in range(3))
  angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
  ramp = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
  img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
  cy, cx = rng.uniform(0.2, 0.8, (2, n, 1, 1))
  radius = rng.uniform(0.1, 0.3, (n, 1, 1))
  disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2)[..., None]
  img = np.where(disc, c2, img)
  freq = rng.integers(2, 6, (n, 1, 1))
  stripes = 0.15 * np.sign(np.sin(2 * np.pi * freq * xx))[..., None]
  img = np.clip(img + np.where(disc, 0.0, stripes), 0, 1)
  return np.round(img * 255).astype(np.uint8)


def _as_nhwc_uint8(arr: np.ndarray, source: str) -> np.ndarray:
  if arr.ndim != 4:
    raise UserError(f"{source}: expected images of shape (N, H, W, 3), got {arr.shape}")
  if arr.shape[1] == 3 and arr.shape[-1] != 3:
    arr = arr.transpose(0, 2, 3, 1)
  if arr.dtype != np.uint8:
    raise UserError(f"{source}: expected uint8 images, got {arr.dtype}")
  return np.ascontiguousarray(arr)


def load_npz(path: str) -> np.ndarray:
  try:
    with np.load(path) as f:
      for key in ("images", "x", "x_train", "image"):
        if key in f:
          return _as_nhwc_uint8(f[key], path)
      raise UserError(f"{path}: no 'images' array inside (found {', '.join(f.files)}); "
                      "save the uint8 NHWC images under the key 'images'")
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"{path}: not a readable .npz ({e}); {_LOCAL_HINT}") from None


def load_cifar_batches(folder: str, split: str) -> np.ndarray:
  names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
  chunks = []
  for name in names:
    path = os.path.join(folder, name)
    try:
      with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
      data = np.asarray(batch[b"data"], np.uint8)
    except FileNotFoundError:
      raise UserError(f"{path} is missing: {folder} is not a complete cifar-10-batches-py "
                      f"folder; {_LOCAL_HINT}") from None
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as e:
      raise UserError(f"{path} is corrupt ({type(e).__name__}); re-extract "
                      "cifar-10-python.tar.gz") from None
    chunks.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return np.ascontiguousarray(np.concatenate(chunks))


def load_tfds(split: str, data_dir: str) -> np.ndarray:
  try:
    tf_support.import_tensorflow()
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("tensorflow-datasets and TensorFlow are not installed (pip install "
                    f"'diffdyn[tfds]'), or {_LOCAL_HINT}") from None
  try:
    ds = tfds.load("cifar10", split=split, data_dir=data_dir or None)
    chunks = [b["image"] for b in tfds.as_numpy(ds.batch(5000))]
    return np.ascontiguousarray(np.concatenate(chunks).astype(np.uint8))
  except Exception as e:  # tfds raises many types for a failed download; all mean the same here
    raise UserError(f"could not load CIFAR-10 with tensorflow-datasets ({type(e).__name__}); "
                    f"{_LOCAL_HINT}") from None


def load_images(data_config) -> np.ndarray:
  """The whole training set as uint8 NHWC numpy."""
  if data_config.name == "synthetic":
    return synthetic_images(data_config.synthetic_num_images, data_config.image_size,
                            data_config.synthetic_seed)
  path = data_config.path
  if path:
    if not os.path.exists(path):
      raise UserError(f"data.path {path!r} does not exist; {_LOCAL_HINT}")
    images = (load_cifar_batches(path, data_config.split) if os.path.isdir(path)
              else load_npz(path))
  else:
    images = load_tfds(data_config.split, data_config.tfds_data_dir)
  if images.shape[1:3] != (data_config.image_size,) * 2:
    raise UserError(f"the data set's images are {images.shape[1]}x{images.shape[2]} but "
                    f"data.image_size is {data_config.image_size}; set them to agree")
  return images


def to_model_range(images_uint8: jax.Array) -> jax.Array:
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def sample_batch(images: jax.Array, rng: jax.Array, batch_size: int,
                 random_flip: bool) -> jax.Array:
  """A uniformly drawn batch in [-1, 1], each image flipped left-right with probability 1/2.

  Indices are drawn with replacement from the step's own key, which keeps every step a pure
  function of (key, step) and so makes resumed runs replay exactly.
  """
  k_idx, k_flip = jax.random.split(rng)
  idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
  x = to_model_range(images[idx])
  if random_flip:
    flip = jax.random.bernoulli(k_flip, 0.5, (batch_size, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1, :], x)
  return x
