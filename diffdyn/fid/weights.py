"""pytorch-fid's Inception weights (.pth, or a converted .npz) -> Flax params for InceptionV3.

A converted .npz holds the state_dict itself: the same key names and PyTorch layouts, as
numpy arrays, so reading it needs neither torch nor any layout convention of ours.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile

from flax import traverse_util
import numpy as np

from diffdyn.errors import UserError
from diffdyn.fid import inception

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILENAME)
WEIGHTS_SHA256_PREFIX = "6726825d"

# PyTorch BatchNorm buffer/param names -> ours; "weight" of a conv becomes "kernel".
_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_BN_NAMES_BACK = {v: k for k, v in _BN_NAMES.items()}
# In the file, but not needed for the 2048-d pool3 features.
_UNUSED = ("fc.weight", "fc.bias")

_FIX = ("set config.fid.inception_weights to a local copy of " + WEIGHTS_FILENAME +
        " (from " + WEIGHTS_URL + "), or to an .npz made from it with "
        "`python -m diffdyn.fid convert IN.pth OUT.npz`; or run without FID: "
        "--config.fid.enabled=False")


def default_cache_dir() -> str:
  return os.environ.get("DIFFDYN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "diffdyn")


def _flax_path(name: str) -> tuple[str, ...] | None:
  """'Mixed_5b.branch1x1.conv.weight' -> ('Mixed_5b', 'branch1x1', 'conv', 'kernel')."""
  parts = name.split(".")
  if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
    return tuple(parts[:-1]) + ("kernel",)
  if len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_NAMES:
    return tuple(parts[:-1]) + (_BN_NAMES[parts[-1]],)
  return None


def _torch_name(path: tuple[str, ...]) -> str:
  leaf = "weight" if path[-1] == "kernel" else _BN_NAMES_BACK[path[-1]]
  return ".".join(path[:-1] + (leaf,))


def _torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel":  # HWIO -> OIHW
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(flax_shape)


def _summarise(names, limit=4) -> str:
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def params_from_torch_state_dict(state_dict) -> dict:
  """{pytorch-fid key: array} -> Flax params of `inception.InceptionV3` (float32 numpy).

  Conv kernels go from OIHW to HWIO; BatchNorm keeps its running statistics as params.
  `num_batches_tracked` and the unused `fc.*` entries are accepted and dropped. Raises
  UserError naming any missing or unexpected key, or a shape that does not fit.
  """
  expected = traverse_util.flatten_dict(inception.param_shapes())
  found, unexpected = {}, []
  for name, value in state_dict.items():
    if name.endswith("num_batches_tracked") or name in _UNUSED:
      continue
    path = _flax_path(name)
    if path is None or path not in expected:
      unexpected.append(name)
    else:
      found[path] = value
  missing = [_torch_name(p) for p in expected if p not in found]
  if missing or unexpected:
    problems = []
    if missing:
      problems.append(f"missing keys {_summarise(missing)}")
    if unexpected:
      problems.append(f"unexpected keys {_summarise(unexpected)}")
    raise UserError("not a pytorch-fid InceptionV3 state_dict (" + "; ".join(problems) +
                    "); use the weights file " + WEIGHTS_FILENAME)
  params = {}
  for path, spec in expected.items():
    value = np.asarray(found[path], np.float32)
    want = _torch_shape(path, spec.shape)
    if value.shape != want:
      raise UserError(f"{_torch_name(path)} has shape {value.shape}, pytorch-fid's InceptionV3 "
                      f"needs {want}; use the weights file {WEIGHTS_FILENAME}")
    params[path] = value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value
  return traverse_util.unflatten_dict(params)


def weights_hash(params) -> str:
  """A sha256 hex digest of the parameter names, dtypes, shapes and values."""
  h = hashlib.sha256()
  for path, value in sorted(traverse_util.flatten_dict(params).items()):
    value = np.ascontiguousarray(np.asarray(value))
    h.update(f"{'/'.join(path)}|{value.dtype.str}|{value.shape}|".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _check_known_hash(path: str) -> None:
  if os.path.basename(path) != WEIGHTS_FILENAME:
    return
  digest = sha256_file(path)
  if not digest.startswith(WEIGHTS_SHA256_PREFIX):
    raise UserError(f"{path} has sha256 {digest[:16]}..., not {WEIGHTS_SHA256_PREFIX}...: the "
                    f"file is corrupt or not the FID weights; delete it and download it again "
                    f"from {WEIGHTS_URL}")


def read_torch_state_dict(path: str) -> dict:
  """A .pth state_dict as {name: float32 numpy array}; needs torch (imported here only)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError(f"reading {path} needs PyTorch, which is not installed; `pip install torch`, "
                    "or convert the file where torch is installed with "
                    "`python -m diffdyn.fid convert IN.pth OUT.npz` and use the .npz") from e
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read {path} as a PyTorch state_dict ({type(e).__name__}); "
                    f"{_FIX}") from e
  if not isinstance(state_dict, dict):
    raise UserError(f"{path} holds a {type(state_dict).__name__}, not a state_dict; {_FIX}")
  return {k: v.detach().cpu().float().numpy() for k, v in state_dict.items()
          if hasattr(v, "detach")}


def read_npz_state_dict(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f"cannot read {path} as an .npz of Inception weights "
                    f"({type(e).__name__}); {_FIX}") from e


def save_npz_state_dict(state_dict, path: str) -> None:
  """Writes {name: array} as an .npz (float32, num_batches_tracked dropped), atomically."""
  arrays = {k: np.asarray(v, np.float32) for k, v in state_dict.items()
            if not k.endswith("num_batches_tracked")}
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def read_state_dict(path: str) -> dict:
  """{name: array} from a .pth or a converted .npz; UserError for a missing or wrong file."""
  if not os.path.isfile(path):
    raise UserError(f"Inception weights file {path} does not exist; {_FIX}")
  if path.endswith(".npz"):
    return read_npz_state_dict(path)
  if path.endswith((".pth", ".pt")):
    _check_known_hash(path)
    return read_torch_state_dict(path)
  raise UserError(f"Inception weights file {path} is neither .pth nor .npz; {_FIX}")


def download_weights(url: str, dest: str, sha256_prefix: str, timeout: float = 60.0) -> str:
  """Downloads `url` to `dest` if its sha256 starts with `sha256_prefix`; returns `dest`."""
  os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
  tmp = dest + ".part"
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
      for block in iter(lambda: response.read(1 << 20), b""):
        f.write(block)
  except (urllib.error.URLError, OSError, ValueError) as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise UserError(f"could not download the FID Inception weights from {url} ({e}); "
                    f"{_FIX}") from e
  digest = sha256_file(tmp)
  if not digest.startswith(sha256_prefix):
    os.remove(tmp)
    raise UserError(f"the file downloaded from {url} has sha256 {digest[:16]}..., not "
                    f"{sha256_prefix}...; {_FIX}")
  os.replace(tmp, dest)
  return dest


def load_inception(path: str | None = None, *, cache_dir: str | None = None,
                   url: str = WEIGHTS_URL) -> dict:
  """Flax params of the FID InceptionV3 from `path` (.pth or converted .npz).

  With no path, uses `<cache_dir>/pt_inception-2015-12-05-6726825d.{npz,pth}` (cache_dir
  defaults to $DIFFDYN_CACHE or ~/.cache/diffdyn), downloading the .pth there if absent.
  Raises UserError, with the fix in its message, when no usable file can be had.
  """
  if path:
    return params_from_torch_state_dict(read_state_dict(path))
  cache_dir = cache_dir or default_cache_dir()
  pth = os.path.join(cache_dir, WEIGHTS_FILENAME)
  npz = os.path.splitext(pth)[0] + ".npz"
  if os.path.isfile(npz):
    return params_from_torch_state_dict(read_state_dict(npz))
  if not os.path.isfile(pth):
    download_weights(url, pth, WEIGHTS_SHA256_PREFIX)
  return params_from_torch_state_dict(read_state_dict(pth))


def seeded_state_dict(recipe) -> dict:
  """Seeded stand-in weights with pytorch-fid's key names, from a recipe (fid_parity.npz).

  The recipe (seed, conv_gain, shift_std and the state_dict's names/shapes in order) is the
  one shared/fixtures/make_fid_parity.py used to make the parity fixture. Tests check parity
  with these weights; benchmarks time FID with them, since values do not change the cost.
  """
  rng = np.random.default_rng(int(recipe["seed"]))
  gain, shift = float(recipe["conv_gain"]), float(recipe["shift_std"])
  state_dict = {}
  for name, shape_text in zip(recipe["names"], recipe["shapes"]):
    name, shape = str(name), tuple(int(s) for s in str(shape_text).split(","))
    if name.endswith("conv.weight"):
      fan_in = shape[1] * shape[2] * shape[3]
      a = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in) * gain
    elif name.endswith("bn.weight"):
      a = rng.uniform(0.6, 1.0, shape)
    elif name.endswith(("bn.bias", "running_mean")):
      a = rng.normal(0.0, shift, shape)
    elif name.endswith("running_var"):
      a = rng.uniform(0.6, 1.4, shape)
    elif name == "fc.weight":
      a = rng.standard_normal(shape) * 0.01
    elif name == "fc.bias":
      a = np.zeros(shape)
    else:
      raise KeyError(name)
    state_dict[name] = a.astype(np.float32)
  return state_dict
