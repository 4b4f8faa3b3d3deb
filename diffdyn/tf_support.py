"""TensorFlow for tensorflow-datasets and CLU's summaries, kept off the GPUs that JAX uses.

diffdyn uses TensorFlow only on the host (reading CIFAR-10, writing TensorBoard events). A GPU
build of TensorFlow, such as Colab's, would otherwise claim most of every GPU's memory at its
first op, which JAX has already reserved for itself. Hiding the GPUs is only possible before
TensorFlow initializes its devices, so every place in diffdyn that imports TensorFlow, tfds or
CLU goes through `import_tensorflow` first.
"""
import logging
import os

log = logging.getLogger(__name__)


def import_tensorflow():
  """Imports TensorFlow with its GPUs hidden and returns the module; ImportError if absent.

  If TensorFlow has already initialized its devices (something ran a TF op first, with the
  GPUs visible), the GPUs cannot be hidden any more: that is a warning, not an error, since
  the run itself still works.
  """
  # Its C++ start-up lines (oneDNN's notice, absl's "before InitializeLog") say nothing about a
  # run whose TensorFlow only reads files and writes summaries; a user's own setting wins.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.experimental.set_visible_devices([], "GPU")
  except RuntimeError as e:
    log.warning("TensorFlow ran before diffdyn could hide the GPUs from it (%s), so it may hold "
                "GPU memory that JAX needs; call tf.config.experimental.set_visible_devices([], "
                "'GPU') before any TensorFlow op", e)
  return tf
