"""FID tools.

  python -m diffdyn.fid convert IN.pth OUT.npz
      pytorch-fid's weights -> an .npz that loads without torch.
  python -m diffdyn.fid stats IMAGES.npz OUT.npz [--weights W] [--key images]
      mu/sigma of a uint8 image set (N, H, W, 3) or (N, 3, H, W), for fid.reference_stats.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile

import numpy as np

from diffdyn.errors import UserError


class _OneLineParser(argparse.ArgumentParser):
  """Reports usage mistakes as one line on stderr, exit status 2."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _read_images(path: str, key: str | None) -> np.ndarray:
  if not os.path.isfile(path):
    raise UserError(f"image file {path} does not exist; pass an .npz or .npy of uint8 images")
  try:
    loaded = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f"cannot read {path} ({type(e).__name__}); pass an .npz or .npy of uint8 "
                    "images") from e
  if isinstance(loaded, np.ndarray):
    images = loaded
  else:
    with loaded:
      if key is None:
        key = "images" if "images" in loaded.files or len(loaded.files) != 1 else loaded.files[0]
      if key not in loaded.files:
        raise UserError(f"{path} has no array {key!r} (it has {', '.join(loaded.files)}); "
                        "name one with --key")
      images = loaded[key]
  if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
    images = images.transpose(0, 2, 3, 1)
  return images


def convert(args) -> None:
  from diffdyn.fid import weights  # pylint: disable=import-outside-toplevel
  state_dict = weights.read_state_dict(args.src)
  weights.params_from_torch_state_dict(state_dict)  # refuse to write a file that won't load
  weights.save_npz_state_dict(state_dict, args.dst)
  print(f"wrote {args.dst} ({len(state_dict)} arrays)")


def stats(args) -> None:
  from diffdyn import fid  # pylint: disable=import-outside-toplevel
  from diffdyn.fid import metrics  # pylint: disable=import-outside-toplevel
  images = _read_images(args.images, args.key)
  params = fid.load_inception(args.weights)
  features = fid.inception_features(params, images, args.batch_size, precision=args.precision)
  mu, sigma = fid.feature_stats(features)
  metrics.save_stats(args.dst, {"mu": mu, "sigma": sigma}, num_images=len(images),
                     weights_hash=fid.weights_hash(params))
  print(f"wrote {args.dst} (mu, sigma of {len(images)} images)")


def seeded(args) -> None:
  from diffdyn.fid import weights  # pylint: disable=import-outside-toplevel
  try:
    with np.load(args.recipe) as f:
      recipe = {k: f[k] for k in ("seed", "conv_gain", "shift_std", "names", "shapes")}
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{args.recipe} is not a weights recipe like tests/fixtures/fid_parity.npz "
                    f"({e})") from None
  weights.save_npz_state_dict(weights.seeded_state_dict(recipe), args.dst)
  print(f"wrote {args.dst} (seeded stand-in weights; not for real FID numbers)")


def build_parser() -> argparse.ArgumentParser:
  parser = _OneLineParser(prog="python -m diffdyn.fid", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
  p = sub.add_parser("convert", help="pytorch-fid .pth -> .npz")
  p.add_argument("src", help="pt_inception-2015-12-05-6726825d.pth")
  p.add_argument("dst", help="output .npz")
  p.set_defaults(func=convert)
  p = sub.add_parser("stats", help="mu/sigma of an image set")
  p.add_argument("images", help=".npz or .npy of uint8 images")
  p.add_argument("dst", help="output .npz with mu and sigma")
  p.add_argument("--weights", default="", help=".pth or converted .npz (default: the cache)")
  p.add_argument("--key", default=None, help="array name inside IMAGES.npz")
  p.add_argument("--batch-size", type=int, default=500)
  p.add_argument("--precision", default=None, choices=["default", "high", "highest"])
  p.set_defaults(func=stats)
  p = sub.add_parser("seeded", help="stand-in weights from a recipe, for tests and benchmarks")
  p.add_argument("recipe", help="tests/fixtures/fid_parity.npz")
  p.add_argument("dst", help="output .npz")
  p.set_defaults(func=seeded)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (UserError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
