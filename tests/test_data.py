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


def test_npz_nhwc_and_declared_nchw(tmp_path):
  imgs = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  np.savez(tmp_path / "nhwc.npz", images=imgs)
  np.savez(tmp_path / "nchw.npz", x=imgs.transpose(0, 3, 1, 2))
  out = data.load_images(_data_config(name="npz", path=str(tmp_path / "nhwc.npz")))
  np.testing.assert_array_equal(out, imgs)
  out = data.load_images(_data_config(name="npz", path=str(tmp_path / "nchw.npz"),
                                      layout="NCHW"))
  np.testing.assert_array_equal(out, imgs)
  # Undeclared, channels-first is refused rather than guessed.
  with pytest.raises(UserError, match="look channels-first.*data.layout=NCHW"):
    data.load_images(_data_config(name="npz", path=str(tmp_path / "nchw.npz")))


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
  with pytest.raises(UserError, match="bad.npz: not a readable .npz"):
    data.load_images(_data_config(name="npz", path=str(bad)))
  with pytest.raises(UserError, match="is a file, but data.name='cifar10' reads a folder.*"
                                      "data.name=npz"):
    data.load_images(_data_config(path=str(bad)))
  with pytest.raises(UserError, match="is a folder, but data.name='npz'.*data.name=folder"):
    data.load_images(_data_config(name="npz", path=str(tmp_path)))
  folder = str(tmp_path / "partial")
  _write_cifar_folder(folder)
  os.remove(os.path.join(folder, "data_batch_3"))
  with pytest.raises(UserError, match="data_batch_3 is missing"):
    data.load_images(_data_config(path=folder))


SOURCE_KEY_CASES = {
    # name: (data config overrides, words of the error; None: accepted)
    "path with synthetic": (dict(name="synthetic", path="/d/x.npz"),
                            ["data.path='/d/x.npz' is ignored by data.name='synthetic'"]),
    "split with npz": (dict(name="npz", path="/d/x.npz", split="test"),
                       ["data.split='test'", "only 'cifar10' reads it"]),
    "layout with cifar10": (dict(layout="NCHW"), ["data.layout", "only 'npz' reads it"]),
    "layout with a folder": (dict(name="folder", path="/d", layout="NCHW"), ["data.layout"]),
    "tfds dir with npz": (dict(name="npz", path="/d/x.npz", tfds_data_dir="/tfds"),
                          ["data.tfds_data_dir"]),
    "tfds dir and a cifar10 folder": (dict(path="/d/cifar-10-batches-py", tfds_data_dir="/tfds"),
                                      ["tfds_data_dir is ignored when data.path is set"]),
    "npz without a path": (dict(name="npz"), ["data.name='npz' needs data.path"]),
    "folder without a path": (dict(name="folder"), ["data.name='folder' needs data.path"]),
    # Named for their source, so smoke.py switches source with one override.
    "synthetic size with npz": (dict(name="npz", path="/d/x.npz", synthetic_num_images=256), None),
    "a cifar10 folder": (dict(path="/d/cifar-10-batches-py", split="test"), None),
    "tfds": (dict(tfds_data_dir="/tfds", split="test"), None),
}


@pytest.mark.parametrize("case", sorted(SOURCE_KEY_CASES))
def test_a_key_the_source_ignores_is_an_error(case):
  overrides, words = SOURCE_KEY_CASES[case]
  if words is None:
    data.check_source_keys(_data_config(**overrides))
    return
  with pytest.raises(UserError) as failure:
    data.check_source_keys(_data_config(**overrides))
  for word in words:
    assert word in str(failure.value), str(failure.value)


def test_config_validation_checks_the_source_keys():
  from diffdyn import config as config_lib  # pylint: disable=import-outside-toplevel
  config = base.get_config()
  config.data.name, config.data.path = "synthetic", "/d/x.npz"
  with pytest.raises(UserError, match="ignored by data.name='synthetic'"):
    config_lib.validate(config)


IMAGE_CASES = {
    # name: (array, batch_size, probe_batch_size, words of the error)
    "rank 3": (np.zeros((4, 8, 8), np.uint8), 1, 0, ["4-D array", "np.repeat(x[..., None]"]),
    "floats": (np.zeros((4, 8, 8, 3), np.float32), 1, 0, ["must be uint8", "float32"]),
    "no images": (np.zeros((0, 8, 8, 3), np.uint8), 1, 0, ["holds 0 images"]),
    "grayscale": (np.zeros((4, 8, 8, 1), np.uint8), 1, 0, ["grayscale", "np.repeat(x, 3"]),
    "rgba": (np.zeros((4, 8, 8, 4), np.uint8), 1, 0, ["RGBA", "x[..., :3]"]),
    "2 channels": (np.zeros((4, 8, 8, 2), np.uint8), 1, 0, ["3 channels"]),
    "nchw": (np.zeros((4, 3, 8, 8), np.uint8), 1, 0, ["channels-first", "data.layout=NCHW"]),
    "not square": (np.zeros((4, 8, 6, 3), np.uint8), 1, 0, ["8x6, not square"]),
    "another size": (np.zeros((4, 16, 16, 3), np.uint8), 1, 0,
                     ["16x16 but data.image_size is 8", "--config.data.image_size=16"]),
    "fewer than a batch": (np.zeros((3, 8, 8, 3), np.uint8), 4, 2,
                           ["holds 3 images", "train.batch_size (4)"]),
    "fewer than the probe batch": (np.zeros((5, 8, 8, 3), np.uint8), 4, 32,
                                   ["holds 5 images", "curvature.batch_size (32)"]),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_unusable_images_are_one_line_naming_the_fix(case):
  images, batch_size, probe_batch_size, words = IMAGE_CASES[case]
  with pytest.raises(UserError) as failure:
    data.check_images(images, "x.npz", 8, batch_size=batch_size,
                      probe_batch_size=probe_batch_size)
  message = str(failure.value)
  assert "\n" not in message and message.startswith("x.npz")
  for word in words:
    assert word in message, message


def test_enough_images_pass():
  data.check_images(np.zeros((32, 8, 8, 3), np.uint8), "x.npz", 8, batch_size=4,
                    probe_batch_size=32)
  with pytest.raises(UserError, match="synthetic.*holds 2 images, fewer than train.batch_size"):
    data.load_images(_data_config(name="synthetic", synthetic_num_images=2, image_size=8),
                     batch_size=4)


def _save(path, array, mode=None):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path)


def test_image_folder(tmp_path):
  rng = np.random.default_rng(2)
  imgs = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  root = tmp_path / "images"
  _save(str(root / "b" / "1.png"), imgs[1])
  _save(str(root / "a.PNG"), imgs[0])
  _save(str(root / "b" / "2.png"), imgs[2])
  (root / "labels.txt").write_text("not an image")
  out = data.load_images(_data_config(name="folder", path=str(root), image_size=8))
  # Sorted by path: a.PNG, b/1.png, b/2.png; PNG is lossless.
  np.testing.assert_array_equal(out, imgs)
  # JPEG is lossy: only its shape and dtype are checked.
  _save(str(root / "c.jpg"), imgs[0])
  out = data.load_images(_data_config(name="folder", path=str(root), image_size=8))
  assert out.shape == (4, 8, 8, 3) and out.dtype == np.uint8


def test_image_folder_refusals(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(UserError, match="holds no .png, .jpg or .jpeg files"):
    data.load_images(_data_config(name="folder", path=str(empty)))
  rgba = tmp_path / "rgba"
  _save(str(rgba / "a.png"), np.zeros((8, 8, 4), np.uint8))
  with pytest.raises(UserError, match=r"a.png is a 'RGBA' image.*RGB"):
    data.load_images(_data_config(name="folder", path=str(rgba), image_size=8))
  sizes = tmp_path / "sizes"
  _save(str(sizes / "a.png"), np.zeros((8, 8, 3), np.uint8))
  _save(str(sizes / "b.png"), np.zeros((8, 6, 3), np.uint8))
  with pytest.raises(UserError, match=r"b.png is 6x8 but .*a.png is 8x8"):
    data.load_images(_data_config(name="folder", path=str(sizes), image_size=8))
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "a.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(UserError, match="a.png is not a readable image"):
    data.load_images(_data_config(name="folder", path=str(broken), image_size=8))


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
