"""The sampler audit: pixel statistics, symptoms, the verdict, and the CLI on a real smoke run."""
import contextlib
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from diffdyn import data
from diffdyn import fid
from diffdyn import train
from diffdyn.analysis import __main__ as cli
from diffdyn.analysis import audit
from diffdyn.fid import __main__ as fid_cli
from experiments import smoke

NUM_SAMPLES = 16
# T is 100 in the smoke config. DDPM at 10 of 100 steps strides ~11 original steps, like the
# seeds' 50 of 1000 (20), and compiles no slower than 50; DDPM "all" is all 100 steps.
NFE = 10
TRAIN_STEPS = 200


# --- pixel statistics on hand-built images ---------------------------------------------------


def _images(*arrays):
  return np.stack([np.broadcast_to(np.asarray(a, np.uint8), (8, 8, 3)) for a in arrays])


def test_saturation_counts_channel_values_at_0_and_255():
  assert audit.saturated_fraction(_images(255)) == 1.0
  assert audit.saturated_fraction(_images(0, 255)) == 1.0
  assert audit.saturated_fraction(_images(1, 254, 128)) == 0.0
  half = np.full((1, 4, 4, 3), 100, np.uint8)
  half[0, :2] = 255
  assert audit.saturated_fraction(half) == 0.5


def test_constant_image_has_no_high_frequency_energy():
  assert audit.high_frequency_fraction(_images(0, 77, 255)) == 0.0


def test_checkerboard_has_all_its_energy_at_high_frequency():
  # Its only non-DC component sits at (0.5, 0.5) cycles/pixel, radius 0.71 > 0.25.
  board = (np.indices((16, 16)).sum(axis=0) % 2 * 255)[..., None].repeat(3, axis=-1)
  assert audit.high_frequency_fraction(board[None].astype(np.uint8)) > 0.999


def test_low_frequency_wave_has_almost_none():
  # cos at 2/32 cycles/pixel; rounding to uint8 adds ~1/12 grey level^2 of white noise per
  # pixel against a wave of power ~100^2/2, so the high band holds < 1e-4 of the total.
  x = np.arange(32)
  wave = np.round(127.5 + 100 * np.cos(2 * np.pi * 2 * x / 32))[None, :].repeat(32, axis=0)
  image = wave[None, ..., None].repeat(3, axis=-1).astype(np.uint8)
  assert audit.high_frequency_fraction(image) < 1e-3


def test_white_noise_matches_the_area_of_the_band():
  # Flat expected spectrum: the fraction is the share of non-DC frequency bins with radius
  # > 0.25 (0.808 on 32x32). Each image's fraction averages 1023 chi-square(2)-ish bin powers,
  # SE ~0.01 per image and ~0.001 over 100 images; 0.01 is a 10 SE tolerance.
  noise = np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
  radius = np.hypot(np.fft.fftfreq(32)[:, None], np.fft.fftfreq(32)[None, :])
  expected = np.sum(radius > 0.25) / np.sum(radius > 0)
  assert abs(audit.high_frequency_fraction(noise) - expected) < 0.01


def test_unique_levels_counts_distinct_values_per_channel():
  two = np.zeros((1, 4, 4, 3), np.uint8)
  two[0, 0, 0] = 255
  assert audit.unique_levels(two) == 2.0
  ramp = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
  assert audit.unique_levels(np.concatenate([ramp, np.zeros_like(ramp)])) == (256 + 1) / 2


def test_statistics_reject_non_image_input():
  with pytest.raises(ValueError, match="uint8"):
    audit.pixel_stats(np.zeros((2, 4, 4, 3), np.float32))


# --- symptoms and the verdict ---------------------------------------------------------------

DATA = dict(saturated=0.02, hf_fraction=0.1, unique_levels=100.0)


def test_symptoms_need_to_clear_each_threshold():
  t = audit.Thresholds()
  at_limits = dict(saturated=0.06, hf_fraction=0.2, unique_levels=50.0)  # 3x, 2x, 0.5x
  assert audit.symptoms(at_limits, DATA, t) == []
  past = dict(saturated=0.0601, hf_fraction=0.2001, unique_levels=49.9)
  assert audit.symptoms(past, DATA, t) == ["saturated", "speckle", "posterized"]
  # 3x a tiny data saturation is still not a symptom below the 5% floor.
  assert audit.symptoms(dict(past, saturated=0.04), dict(DATA, saturated=0.001), t) == [
      "speckle", "posterized"]


def _row(name, respacing, found):
  return dict(name=name, label=name, respacing=respacing, symptoms=list(found), fid=None)


@pytest.mark.parametrize("none_found, others_found, answer", [
    (audit.SYMPTOMS, [], "yes"),
    (audit.SYMPTOMS, audit.SYMPTOMS, "no"),
    ([], [], "no symptoms"),
])
def test_verdict_answers(none_found, others_found, answer):
  rows = [_row("ddpm_respaced", "respaced", others_found), _row("ddpm_none", "none", none_found),
          _row("ddim", "respaced", others_found), _row("ddpm_all", "respaced", others_found)]
  result = audit.verdict(rows)
  assert result["answer"] == answer
  expected = [r["name"] for r in rows if len(r["symptoms"]) == 3]
  assert result["reproducing"] == expected


def test_verdict_partly_when_only_some_correct_samplers_show_symptoms():
  rows = [_row("ddpm_respaced", "respaced", ["speckle"]), _row("ddpm_none", "none", ["speckle"]),
          _row("ddpm_all", "respaced", [])]
  result = audit.verdict(rows)
  assert result["answer"] == "partly"
  assert "ddpm_respaced" in result["text"] and result["reproducing"] == []


# --- a real run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
  """A smoke-config run whose EMA network denoises a little.

  The smoke run itself (40 steps, lr 1e-4, EMA 0.999) leaves the EMA network next to its
  initialisation, whose output layer is zero: eps ~ 0, for which every sampler returns the
  noise it starts from, amplified, and no sampler property can show. 200 steps at lr 3e-3
  with a short EMA give samples with structure in seconds.
  """
  del cache_dir  # sets DIFFDYN_CACHE: the compile cache the audit subprocess shares
  config = smoke.get_config()
  config.curvature.enabled = False
  config.train.total_steps = TRAIN_STEPS
  config.train.learning_rate = 3e-3
  config.train.ema_decay = 0.5
  # Checkpoints at half-time and the end (for the fallback test), one chunk length compiled.
  config.train.log_every_steps = config.eval.fid_every_steps = TRAIN_STEPS
  config.train.checkpoint_every_steps = TRAIN_STEPS // 2
  workdir = tmp_path_factory.mktemp("smoke_run")
  train.train_and_evaluate(config, str(workdir), evaluators={})
  return workdir


def _tree(path: pathlib.Path) -> dict:
  return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in path.rglob("*")}


def run_cli(*args, cache=None):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  if cache:
    env["DIFFDYN_CACHE"] = cache
  return subprocess.run([sys.executable, "-m", "diffdyn.analysis", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def audited(run_dir, cache_dir):
  """The CLI's audit of the run into its default out dir: (stdout, audit.json, trees).

  In-process (`python -m diffdyn.analysis` runs the same `main`) to spare a second JAX
  start-up; the subprocess tests below cover the entry point.
  """
  del cache_dir  # the compile cache, which later tests hit with the same sampler programs
  before = _tree(run_dir)
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    status = cli.main(["audit", str(run_dir), "--num-samples", str(NUM_SAMPLES),
                       "--nfe", str(NFE), "--ddim-nfe", str(NFE), "--no-fid"])
  assert status == 0
  result = json.loads((run_dir / audit.AUDIT_DIR / audit.JSON_FILE).read_text())
  return stdout.getvalue(), result, before, _tree(run_dir)


def test_cli_reports_all_four_configurations(audited, run_dir):
  stdout, result, _, _ = audited
  names = [r["name"] for r in result["configurations"]]
  assert names == ["ddpm_respaced", "ddpm_none", "ddim", "ddpm_all"]
  assert [r["nfe"] for r in result["configurations"]] == [NFE, NFE, NFE, 100]
  for row in result["configurations"]:
    assert all(math.isfinite(v) for v in row["stats"].values()), row
    assert all(math.isfinite(v) for v in row["relative"].values()), row
    assert row["fid"] is None
  assert result["num_samples"] == NUM_SAMPLES and result["step"] == TRAIN_STEPS
  out = run_dir / audit.AUDIT_DIR
  for name in [*names, "data"]:
    assert (out / f"grid_{name}.png").read_bytes().startswith(b"\x89PNG")
  assert (out / audit.FIGURE_FILE).read_bytes().startswith(b"\x89PNG")
  text = (out / audit.REPORT_FILE).read_text()
  assert "## Is it the sampler?" in text and "DDPM-10 respacing=none" in text
  assert f"is it the sampler? {result['verdict']['answer']}" in stdout


def test_audit_writes_nothing_in_the_run_but_its_out_dir(audited):
  _, _, before, after = audited
  changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
  assert changed and all(k.startswith(audit.AUDIT_DIR) for k in changed), sorted(changed)


def test_respacing_none_leaves_high_frequency_noise(audited):
  # respacing="none" takes the step from tau_k with the original beta_{tau_k}, one original
  # step's worth, although x has to move ~11 steps to tau_{k-1}; the posterior then keeps
  # almost all of x_t and adds fresh noise, so little of the noise is ever removed
  # (on the Gaussian oracle of test_diffusion.py: 100-475x the data variance in small
  # components). The last step at t = 0 returns x0 = (x - 0.01 eps) / 0.99995, i.e. that noise
  # itself: near-white speckle, whose high-frequency fraction is ~0.81 on 16x16 images. The
  # respaced DDPM removes the noise it should and, from the same x_T, keeps the network's
  # smoother structure. Measured on this run: 0.78 vs 0.45 (ratios to the data 2.7 vs 1.5),
  # each a mean over 16 images with per-image SDs 0.03 and 0.08, so SEs 0.008 and 0.02. The
  # factor 1.25 asks for > 0.56 where 0.78 was seen: a margin of ~10 SE of the difference,
  # and it fails if the ablation stops leaving noise (at nfe = T the two samplers coincide).
  rows = {r["name"]: r for r in audited[1]["configurations"]}
  none, respaced = rows["ddpm_none"]["stats"], rows["ddpm_respaced"]["stats"]
  assert none["hf_fraction"] > 1.25 * respaced["hf_fraction"], (none, respaced)
  assert "speckle" in rows["ddpm_none"]["symptoms"]
  assert "ddpm_none" in audited[1]["verdict"]["with_symptoms"]


@pytest.fixture(scope="module")
def seeded_weights(tmp_path_factory):
  path = tmp_path_factory.mktemp("fid") / "seeded.npz"
  assert fid_cli.main(["seeded", os.path.join(ROOT, "tests/fixtures/fid_parity.npz"),
                       str(path)]) == 0
  return str(path)


def test_fid_is_computed_with_seeded_weights(run_dir, audited, seeded_weights, tmp_path):
  del audited  # after the CLI audit: its compiled DDIM program is in the compile cache
  # Inception on the CPU costs ~0.3-1 s per image, so 8 samples and 8 reference images,
  # one batch size (8) for both: one Inception compile. One configuration, since each FID
  # also costs a 2048 x 2048 eigendecomposition (5-30 s on a loaded CPU).
  images = data.load_images(smoke.get_config().data)[:8]
  feats = fid.inception_features(fid.load_inception(seeded_weights), images, batch_size=8)
  mu, sigma = fid.feature_stats(feats)
  stats_path = tmp_path / "ref.npz"
  np.savez(stats_path, mu=mu, sigma=sigma)
  ddim = audit.default_configurations(100, NFE, NFE)[2]
  result = audit.run_audit(run_dir, tmp_path / "out", num_samples=8, batch_size=NUM_SAMPLES,
                           inception_weights=seeded_weights, reference_stats=str(stats_path),
                           configurations=[ddim])
  value = result["configurations"][0]["fid"]
  # Stand-in weights give no meaningful scale; 8 noisy samples vs 8 data images differ.
  assert math.isfinite(value) and value > 0
  saved = json.loads((tmp_path / "out" / audit.JSON_FILE).read_text())
  assert saved["configurations"][0]["fid"] == pytest.approx(value)
  assert saved["fid"]["weights"] == seeded_weights
  assert f"{value:.1f}" in (tmp_path / "out" / audit.REPORT_FILE).read_text()


# --- bad input ----------------------------------------------------------------------------------


def _assert_one_line(stderr: str, *words):
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
  for word in words:
    assert str(word) in lines[0], lines[0]


def test_cli_missing_dir_and_missing_checkpoint_exit_2(run_dir, tmp_path, cache_dir):
  proc = run_cli("audit", tmp_path / "absent", cache=cache_dir)
  assert proc.returncode == 2
  _assert_one_line(proc.stderr, tmp_path / "absent")
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(run_dir / "config.json", bare / "config.json")
  proc = run_cli("audit", bare, cache=cache_dir)
  assert proc.returncode == 2
  _assert_one_line(proc.stderr, bare / "checkpoints", "train the run first")
  assert sorted(os.listdir(bare)) == ["config.json"]  # no checkpoints/ made, no audit/


def _copy_run(run_dir, dest):
  shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(audit.AUDIT_DIR))
  return dest


def _main_error(capsys, *args):
  assert cli.main(["audit", *map(str, args), "--num-samples", "2", "--no-fid"]) == 2
  return capsys.readouterr().err


def test_missing_or_malformed_config_json(tmp_path, capsys, cache_dir):
  del cache_dir
  (tmp_path / "run").mkdir()
  _assert_one_line(_main_error(capsys, tmp_path / "run"), tmp_path / "run" / "config.json",
                   "missing")
  (tmp_path / "run" / "config.json").write_text('{"seed": 1,\n "train": ')
  _assert_one_line(_main_error(capsys, tmp_path / "run"),
                   f"{tmp_path / 'run' / 'config.json'}:2: not valid JSON")
  (tmp_path / "run" / "config.json").write_text('{"train": {"batch_size": 0}}')
  _assert_one_line(_main_error(capsys, tmp_path / "run"), "config.json", "train.batch_size")


def test_corrupt_checkpoint_names_it(run_dir, tmp_path, capsys, cache_dir):
  del cache_dir
  run = _copy_run(run_dir, tmp_path / "run")
  for path in (run / "checkpoints").rglob("state/*"):
    if path.is_file():
      path.write_bytes(b"\0garbage")
  _assert_one_line(_main_error(capsys, run), run / "checkpoints" / str(TRAIN_STEPS),
                   "does not restore, nor does the one before it")


def test_damaged_latest_checkpoint_falls_back_with_a_note(run_dir, audited, tmp_path):
  del audited  # after the CLI audit: its compiled DDIM program is in the compile cache
  run = _copy_run(run_dir, tmp_path / "run")
  for path in (run / "checkpoints" / str(TRAIN_STEPS) / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"\0garbage")
  ddim = audit.default_configurations(100, NFE, NFE)[2]
  result = audit.run_audit(run, num_samples=2, batch_size=NUM_SAMPLES, use_fid=False,
                           configurations=[ddim])
  assert result["step"] == TRAIN_STEPS // 2
  assert any(f"checkpoint at step {TRAIN_STEPS} does not restore" in w
             for w in result["warnings"]), result["warnings"]
  # Read-only: the damaged checkpoint stays where it was.
  assert sorted(os.listdir(run / "checkpoints")) == [str(TRAIN_STEPS // 2), str(TRAIN_STEPS)]
  assert f"step {TRAIN_STEPS // 2}" in (run / audit.AUDIT_DIR / audit.REPORT_FILE).read_text()


def test_missing_fid_files_are_named(run_dir, tmp_path, capsys, cache_dir):
  del cache_dir
  missing = tmp_path / "nope.npz"
  assert cli.main(["audit", str(run_dir), "--inception-weights", str(missing)]) == 2
  _assert_one_line(capsys.readouterr().err, missing, "--inception-weights")
  weights = tmp_path / "w.npz"
  weights.write_bytes(b"")
  assert cli.main(["audit", str(run_dir), "--inception-weights", str(weights),
                   "--reference-stats", str(missing)]) == 2
  _assert_one_line(capsys.readouterr().err, missing, "--reference-stats")
