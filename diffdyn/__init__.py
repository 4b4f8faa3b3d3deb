"""diffdyn: training dynamics of small diffusion models, in JAX/Flax.

Submodules are imported on first use (`from diffdyn import train, diffusion, curvature, fid`),
so that `import diffdyn` stays cheap and optional dependencies stay optional.
"""
import importlib

__all__ = ["analysis", "config", "curvature", "data", "diffusion", "fid", "io", "models", "train"]


def __getattr__(name):
  if name in __all__:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
