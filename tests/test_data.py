"""Data loading (synthetic, npz, cifar-10-batches-py, tfds) and on-device batches."""
import os
import pickle

import jax
import ml_collections
import numpy as np
import pytest

from diffdyn import data
from diffdyn.errors import UserError
from diffdyn.configs import default as base


def _data_config(**kw):
  cfg = ml_collections.ConfigDict(base.get_config().data)
  cfg.update(kw)
  return cfg


def test_synthetic_is_deterministic_and_structured():
  a = data.synthetic_images(16, 32, seed=3)
  b = data.synthetic_images(16, 32, seed=3)
  c = data.synthetic_images(16, 32, seed=4)
  assert a.dtype == np.uint8 and a.shape == (16, 32, 32, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Structure, not noise: neighbouring pixels are strongly correlated.
  x = a.astype(np.float64)
  assert np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1] > 0.8


def test_npz_and_nchw(tmp_path):
  imgs = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
  path = tmp_path / "c.npz"
  np.savez(path, images=imgs)
  out = data.load_images(_data_config(path=str(path)))
  np.testing.assert_array_equal(out, imgs.transpose(0, 2, 3, 1))


def _write_cifar_folder(folder, n_per_batch=3):
  os.makedirs(folder)
  rng = np.random.default_rng(1)
  batches = []
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    flat = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump({b"data": flat, b"labels": [0] * n_per_batch}, f)
    batches.append(flat)
  return batches


def test_cifar_batches_folder(tmp_path):
  folder = str(tmp_path / "cifar-10-batches-py")
  batches = _write_cifar_folder(folder)
  train = data.load_images(_data_config(path=folder))
  assert train.shape == (15, 32, 32, 3)
  # CIFAR's rows are 1024 red, then green, then blue values, each row-major 32x32.
  first = batches[0][0]
  np.testing.assert_array_equal(train[0, :, :, 0], first[:1024].reshape(32, 32))
  np.testing.assert_array_equal(train[0, :, :, 2], first[2048:].reshape(32, 32))
  test = data.load_images(_data_config(path=folder, split="test"))
  assert test.shape == (3, 32, 32, 3)


def test_missing_and_corrupt_files_name_the_fix(tmp_path):
  with pytest.raises(UserError, match="does not exist.*data.path"):
    data.load_images(_data_config(path=str(tmp_path / "nope.npz")))
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(UserError, match="bad.npz"):
    data.load_images(_data_config(path=str(bad)))
  folder = str(tmp_path / "partial")
  _write_cifar_folder(folder)
  os.remove(os.path.join(folder, "data_batch_3"))
  with pytest.raises(UserError, match="data_batch_3 is missing"):
    data.load_images(_data_config(path=folder))


def test_tfds_path_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    out = data.load_images(_data_config())
  assert out.shape == (6, 32, 32, 3) and out.dtype == np.uint8


def test_sample_batch_range_and_flip():
  images = jax.device_put(data.synthetic_images(8, 16, seed=0))
  x = data.sample_batch(images, jax.random.key(0), 64, random_flip=True)
  assert x.shape == (64, 16, 16, 3)
  assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
  # Every drawn image equals (to float32 rounding of x/127.5 - 1) a data image or its mirror image; both kinds occur.
  ref = np.asarray(images, np.float32) / 127.5 - 1
  kinds = set()
  for img in np.asarray(x):
    plain = np.isclose(ref, img, atol=1e-6).all(axis=(1, 2, 3)).any()
    mirrored = np.isclose(ref[:, :, ::-1], img, atol=1e-6).all(axis=(1, 2, 3)).any()
    assert plain or mirrored
    kinds.add((plain, mirrored))
  assert (True, False) in kinds and (False, True) in kinds
