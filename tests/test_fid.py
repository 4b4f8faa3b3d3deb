"""diffdyn.fid: parity with pytorch-fid, the resize, Frechet distance, KID, weights and CLI."""
import contextlib
import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffdyn import fid
from diffdyn.errors import UserError
from diffdyn.fid import __main__ as fid_cli
from diffdyn.fid import inception
from diffdyn.fid import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "fid_parity.npz")
# Every network call in this file uses this batch size and precision, so the Inception
# network compiles once for the whole module (jit caches per shape and precision context).
BATCH = 2


@contextlib.contextmanager
def _highest():
  with jax.default_matmul_precision("highest"):
    yield


def _rel_err(a, b):
  # Features are post-ReLU averages with many entries near 0, where an elementwise relative
  # error is noise; errors relative to the largest feature are on the scale FID sees.
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def state_dict(ref):
  return fid.seeded_state_dict(ref)


@pytest.fixture(scope="module")
def params(state_dict):
  return fid.params_from_torch_state_dict(state_dict)


@pytest.fixture(scope="module")
def features_fn(params):
  """The one float32 feature extractor of this module: batch 2, highest matmul precision."""

  def features(images):
    with _highest():
      return fid.inception_features(params, images, batch_size=BATCH)

  return features


# ---------------------------------------------------------------- weights layout


def test_state_dict_maps_one_to_one(ref, state_dict, params):
  # Reference: pytorch-fid's own key list and shapes in the fixture. All 472 keys but the
  # two unused fc.* ones become parameters; kernels are the OIHW arrays transposed to HWIO.
  assert len(ref["names"]) == 472
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert len(leaves) == 470
  np.testing.assert_array_equal(params["Mixed_7c"]["branch3x3_2a"]["conv"]["kernel"],
                                state_dict["Mixed_7c.branch3x3_2a.conv.weight"].transpose(
                                    2, 3, 1, 0))
  assert params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 128, 128)
  bn = params["Mixed_5b"]["branch1x1"]["bn"]
  np.testing.assert_array_equal(bn["var"], state_dict["Mixed_5b.branch1x1.bn.running_var"])
  np.testing.assert_array_equal(bn["mean"], state_dict["Mixed_5b.branch1x1.bn.running_mean"])
  np.testing.assert_array_equal(bn["scale"], state_dict["Mixed_5b.branch1x1.bn.weight"])
  assert "fc" not in params


def test_missing_unexpected_and_misshapen_keys_raise(state_dict):
  broken = dict(state_dict)
  del broken["Mixed_6e.branch_pool.bn.running_var"]
  broken["Mixed_8a.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(UserError, match=r"Mixed_6e\.branch_pool\.bn\.running_var.*Mixed_8a"):
    fid.params_from_torch_state_dict(broken)
  misshapen = dict(state_dict)
  misshapen["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  with pytest.raises(UserError, match=r"Conv2d_1a_3x3\.conv\.weight has shape"):
    fid.params_from_torch_state_dict(misshapen)


# ---------------------------------------------------------------- parity with pytorch-fid


@pytest.mark.parametrize("size", ["32", "299"])
def test_features_match_pytorch_fid(ref, features_fn, size):
  # Reference: pytorch-fid's InceptionV3 in float64 (fixture). Tolerance 1e-4 of the largest
  # feature: float32 rounding (~6e-8 per op) through ~20 sequential layers gives ~1e-6
  # (2-4e-7 measured on CPU); while count_include_pad=True, align_corners=True, BN eps 1e-5
  # or a resize without the clamp at 0 each measured >= 2e-3 on the 32x32 set.
  got = features_fn(ref[f"images{size}_uint8"])
  assert got.dtype == np.float64 and got.shape == ref[f"features{size}"].shape
  assert _rel_err(got, ref[f"features{size}"]) <= 1e-4


def test_padded_last_batch(ref, features_fn):
  # 3 images in batches of 2: the second batch is padded, its padding rows are dropped.
  # Reference and tolerance as in test_features_match_pytorch_fid.
  got = features_fn(ref["images32_uint8"][:3])
  assert got.shape == (3, 2048)
  assert _rel_err(got, ref["features32"][:3]) <= 1e-4


def test_frechet_distance_matches_pytorch_fid(ref):
  # Reference: pytorch-fid's calculate_frechet_distance (scipy sqrtm) on 64-d well-conditioned
  # statistics. Both computations are backward stable there, so they agree to ~1e-12
  # (4e-15 measured); 1e-6 relative is the required bound.
  got = fid.frechet_distance(ref["fd_mu1"], ref["fd_sigma1"], ref["fd_mu2"], ref["fd_sigma2"])
  assert got == pytest.approx(float(ref["fd_value"]), rel=1e-6)


# ---------------------------------------------------------------- preprocessing


def test_bilinear_matrix_by_hand():
  # Source positions s = (d + 0.5) * in / out - 0.5, clamped at 0, worked out by hand.
  # 2 -> 4: s = -0.25 (-> 0), 0.25, 0.75, 1.25 (the last pixel repeats past the edge).
  np.testing.assert_allclose(fid.bilinear_matrix(2, 4),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], atol=1e-15)
  # 4 -> 3 (no antialias): s = 1/6, 3/2, 17/6.
  np.testing.assert_allclose(fid.bilinear_matrix(4, 3),
                             [[5 / 6, 1 / 6, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 1 / 6, 5 / 6]],
                             atol=1e-15)


def test_resize_of_a_linear_image():
  # Bilinear interpolation reproduces a linear function exactly, so a 2x2 image with
  # value 8 r + 4 c at pixel (r, c), resized to 4x4, holds 8 s_r + 4 s_c at the clamped
  # source positions s = 0, 0.25, 0.75, 1 (test_bilinear_matrix_by_hand). float32: 1e-6.
  image = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)[None, :, :, None]
  with _highest():
    out = np.asarray(fid.resize_bilinear(image, (4, 4)))[0, :, :, 0]
  s = np.array([0.0, 0.25, 0.75, 1.0])
  np.testing.assert_allclose(out, 8 * s[:, None] + 4 * s[None, :], atol=1e-6)


def test_299_input_is_unchanged():
  # pytorch-fid resizes 299 -> 299 anyway: s = d exactly, i.e. the identity matrix.
  np.testing.assert_array_equal(fid.bilinear_matrix(299, 299), np.eye(299))
  images = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  got = np.asarray(fid.preprocess(images))
  # Only x / 255 * 2 - 1 remains; float32 rounding of values in [-1, 1]: 1e-6.
  np.testing.assert_allclose(got, images / 255.0 * 2.0 - 1.0, atol=1e-6)


def test_resize_matches_torch_if_installed():
  torch = pytest.importorskip("torch")
  # Reference: F.interpolate itself, in float64; the matrices agree to rounding (1e-12).
  for src, dst in [(32, 299), (4, 3), (7, 5), (512, 299)]:
    x = torch.eye(src, dtype=torch.float64)[None, None]
    want = torch.nn.functional.interpolate(x, size=(dst, src), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(fid.bilinear_matrix(src, dst), want, atol=1e-12)


def test_bad_images_raise(params):
  with pytest.raises(UserError, match="uint8"):
    fid.inception_features(params, np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(UserError, match="3 channels"):
    fid.inception_features(params, np.zeros((2, 32, 32), np.uint8))


# ---------------------------------------------------------------- statistics and distances


def test_feature_stats():
  x = np.random.default_rng(1).standard_normal((50, 4))
  mu, sigma = fid.feature_stats(x)
  # Reference: the textbook unbiased covariance sum; float64 on O(1) values: 1e-12.
  centred = x - x.sum(0) / 50
  np.testing.assert_allclose(mu, x.sum(0) / 50, atol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, atol=1e-12)


def test_frechet_distance_identical_is_zero():
  x = np.random.default_rng(2).standard_normal((300, 32))
  mu, sigma = fid.feature_stats(x)
  # Exact answer 0; float64 eigen-decompositions of O(1) matrices leave ~1e-12.
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def _rotated(diag, q):
  return q @ np.diag(diag) @ q.T


def test_frechet_distance_closed_form_commuting():
  # Covariances with shared eigenvectors Q: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
  # Q is a random rotation, so the matrices are not diagonal. Tolerance 1e-9 relative:
  # float64 eigh on well-conditioned 16x16 matrices is accurate to ~1e-14.
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
  a, b = rng.uniform(0.5, 2.0, 16), rng.uniform(0.1, 3.0, 16)
  mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, _rotated(a, q), mu2, _rotated(b, q))
  assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_singular_covariance():
  # Zero eigenvalues (the case pytorch-fid offsets by eps). The closed form still holds:
  # the zero directions contribute (0 - sqrt(b))^2 = b. An error in sqrt of a rounding-level
  # eigenvalue (~1e-16) is ~1e-8 per direction, hence 1e-6 absolute.
  rng = np.random.default_rng(4)
  q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
  a = np.concatenate([rng.uniform(0.5, 2.0, 10), np.zeros(6)])
  b = np.concatenate([rng.uniform(0.5, 2.0, 12), np.zeros(4)])
  want = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(np.zeros(16), _rotated(a, q), np.zeros(16), _rotated(b, q))
  assert got == pytest.approx(want, abs=1e-6)
  # Sample covariances of fewer samples than dimensions: rank 9 of 64, still finite.
  mu1, s1 = fid.feature_stats(rng.standard_normal((10, 64)))
  mu2, s2 = fid.feature_stats(rng.standard_normal((10, 64)) + 1.0)
  assert np.isfinite(fid.frechet_distance(mu1, s1, mu2, s2))


def _features_with_covariance(rng, n, basis, variances, mean):
  """n rows whose sample mean is `mean` and covariance basis diag(variances) basis^T exactly."""
  k = variances.shape[0]
  z = rng.standard_normal((n, k))
  z, _ = np.linalg.qr(z - z.mean(axis=0))   # centred orthonormal columns
  return np.sqrt(n - 1) * (z * np.sqrt(variances)) @ basis[:, :k].T + mean


def test_frechet_distance_of_few_features_matches_the_closed_form():
  # Fewer samples than dimensions (5 in 64, rank 4) against a reference of rank 40, both
  # diagonal in one random basis Q: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 with a = 0
  # past the features' rank. The N x N eigenvalue problem has one exact zero (the centring),
  # whose rounding-level value (~1e-16) enters through a square root: ~1e-8, hence 1e-6.
  rng = np.random.default_rng(5)
  q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
  a = np.concatenate([rng.uniform(0.5, 2.0, 4), np.zeros(60)])
  b = np.concatenate([rng.uniform(0.1, 3.0, 40), np.zeros(24)])
  mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
  features = _features_with_covariance(rng, 5, q, a[:4], mu1)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid.frechet_distance_of_features(features, mu2, _rotated(b, q)) == pytest.approx(
      want, abs=1e-6)


@pytest.mark.parametrize("n", [3, 100, 300])
def test_frechet_distance_of_features_equals_that_of_their_statistics(n):
  # Reference: frechet_distance on feature_stats (tested against pytorch-fid and the closed
  # forms above), for N below, near and above D = 128 (above it takes the statistics path).
  # Both are exact formulas of float64 matrices of O(1) entries; where N <= D they differ only
  # in the sqrt of rounding-level eigenvalues (~1e-8 each, ~D of them): 1e-6 relative.
  rng = np.random.default_rng(6)
  mix = rng.standard_normal((128, 128)) / np.sqrt(128)
  mu2, sigma2 = fid.feature_stats(rng.standard_normal((400, 128)) @ mix)
  features = rng.standard_normal((n, 128)) @ mix * 1.3 + 0.1
  got = fid.frechet_distance_of_features(features, mu2, sigma2)
  assert got == pytest.approx(fid.frechet_distance(*fid.feature_stats(features), mu2, sigma2),
                              rel=1e-6)


def test_frechet_distance_bad_shapes():
  with pytest.raises(UserError, match="same network"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(UserError, match="same network"):
    fid.frechet_distance_of_features(np.zeros((2, 3)), np.zeros(4), np.eye(4))


def _mmd2_brute_force(x, y):
  """The unbiased MMD^2 estimator written out as loops over distinct pairs."""
  d, m = x.shape[1], x.shape[0]
  k = lambda u, v: (np.dot(u, v) / d + 1.0) ** 3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2.0 * xy


def test_kid_matches_brute_force():
  rng = np.random.default_rng(5)
  x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.5
  want = _mmd2_brute_force(x, y)
  # Same sums in another order: float64 agreement to ~1e-15 relative; 1e-10.
  assert fid.mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-10)
  # A subset of all 6 rows is a permutation, which leaves the estimator unchanged.
  mean, std = fid.kid(x, y, num_subsets=1, subset_size=6)
  assert mean == pytest.approx(want, rel=1e-10) and std == 0.0


def test_kid_same_and_shifted_distributions():
  rng = np.random.default_rng(6)
  a, b = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
  # Same distribution: the estimator is unbiased, so its mean over subsets sits within the
  # subset-to-subset std of 0 (the mean of 20 estimates is tighter still).
  mean, std = fid.kid(a, b, num_subsets=20, subset_size=200)
  assert std > 0 and abs(mean) < std
  # Shifted by 1 in every coordinate: MMD^2 is far from 0, by many standard deviations.
  mean, std = fid.kid(a, b + 1.0, num_subsets=20, subset_size=200)
  assert mean > 10 * std and mean > 0.1


# ---------------------------------------------------------------- weights files


def test_npz_round_trip(tmp_path, state_dict, params):
  path = str(tmp_path / "inception.npz")
  weights.save_npz_state_dict(state_dict, path)
  loaded = fid.load_inception(path)
  # float32 stored and read back: bit-identical.
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert fid.weights_hash(loaded) == fid.weights_hash(params)


def test_weights_hash_sees_one_value():
  a = {"m": {"k": np.zeros((3, 3), np.float32)}}
  b = {"m": {"k": np.zeros((3, 3), np.float32)}}
  b["m"]["k"][1, 2] = 1e-7
  assert fid.weights_hash(a) == fid.weights_hash({"m": {"k": np.zeros((3, 3), np.float32)}})
  assert fid.weights_hash(a) != fid.weights_hash(b)


def test_missing_file_names_file_and_fix(tmp_path):
  path = str(tmp_path / "nowhere.pth")
  with pytest.raises(UserError) as e:
    fid.load_inception(path)
  assert path in str(e.value) and "inception_weights" in str(e.value)
  assert "\n" not in str(e.value)


def test_wrong_hash_for_real_filename(tmp_path):
  path = tmp_path / weights.WEIGHTS_FILENAME
  path.write_bytes(b"not the inception weights")
  with pytest.raises(UserError) as e:
    fid.load_inception(str(path))
  assert str(path) in str(e.value) and "sha256" in str(e.value)
  assert "download it again" in str(e.value)


def test_failed_download_says_how_to_fix(tmp_path):
  # An unreachable file:// URL stands in for being offline.
  url = (tmp_path / "missing.pth").as_uri()
  with pytest.raises(UserError) as e:
    fid.load_inception(None, cache_dir=str(tmp_path / "cache"), url=url)
  message = str(e.value)
  assert "config.fid.inception_weights" in message and "diffdyn.fid convert" in message
  assert not (tmp_path / "cache" / weights.WEIGHTS_FILENAME).exists()


def test_download_checks_the_hash(tmp_path):
  src = tmp_path / "served.bin"
  src.write_bytes(b"some bytes")
  digest = hashlib.sha256(b"some bytes").hexdigest()
  dest = str(tmp_path / "cache" / "w.pth")
  with pytest.raises(UserError, match="sha256"):
    weights.download_weights(src.as_uri(), dest, format(int(digest[:8], 16) ^ 1, "08x"))
  assert not os.path.exists(dest) and not os.path.exists(dest + ".part")
  assert weights.download_weights(src.as_uri(), dest, digest[:8]) == dest
  assert open(dest, "rb").read() == b"some bytes"


def test_cached_npz_needs_no_download(tmp_path, state_dict, params):
  weights.save_npz_state_dict(
      state_dict, str(tmp_path / weights.WEIGHTS_FILENAME.replace(".pth", ".npz")))
  loaded = fid.load_inception(None, cache_dir=str(tmp_path), url="file:///nonexistent")
  assert fid.weights_hash(loaded) == fid.weights_hash(params)


# ---------------------------------------------------------------- reference statistics


def test_reference_stats_cached_by_weights_and_data(tmp_path, monkeypatch):
  calls = []

  def fake_features(params, images, batch_size, precision=None):
    del params, batch_size, precision
    calls.append(len(images))
    return images.reshape(len(images), -1)[:, :8].astype(np.float64)

  monkeypatch.setattr(inception, "inception_features", fake_features)
  images = np.random.default_rng(7).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  kw = dict(cache_dir=str(tmp_path), batch_size=5)
  first = fid.reference_stats(None, images, weights_hash="w1", **kw)
  again = fid.reference_stats(None, images, weights_hash="w1", **kw)
  assert calls == [5]
  np.testing.assert_array_equal(first["sigma"], again["sigma"])
  fid.reference_stats(None, images, weights_hash="w2", **kw)
  other = images.copy()
  other[0, 0, 0, 0] ^= 1
  fid.reference_stats(None, other, weights_hash="w1", **kw)
  assert calls == [5, 5, 5]
  with_features = fid.reference_stats(None, images, weights_hash="w1", keep_features=True, **kw)
  assert calls == [5, 5, 5, 5] and with_features["features"].shape == (5, 8)
  # The cache holds (mu, sigma) of the features: compare with their mean, float64 exact-ish.
  np.testing.assert_allclose(first["mu"], fake_features(None, images, 5).mean(0), atol=1e-12)


def test_load_stats(tmp_path):
  path = str(tmp_path / "s.npz")
  np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
  stats = fid.load_stats(path)
  np.testing.assert_array_equal(stats["sigma"], np.eye(3))
  np.savez(path, mu=np.zeros(3))
  with pytest.raises(UserError, match="lacks 'mu' or 'sigma'"):
    fid.load_stats(path)
  with pytest.raises(UserError, match="does not exist"):
    fid.load_stats(str(tmp_path / "none.npz"))


# ---------------------------------------------------------------- command line


def test_cli_missing_input_one_line_exit_2(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "diffdyn.fid", "convert", "missing.pth", "x.npz"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "missing.pth" in lines[0] and "Traceback" not in proc.stderr
  assert not (tmp_path / "x.npz").exists()


def test_cli_usage_error_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    fid_cli.main(["convert"])
  assert e.value.code == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_convert_pth_if_torch_installed(tmp_path, state_dict, params):
  torch = pytest.importorskip("torch")
  src, dst = str(tmp_path / "w.pth"), str(tmp_path / "w.npz")
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, src)
  assert fid_cli.main(["convert", src, dst]) == 0
  # float32 through torch.save/load and the .npz: bit-identical.
  jax.tree.map(np.testing.assert_array_equal, fid.load_inception(dst), params)
  jax.tree.map(np.testing.assert_array_equal, fid.load_inception(src), params)
