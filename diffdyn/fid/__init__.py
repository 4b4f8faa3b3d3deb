"""FID and KID with pytorch-fid's InceptionV3, in Flax."""
from diffdyn.fid.inception import bilinear_matrix
from diffdyn.fid.inception import inception_features
from diffdyn.fid.inception import InceptionV3
from diffdyn.fid.inception import preprocess
from diffdyn.fid.inception import resize_bilinear
from diffdyn.fid.metrics import feature_stats
from diffdyn.fid.metrics import frechet_distance
from diffdyn.fid.metrics import frechet_distance_of_features
from diffdyn.fid.metrics import kid
from diffdyn.fid.metrics import load_stats
from diffdyn.fid.metrics import mmd2_unbiased
from diffdyn.fid.metrics import reference_stats
from diffdyn.fid.weights import load_inception
from diffdyn.fid.weights import params_from_torch_state_dict
from diffdyn.fid.weights import seeded_state_dict
from diffdyn.fid.weights import weights_hash

__all__ = [
    "InceptionV3", "bilinear_matrix", "feature_stats", "frechet_distance",
    "frechet_distance_of_features", "inception_features", "kid", "load_inception", "load_stats",
    "mmd2_unbiased", "params_from_torch_state_dict", "preprocess", "reference_stats",
    "resize_bilinear", "seeded_state_dict", "weights_hash",
]
