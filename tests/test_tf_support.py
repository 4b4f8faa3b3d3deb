"""TensorFlow is kept off the GPU: its GPUs are hidden before tfds or CLU import or run it.

Fake `tensorflow`, `tensorflow_datasets` and `clu` modules, served by an import hook, record
when they are imported and what is called on them, so the order of events can be checked on a
machine without a GPU (and without TensorFlow).
"""
import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import types

import numpy as np
import pytest

from diffdyn import data
from diffdyn import io
from diffdyn import tf_support
from diffdyn.errors import UserError

FAKED = ("tensorflow", "tensorflow_datasets", "clu")
HIDE = ("set_visible_devices", [], "GPU")


def _faked(name: str) -> bool:
  return name.split(".")[0] in FAKED


class _FakeImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves the given module objects on import, logging ("import", name) for each.

  A module's `_imports` names the modules that importing it imports in turn.
  """

  def __init__(self, modules: dict, events: list):
    self.modules, self.events = modules, events

  def find_spec(self, name, path=None, target=None):
    if not _faked(name):
      return None
    if name not in self.modules:   # a faked package the test did not provide: not installed
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    is_package = any(other.startswith(name + ".") for other in self.modules)
    return importlib.machinery.ModuleSpec(name, self, is_package=is_package)

  def create_module(self, spec):
    self.events.append(("import", spec.name))
    return self.modules[spec.name]

  def exec_module(self, module):
    for name in getattr(module, "_imports", ()):
      importlib.import_module(name)


@pytest.fixture
def fake_modules(monkeypatch):
  """install(modules, events) makes `import name` give modules[name], logging into events.

  Real TensorFlow, tfds or CLU modules already imported by other tests are set aside for the
  test and put back after it, and the fakes are removed, so no other test sees them.
  """
  saved = {name: module for name, module in sys.modules.items() if _faked(name)}
  for name in saved:
    del sys.modules[name]

  def install(modules: dict, events: list) -> None:
    monkeypatch.setattr(sys, "meta_path", [_FakeImporter(modules, events), *sys.meta_path])

  yield install
  for name in [name for name in sys.modules if _faked(name)]:
    del sys.modules[name]
  sys.modules.update(saved)


def fake_tensorflow(events: list, initialized: bool = False) -> types.ModuleType:
  """A TensorFlow whose device setup and one op are logged; `initialized`: too late to hide."""
  tf = types.ModuleType("tensorflow")

  def set_visible_devices(devices, device_type=None):
    events.append(("set_visible_devices", list(devices), device_type))
    if initialized:   # what TF raises once its devices exist
      raise RuntimeError("Visible devices cannot be modified after being initialized")

  def constant(value):
    events.append(("op", "constant"))
    return value

  tf.config = types.SimpleNamespace(
      experimental=types.SimpleNamespace(set_visible_devices=set_visible_devices))
  tf.constant = constant
  return tf


def fake_tfds(events: list, images: np.ndarray) -> types.ModuleType:
  """tensorflow_datasets.load / as_numpy over `images`, running a TF op as the real one does."""
  tfds = types.ModuleType("tensorflow_datasets")

  class Dataset:
    def batch(self, n):
      return [{"image": images[i:i + n]} for i in range(0, len(images), n)]

  def load(name, split, data_dir):
    events.append(("tfds.load", name, split))
    sys.modules["tensorflow"].constant(0)
    return Dataset()

  def as_numpy(batches):
    events.append(("tfds.as_numpy",))
    return batches

  tfds.load, tfds.as_numpy = load, as_numpy
  return tfds


def fake_clu(events: list) -> dict:
  """clu.metric_writers and clu.periodic_actions; importing them imports TensorFlow, as CLU's do."""
  clu = types.ModuleType("clu")
  writers = types.ModuleType("clu.metric_writers")
  actions = types.ModuleType("clu.periodic_actions")
  writers._imports = ("tensorflow",)                 # its summary writer is TensorFlow's
  actions._imports = ("tensorflow", "clu.metric_writers")

  def create_default_writer(workdir, asynchronous):
    events.append(("create_default_writer", workdir, asynchronous))
    sys.modules["tensorflow"].constant(0)
    return "clu writer"

  class ReportProgress:
    def __init__(self, num_train_steps, every_secs):
      events.append(("ReportProgress", num_train_steps))

  writers.create_default_writer = create_default_writer
  actions.ReportProgress = ReportProgress
  return {"clu": clu, "clu.metric_writers": writers, "clu.periodic_actions": actions}


def test_import_tensorflow_hides_the_gpus_and_returns_the_module(fake_modules):
  events = []
  tf = fake_tensorflow(events)
  fake_modules({"tensorflow": tf}, events)
  assert tf_support.import_tensorflow() is tf
  assert events == [("import", "tensorflow"), HIDE]


def test_load_tfds_hides_the_gpus_before_tfds_is_imported(fake_modules):
  events = []
  images = np.arange(6 * 32 * 32 * 3, dtype=np.uint32).reshape(6, 32, 32, 3).astype(np.uint8)
  fake_modules({"tensorflow": fake_tensorflow(events),
                "tensorflow_datasets": fake_tfds(events, images)}, events)
  out = data.load_tfds("train", "")
  np.testing.assert_array_equal(out, images)
  assert events == [("import", "tensorflow"), HIDE, ("import", "tensorflow_datasets"),
                    ("tfds.load", "cifar10", "train"), ("op", "constant"), ("tfds.as_numpy",)]


def test_clu_writer_hides_the_gpus_before_clu_is_imported(fake_modules, tmp_path):
  events = []
  fake_modules({"tensorflow": fake_tensorflow(events), **fake_clu(events)}, events)
  assert io.make_clu_writer(str(tmp_path), tensorboard=True) == "clu writer"
  assert events == [("import", "tensorflow"), HIDE, ("import", "clu"),
                    ("import", "clu.metric_writers"),
                    ("create_default_writer", str(tmp_path), False), ("op", "constant")]


def test_without_tensorboard_tensorflow_is_not_imported(fake_modules, tmp_path):
  events = []
  fake_modules({"tensorflow": fake_tensorflow(events), **fake_clu(events)}, events)
  assert isinstance(io.make_clu_writer(str(tmp_path), tensorboard=False), io.LoggingWriter)
  with io.Progress(total_steps=40) as progress:   # progress lines are diffdyn's own, not CLU's
    progress.report(40, 10.0)
  assert events == []


def test_tensorflow_initialized_too_early_is_a_warning(fake_modules, caplog):
  events = []
  tf = fake_tensorflow(events, initialized=True)
  fake_modules({"tensorflow": tf}, events)
  with caplog.at_level(logging.WARNING, logger="diffdyn.tf_support"):
    assert tf_support.import_tensorflow() is tf
  assert events == [("import", "tensorflow"), HIDE]
  assert "set_visible_devices([], 'GPU') before any TensorFlow op" in caplog.text


def test_without_tensorflow_tfds_is_a_user_error_and_clu_falls_back(fake_modules, tmp_path,
                                                                    caplog):
  fake_modules({}, [])   # tensorflow, tensorflow_datasets and clu are not installed
  with pytest.raises(ImportError):
    tf_support.import_tensorflow()
  with pytest.raises(UserError, match=r"pip install 'diffdyn\[tfds\]'"):
    data.load_tfds("train", "")
  with caplog.at_level(logging.WARNING, logger="diffdyn.io"):
    assert isinstance(io.make_clu_writer(str(tmp_path), tensorboard=True), io.LoggingWriter)
  assert "pip install 'diffdyn[tensorboard]'" in caplog.text


def test_real_tensorflow_accepts_the_call():
  """The fakes above mirror this API; here the installed TensorFlow (if any) takes it."""
  tf = pytest.importorskip("tensorflow")
  assert tf_support.import_tensorflow() is tf
  assert tf.config.get_visible_devices("GPU") == []
  assert tf.config.get_visible_devices("CPU")
