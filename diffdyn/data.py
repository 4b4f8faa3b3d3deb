"""Training images: CIFAR-10 (tfds or cifar-10-batches-py), a local .npz or image folder, synthetic.

A data set is one uint8 NHWC numpy array, checked before anything is written: rank, dtype,
layout, 3 channels, square images of the configured size, enough images. It goes onto the
device once; `sample_batch` draws batches (with flips) inside the jitted train step, so no
host pipeline runs during training.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from diffdyn.configs import default
from diffdyn import tf_support
from diffdyn.errors import UserError

# The data.* keys each source reads, besides name, image_size and random_flip, which all do.
SOURCE_KEYS = {
    "cifar10": ("split", "path", "tfds_data_dir"),   # path: a cifar-10-batches-py folder
    "npz": ("path", "layout"),
    "folder": ("path",),
    "synthetic": ("synthetic_num_images", "synthetic_seed"),
}
# Keys whose name says which source they are for: an experiment that sets them can switch its
# source with one override (smoke.py with --config.data.name=npz) without resetting them.
_NAMED_FOR_THEIR_SOURCE = ("synthetic_num_images", "synthetic_seed")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_LOCAL_HINT = ("point the config at a local copy: --config.data.path=/path/to/cifar-10-batches-py "
               "(the folder from cifar-10-python.tar.gz), or --config.data.name=npz with an .npz "
               "holding uint8 NHWC 'images'")


def check_source_keys(data_config) -> None:
  """Raises UserError for a data key set away from its default that the chosen source ignores."""
  name, defaults = data_config.name, default.get_config().data
  if name in ("npz", "folder") and not data_config.path:
    kind = "an .npz file" if name == "npz" else "a folder of PNG/JPEG images"
    raise UserError(f"data.name={name!r} needs data.path: pass --config.data.path=... naming "
                    f"{kind}")
  if name == "cifar10" and data_config.path and data_config.tfds_data_dir:
    raise UserError("config data.tfds_data_dir is ignored when data.path is set (CIFAR-10 is "
                    "then read from the cifar-10-batches-py folder there); remove one of them")
  for key in sorted({key for keys in SOURCE_KEYS.values() for key in keys}):
    if (key in SOURCE_KEYS[name] or key in _NAMED_FOR_THEIR_SOURCE
        or data_config[key] == defaults[key]):
      continue
    readers = " or ".join(repr(n) for n, keys in SOURCE_KEYS.items() if key in keys)
    raise UserError(f"config data.{key}={data_config[key]!r} is ignored by data.name={name!r} "
                    f"(only {readers} reads it); remove it, or set the data.name that reads it")


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


def check_images(images: np.ndarray, source: str, image_size: int, *, batch_size: int = 1,
                 probe_batch_size: int = 0) -> None:
  """Raises UserError, naming `source` and the fix, unless `images` is a usable training set.

  That is: uint8 (N, image_size, image_size, 3) with N at least `batch_size` (train.batch_size)
  and `probe_batch_size` (the fixed curvature probe batch, 0 without one), so that each batch
  can hold distinct images.
  """
  shape = images.shape
  if images.ndim != 4:
    hint = ("; a grayscale set (N, H, W) needs a channel axis, and 3 channels: "
            "np.repeat(x[..., None], 3, axis=-1)" if images.ndim == 3 else "")
    raise UserError(f"{source}: images must be a 4-D array (N, H, W, 3), got shape {shape}{hint}")
  if images.dtype != np.uint8:
    raise UserError(f"{source}: images must be uint8 (0-255), got {images.dtype}; convert "
                    "them, e.g. np.round(x * 255).astype(np.uint8) for floats in [0, 1]")
  channels = shape[-1]
  if channels != 3 and shape[1] in (1, 3, 4):
    raise UserError(f"{source}: images of shape {shape} look channels-first (NCHW); pass "
                    "--config.data.layout=NCHW, or store them as (N, H, W, 3)")
  if channels == 1:
    raise UserError(f"{source}: images are grayscale (1 channel); the model trains on RGB: "
                    "repeat the channel, np.repeat(x, 3, axis=-1)")
  if channels == 4:
    raise UserError(f"{source}: images are RGBA (4 channels); the model trains on RGB: drop "
                    "the alpha channel, x[..., :3] (or composite onto a background first)")
  if channels != 3:
    raise UserError(f"{source}: images must have 3 channels (RGB), got shape {shape}")
  if shape[1] != shape[2]:
    raise UserError(f"{source}: images are {shape[1]}x{shape[2]}, not square; crop or resize "
                    f"them to {image_size}x{image_size}")
  if shape[1] != image_size:
    raise UserError(f"{source}: images are {shape[1]}x{shape[2]} but data.image_size is "
                    f"{image_size}; set --config.data.image_size={shape[1]} "
                    f"--config.model.image_size={shape[1]}, or resize them")
  needed = max(batch_size, probe_batch_size, 1)
  if shape[0] < needed:
    why = " and ".join(f"{key} ({n})" for key, n in (("train.batch_size", batch_size),
                                                      ("curvature.batch_size", probe_batch_size))
                       if n == needed)
    raise UserError(f"{source} holds {shape[0]} images, fewer than {why} needs; add images, or "
                    "lower it")


def load_npz(path: str, layout: str = "NHWC") -> np.ndarray:
  try:
    with np.load(path) as f:
      key = next((k for k in ("images", "x", "x_train", "image") if k in f), None)
      if key is None:
        raise UserError(f"{path}: no 'images' array inside (found {', '.join(f.files)}); "
                        "save the uint8 NHWC images under the key 'images'")
      images = f[key]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"{path}: not a readable .npz ({e}); save the images with "
                    "np.savez(path, images=x), x uint8 of shape (N, H, W, 3)") from None
  if layout == "NCHW":
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
      raise UserError(f"{path}: data.layout is 'NCHW' but the array of shape {images.shape} "
                      "has no channel axis after N; for (N, H, W, 3) images, set "
                      "--config.data.layout=NHWC")
    images = images.transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images)


def load_folder(folder: str) -> np.ndarray:
  """Every PNG/JPEG under `folder` (subfolders too, in sorted path order), as one array."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  paths = sorted(os.path.join(root, name) for root, dirs, names in os.walk(folder)
                 for name in names
                 if name.lower().endswith(_IMAGE_SUFFIXES) and not name.startswith("."))
  if not paths:
    raise UserError(f"{folder} holds no .png, .jpg or .jpeg files; point data.path at the folder "
                    "of training images")
  images = []
  for path in paths:
    try:
      with Image.open(path) as image:
        if image.mode == "P":   # palette entries are RGB colours: nothing invented or lost
          image = image.convert("RGB")
        if image.mode != "RGB":
          raise UserError(f"{path} is a {image.mode!r} image; the model trains on RGB: "
                          "convert the folder's images to RGB (drop alpha, repeat gray)")
        images.append(np.asarray(image, np.uint8))
    except (OSError, SyntaxError) as e:   # PIL's errors for an unreadable or truncated file
      raise UserError(f"{path} is not a readable image ({e}); replace or remove it") from None
    if images[-1].shape != images[0].shape:
      raise UserError(f"{path} is {images[-1].shape[1]}x{images[-1].shape[0]} but "
                      f"{paths[0]} is {images[0].shape[1]}x{images[0].shape[0]}; the images "
                      "must all have one size")
  return np.stack(images)


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


def load_images(data_config, *, batch_size: int = 1, probe_batch_size: int = 0) -> np.ndarray:
  """The whole training set as uint8 NHWC numpy, checked by `check_images` (see there)."""
  name, path = data_config.name, data_config.path
  if name == "synthetic":
    images = synthetic_images(data_config.synthetic_num_images, data_config.image_size,
                              data_config.synthetic_seed)
    source = f"the synthetic data set (data.synthetic_num_images={images.shape[0]})"
  elif name == "cifar10" and not path:
    images = load_tfds(data_config.split, data_config.tfds_data_dir)
    source = f"CIFAR-10's {data_config.split} split from tensorflow-datasets"
  else:
    _check_path(name, path)
    source = path
    if name == "cifar10":
      images = load_cifar_batches(path, data_config.split)
    elif name == "npz":
      images = load_npz(path, data_config.layout)
    else:
      images = load_folder(path)
  check_images(images, source, data_config.image_size, batch_size=batch_size,
               probe_batch_size=probe_batch_size)
  return images


def _check_path(name: str, path: str) -> None:
  """Raises UserError unless `path` exists and is what source `name` reads (file or folder)."""
  if not os.path.exists(path):
    raise UserError(f"data.path {path!r} does not exist; {_LOCAL_HINT}")
  wants_folder = name in ("cifar10", "folder")
  if os.path.isdir(path) == wants_folder:
    return
  if wants_folder:
    raise UserError(f"data.path {path!r} is a file, but data.name={name!r} reads a folder; "
                    "for an .npz file, set --config.data.name=npz")
  raise UserError(f"data.path {path!r} is a folder, but data.name='npz' reads an .npz file; "
                  "for a folder of PNG/JPEG files set --config.data.name=folder, for "
                  "cifar-10-batches-py --config.data.name=cifar10")


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
