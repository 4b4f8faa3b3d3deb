"""Tests for diffdyn.analysis: planted synthetic runs must give the planted numbers.

Every expected value below is written down from how the synthetic data was built, or
computed here with numpy/scipy (scipy.stats.t, ttest_ind, pearsonr, spearmanr) rather than
taken from the code under test. Float comparisons use an absolute tolerance of 1e-9 unless
a comment says otherwise; they are exact up to floating-point round-off.
"""
import contextlib
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from scipy import stats as sps

from diffdyn import analysis
from diffdyn import errors
from diffdyn.analysis import __main__ as cli
from diffdyn.analysis import criteria
from diffdyn.analysis import roles
from diffdyn.analysis import runs as runs_lib
from diffdyn.analysis import stats
from diffdyn.analysis import yardsticks

REPO = pathlib.Path(__file__).resolve().parents[1]
CURV = "curvature/hutch_trace_mean"
REF = "curvature/ref/hutch_trace_mean"
MILESTONE = "val/fid_milestone/fid"
FINAL = "eval/final/fid"
TOL = 1e-9


# --------------------------------------------------------------------------- helpers


def make_config(name, seed=0, weighting="constant", total_steps=10_000, base_channels=32):
  return dict(name=name, seed=seed, workdir=f"runs/{name}_{seed}",
              loss=dict(weighting=weighting, minsnr_gamma=5.0),
              model=dict(name="unet_cifar32", base_channels=base_channels),
              train=dict(total_steps=total_steps, batch_size=4),
              data=dict(name="synthetic"), diffusion=dict(schedule="linear"))


def write_run(root, dirname, records, config=None, tail="", grid_steps=()):
  """A run directory with one JSON line per record, then `tail` verbatim."""
  path = pathlib.Path(root) / dirname
  path.mkdir(parents=True)
  text = "".join(json.dumps(r) + "\n" for r in records) + tail
  (path / "metrics.jsonl").write_text(text)
  if config is not None:
    (path / "config.json").write_text(json.dumps(config))
  for step in grid_steps:
    (path / "samples").mkdir(exist_ok=True)
    image = np.full((34, 34, 3), (step % 7) / 7.0)
    matplotlib.image.imsave(path / "samples" / f"step_{step:06d}.png", image)
  return path


def series_records(key, steps, values, wall_per_step=0.01):
  return [{"step": int(s), "wall_time": s * wall_per_step, key: float(v)}
          for s, v in zip(steps, values)]


def planted_e6_curvature(total):
  """Curvature every total/100 steps for an E5/E6 pair with known window statistics.

  Late window (60-100%): baseline all 100, treatment all 80, so the treatment is 20% lower.
  Spike window (20-100%): baseline is 100 with 4 points at 400 (one exactly at the 20%
  boundary, which is inside), so its median is 100 and the spike threshold 1.5 x 100 = 150.
  The treatment has 2 points at 160 (spikes) and one at exactly 150 (not above, no spike).
  Before the window both sit high (1000, 900, and 5000 one cadence before the window), and
  none of that may be counted.
  """
  every = total // 100
  steps = np.arange(every, total + 1, every)
  frac = steps / total
  base = np.where(frac < 0.2, 1000.0, 100.0)
  treat = np.where(frac < 0.2, 900.0, 80.0)
  base[steps == round(0.19 * total)] = 5000.0
  for f in (0.2, 0.3, 0.4, 0.5):
    base[steps == round(f * total)] = 400.0
  for f in (0.25, 0.45):
    treat[steps == round(f * total)] = 160.0
  treat[steps == round(0.35 * total)] = 150.0
  return steps, base, treat


def write_e6_pair(root, total=10_000, base_fid=200.0, treat_fid=188.0, ref_values=95.0):
  steps, base, treat = planted_e6_curvature(total)
  base_records = series_records(CURV, steps, base) + [
      {"step": total, "wall_time": 99.0, FINAL: base_fid}]
  treat_records = series_records(CURV, steps, treat) + [
      {"step": total, "wall_time": 99.0, FINAL: treat_fid}]
  if ref_values is not None:
    # Reference curvature: 95 everywhere after burn-in (5% below the baseline, no spikes).
    ref = np.where(steps / total < 0.2, 950.0, ref_values)
    treat_records += series_records(REF, steps, ref)
  b = write_run(root, "e5", base_records, make_config("e5", 1077, total_steps=total))
  t = write_run(root, "e6", treat_records,
                make_config("e6", 1077, "minsnr", total_steps=total))
  return b, t


def groups_of(*paths):
  return runs_lib.group_replicates(analysis.load_runs(paths))


def fid_records(best, total=10_000, best_at=2000, final_offset=5.0):
  """Milestones every 2000 steps: `best` at `best_at`, worse by 1 per milestone elsewhere."""
  records = []
  for k, step in enumerate(range(2000, total + 1, 2000)):
    fid = best if step == best_at else best + 1.0 + k
    records.append({"step": step, "wall_time": step * 0.1, MILESTONE: fid})
  records.append({"step": total, "wall_time": total * 0.1 + 5, FINAL: best + final_offset})
  return records


NOISE = (-0.3, 0.1, 0.4, -0.2)  # planted seed-to-seed noise, mean 0


def write_e7(root, ref_best, longer_best, wider_best, noise=NOISE, shared_seeds=False):
  """E7a/b/c groups with len(noise) seeds each; seed i's best FID is best + noise[i].

  Each group has its own seeds (independent groups: Welch) unless `shared_seeds`.
  """
  paths = []
  for g, (name, best, total, width) in enumerate((("e7a", ref_best, 10_000, 32),
                                                  ("e7b", longer_best, 50_000, 32),
                                                  ("e7c", wider_best, 10_000, 64))):
    for i, eps in enumerate(noise):
      seed = i if shared_seeds else 100 * g + i
      paths.append(write_run(root, f"{name}_s{i}", fid_records(best + eps, total),
                             make_config(name, seed, total_steps=total, base_channels=width)))
  return paths


def welch_ci(variant, reference):
  """Reference interval: scipy's Welch t-test interval for mean(variant) - mean(reference)."""
  ci = sps.ttest_ind(variant, reference, equal_var=False).confidence_interval(0.95)
  return float(ci.low), float(ci.high)


# --------------------------------------------------------------------------- stats


def test_mean_interval_matches_t_by_hand():
  x = np.array([203.1, 203.9, 203.4, 204.0])
  got = stats.mean_interval(x, 0.95)
  half = sps.t.ppf(0.975, 3) * x.std(ddof=1) / math.sqrt(4)
  assert got.estimate == pytest.approx(x.mean(), abs=TOL)
  assert got.low == pytest.approx(x.mean() - half, abs=TOL)
  assert got.high == pytest.approx(x.mean() + half, abs=TOL)
  lo90 = stats.mean_interval(x, 0.90).low
  assert lo90 == pytest.approx(x.mean() - sps.t.ppf(0.95, 3) * x.std(ddof=1) / 2, abs=TOL)


def test_single_value_has_no_interval():
  got = stats.mean_interval([203.6])
  assert got.estimate == 203.6 and not got.has_interval
  assert got.method == "single seed: no interval"
  diff = stats.welch_difference([203.6], [203.2])
  assert diff.estimate == pytest.approx(-0.4, abs=TOL) and not diff.has_interval


def test_welch_difference_matches_scipy():
  a = np.array([203.5, 203.9, 203.2, 203.8])
  b = np.array([203.0, 203.6, 203.1, 203.3, 202.9])
  got = stats.welch_difference(a, b)
  low, high = welch_ci(b, a)
  assert got.estimate == pytest.approx(b.mean() - a.mean(), abs=TOL)
  assert (got.low, got.high) == pytest.approx((low, high), abs=TOL)


def test_relative_change_log_ratio_by_hand():
  a = np.array([100.0, 104.0, 97.0, 101.0])
  b = np.array([80.0, 83.0, 78.0, 81.0])
  got = stats.relative_change(a, b)
  low, high = log_ratio_interval(a, b)
  assert got.estimate == pytest.approx(b.mean() / a.mean() - 1, abs=TOL)
  assert (got.low, got.high) == pytest.approx((low, high), abs=TOL)
  assert got.low < got.estimate < got.high


def test_correlations_match_scipy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=20)
  y = -0.6 * x + rng.normal(size=20)
  pearson = stats.correlation(x, y, "pearson")
  ref = sps.pearsonr(x, y)
  ci = ref.confidence_interval(0.95)  # scipy's Fisher-z interval
  assert pearson.estimate == pytest.approx(ref.statistic, abs=TOL)
  assert (pearson.low, pearson.high) == pytest.approx((ci.low, ci.high), abs=1e-7)
  spearman = stats.correlation(x, y, "spearman")
  rho = sps.spearmanr(x, y).statistic
  half = 1.959963984540054 * math.sqrt(1.06 / 17)  # Fieller et al. (1957) variance
  assert spearman.estimate == pytest.approx(rho, abs=TOL)
  assert spearman.low == pytest.approx(math.tanh(math.atanh(rho) - half), abs=1e-9)


def test_partial_correlation_equals_correlation_of_residuals():
  rng = np.random.default_rng(5)
  step = np.arange(30.0)
  x = -step + rng.normal(scale=3.0, size=30)
  y = step + rng.normal(scale=3.0, size=30)
  got = stats.partial_correlation(x, y, step, "pearson")
  rx = x - np.polyval(np.polyfit(step, x, 1), step)
  ry = y - np.polyval(np.polyfit(step, y, 1), step)
  r = sps.pearsonr(rx, ry).statistic
  assert got.estimate == pytest.approx(r, abs=1e-9)
  half = 1.959963984540054 / math.sqrt(30 - 4)  # one controlled variable: n - 3 - 1
  assert got.high == pytest.approx(math.tanh(math.atanh(r) + half), abs=1e-9)
  # Both series are driven by step, so the raw correlation is strongly negative while the
  # partial one is not.
  assert stats.correlation(x, y).estimate < -0.8
  assert abs(got.estimate) < 0.5


def test_welch_p_value_matches_scipy():
  a = np.array([203.5, 203.9, 203.2, 203.8])
  b = np.array([203.0, 203.6, 203.1, 203.3, 202.9])
  got = stats.welch_difference(a, b)
  assert got.p_value == pytest.approx(sps.ttest_ind(b, a, equal_var=False).pvalue, rel=1e-9)
  assert got.test == "Welch t"


def test_paired_difference_matches_scipy():
  # Six pairs: the t interval is scipy's ttest_rel interval; the test is the exact sign-flip
  # test, which scipy's permutation_test runs exactly (all 2^6 sign patterns) on paired
  # samples with permutation_type="samples".
  a = np.array([100.0, 130.0, 80.0, 115.0, 95.0, 125.0])
  b = a + np.array([-4.0, -6.5, -3.0, -5.0, 1.0, -4.5])
  got = stats.paired_difference(a, b)
  ci = sps.ttest_rel(b, a).confidence_interval(0.95)
  assert got.estimate == pytest.approx(np.mean(b - a), abs=TOL)
  assert (got.low, got.high) == pytest.approx((ci.low, ci.high), abs=TOL)
  ref = sps.permutation_test((b, a), lambda x, y: np.mean(x - y), permutation_type="samples",
                             n_resamples=np.inf, alternative="two-sided")
  assert got.p_value == pytest.approx(ref.pvalue, abs=TOL)
  assert got.test == "exact sign-flip test over 2^6 = 64 patterns"
  # Above EXACT_SIGN_FLIP_MAX_N pairs the test is the paired t test.
  many = stats.paired_difference(np.tile(a, 2), np.tile(b, 2) + np.arange(12) * 0.01)
  d = np.tile(b, 2) + np.arange(12) * 0.01 - np.tile(a, 2)
  assert many.p_value == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue, rel=1e-9)


def test_identical_shifts_have_no_spread_but_a_sign_flip_test():
  # Eight pairs all shifted by -0.3: only the all-minus and all-plus sign patterns reach
  # |sum| = 8 x 0.3, so p = 2 / 2^8 exactly. There is no spread, hence no t interval.
  got = stats.paired_difference(np.arange(8.0), np.arange(8.0) - 0.3)
  assert got.estimate == pytest.approx(-0.3, abs=TOL) and not got.has_interval
  assert got.method == "no spread: 8 pairs, identical values"
  assert got.p_value == 2 / 256


def test_zero_variance_groups_say_no_spread():
  same = stats.mean_interval([203.6, 203.6, 203.6])
  assert not same.has_interval and same.method == "no spread: 3 runs, identical values"
  diff = stats.welch_difference([203.6] * 3, [203.2] * 4)
  assert diff.estimate == pytest.approx(-0.4, abs=TOL)
  assert not diff.has_interval and not diff.has_test
  assert diff.method == "no spread: 3 and 4 runs, identical values in each group"
  rel = stats.relative_change([203.6] * 3, [203.2] * 4)
  assert not rel.has_interval and rel.method.startswith("no spread")


def test_holm_adjustment_by_hand():
  # Sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04; running maximum 0.03, 0.06, 0.06.
  assert stats.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06], abs=TOL)
  # 0.5 x 2 = 1.0 (the cap) and 0.9 x 1 raised to the running maximum 1.0.
  assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0], abs=TOL)


def test_rolling_median_of_a_monotone_curve_is_the_curve_and_robust_sd_by_hand():
  steps = np.arange(100, 10001, 100)
  curve = 300 + 600 * np.exp(-steps / 3000)
  np.testing.assert_array_equal(stats.rolling_median(curve, 11), curve)
  spiked = np.array([1.0, 1.0, 1.0, 9.0, 1.0, 1.0, 1.0])
  np.testing.assert_array_equal(stats.rolling_median(spiked, 3), np.ones(7))
  # [1, 2, 3, 4, 100]: median 3, absolute deviations 2, 1, 0, 1, 97 with median 1.
  assert stats.robust_sd([1, 2, 3, 4, 100]) == pytest.approx(1 / sps.norm.ppf(0.75), abs=TOL)
  with pytest.raises(ValueError, match="odd"):
    stats.rolling_median(curve, 4)


# --------------------------------------------------------------------------- loading


def test_split_lines_merge_by_step_and_special_floats(tmp_path):
  tail = ('{"step": 100, "wall_time": 1.0, "train/loss": NaN}\n'
          '{"step": 100, "wall_time": 1.5, "curvature/hutch_trace_mean": Infinity}\n'
          '{"step": 200, "wall_time": 2.0, "train/loss": 0.5, "note": "text"}\n')
  path = write_run(tmp_path, "r", [], make_config("r"), tail=tail)
  run = analysis.load_run(path)
  steps, loss = run.series("train/loss")
  assert steps.tolist() == [100, 200]
  assert math.isnan(loss[0]) and loss[1] == 0.5
  assert run.series(CURV)[1].tolist() == [math.inf]
  assert run.series("wall_time")[1].tolist() == [1.5, 2.0]  # latest line of step 100
  assert any("'note' is not a number" in w and "metrics.jsonl:3" in w for w in run.warnings)


def test_repeated_key_keeps_later_value_with_warning(tmp_path):
  records = [{"step": 100, "train/loss": 1.0}, {"step": 100, "train/loss": 2.0}]
  run = analysis.load_run(write_run(tmp_path, "r", records, make_config("r")))
  assert run.series("train/loss")[1].tolist() == [2.0]
  assert any("metrics.jsonl:2" in w and "more than once" in w for w in run.warnings)


def test_truncated_last_line_is_ignored_with_warning(tmp_path):
  records = series_records("train/loss", [100, 200, 300], [1.0, 0.9, 0.8])
  path = write_run(tmp_path, "r", records, make_config("r"),
                   tail='{"step": 400, "wall_time": 4.0, "train/lo')
  run = analysis.load_run(path)
  assert run.series("train/loss")[0].tolist() == [100, 200, 300]
  assert len(run.warnings) == 1
  assert run.warnings[0].startswith(f"{path / 'metrics.jsonl'}:4: incomplete last line ignored")


def test_non_json_middle_line_names_file_and_line(tmp_path):
  path = write_run(tmp_path, "r", [{"step": 1, "a": 1.0}], make_config("r"),
                   tail='oops, not json\n{"step": 2, "a": 2.0}\n')
  with pytest.raises(runs_lib.RunFormatError) as e:
    analysis.load_run(path)
  assert str(e.value).startswith(f"{path / 'metrics.jsonl'}:2: not valid JSON")
  assert isinstance(e.value, errors.UserError)


@pytest.mark.parametrize("tail, expected", [
    ("", "empty, no metric lines"),
    ("\n  \n", "empty, no metric lines"),
    ('{"step": 1, "a": ', "no complete metric lines"),
])
def test_empty_run_names_the_file(tmp_path, tail, expected):
  path = write_run(tmp_path, "r", [], make_config("r"), tail=tail)
  with pytest.raises(runs_lib.RunFormatError, match=expected) as e:
    analysis.load_run(path)
  assert str(e.value).startswith(str(path / "metrics.jsonl"))


def test_missing_metrics_file_and_missing_directory(tmp_path):
  (tmp_path / "no_metrics").mkdir()
  with pytest.raises(runs_lib.RunFormatError) as e:
    analysis.load_run(tmp_path / "no_metrics")
  assert str(e.value) == (f"{tmp_path / 'no_metrics' / 'metrics.jsonl'}: missing "
                          f"(is {tmp_path / 'no_metrics'} a run directory?)")
  with pytest.raises(runs_lib.RunFormatError, match="not a directory"):
    analysis.load_run(tmp_path / "absent")


@pytest.mark.parametrize("line, expected", [
    ('{"wall_time": 1.0, "a": 1.0}', ":2: no 'step' field"),
    ('{"step": "ten", "a": 1.0}', ":2: 'step' is 'ten', expected an integer"),
    ('{"step": 2.5, "a": 1.0}', ":2: 'step' is 2.5, expected an integer"),
    ('[1, 2]', ":2: expected a JSON object, got list"),
])
def test_bad_records_name_file_and_line(tmp_path, line, expected):
  path = write_run(tmp_path, "r", [{"step": 1, "a": 1.0}], make_config("r"),
                   tail=line + "\n" + '{"step": 3, "a": 1.0}\n')
  with pytest.raises(runs_lib.RunFormatError) as e:
    analysis.load_run(path)
  assert str(e.value) == f"{path / 'metrics.jsonl'}{expected}"


def test_bad_config_json_names_file_and_line(tmp_path):
  path = write_run(tmp_path, "r", [{"step": 1, "a": 1.0}])
  (path / "config.json").write_text('{\n  "name": "r",\n  oops\n}')
  with pytest.raises(runs_lib.RunFormatError) as e:
    analysis.load_run(path)
  assert str(e.value).startswith(f"{path / 'config.json'}:3: not valid JSON")


def test_missing_config_falls_back_to_directory_name(tmp_path):
  run = analysis.load_run(write_run(tmp_path, "my_run", [{"step": 5, "a": 1.0}]))
  assert run.name == "my_run" and run.total_steps == 5
  assert any("config.json: missing" in w for w in run.warnings)


def test_replicates_group_by_config_except_seed_and_workdir(tmp_path):
  rec = [{"step": 1, "a": 1.0}]
  paths = [write_run(tmp_path, f"e6_s{s}", rec, make_config("e6", s, "minsnr")) for s in (1, 2)]
  paths.append(write_run(tmp_path, "e5", rec, make_config("e5")))
  other = make_config("e6", 3, "minsnr")
  other["train"]["batch_size"] = 8
  paths.append(write_run(tmp_path, "e6_bs8", rec, other))
  groups = groups_of(*paths)
  assert [(g.name, g.size) for g in groups] == [("e6", 2), ("e5", 1), ("e6 [2]", 1)]
  notes = runs_lib.grouping_notes(groups)
  assert any("train.batch_size" in n for n in notes)


# --------------------------------------------------------------------------- E6 vs E5


@pytest.mark.parametrize("total", [10_000, 1_000])
def test_e6_planted_curvature_spikes_and_fid(tmp_path, total):
  b, t = write_e6_pair(tmp_path, total)
  base, treat = groups_of(b, t)
  result = criteria.e6_vs_e5(base, treat)
  mean_change = result["train_objective"]["mean_change"]
  assert mean_change["relative_change"].estimate == pytest.approx(-0.20, abs=TOL)
  assert mean_change["baseline"].estimate == pytest.approx(100.0, abs=TOL)
  assert mean_change["treatment"].estimate == pytest.approx(80.0, abs=TOL)
  for row in mean_change["per_run"]["baseline"] + mean_change["per_run"]["treatment"]:
    assert row["steps"] == [int(0.6 * total), total] and row["points"] == 41
  assert mean_change["verdict"] == "met"
  assert mean_change["basis"] == "single seed: no interval"
  spikes = result["train_objective"]["spikes"]
  assert spikes["baseline_median"] == 100.0 and spikes["threshold"] == 150.0
  assert [r["spikes"] for r in spikes["per_run"]["baseline"]] == [4]
  assert [r["spikes"] for r in spikes["per_run"]["treatment"]] == [2]
  assert spikes["per_run"]["baseline"][0]["steps"] == [int(0.2 * total), total]
  assert spikes["per_run"]["baseline"][0]["points"] == 81
  assert spikes["verdict"] == "met" and spikes["measure"] == "spikes"
  fid = result["final_fid"]
  assert fid["relative_change"].estimate == pytest.approx(188 / 200 - 1, abs=TOL)
  assert fid["verdict"] == "met" and fid["ideal_met"]
  # Reference objective: E5 (constant weighting) stands in with its train curvature; E6's
  # reference is 95 vs 100 (5% lower, not the 15% asked) but has no spikes (0 < 4).
  reference = result["reference_objective"]
  assert reference["mean_change"]["relative_change"].estimate == pytest.approx(-0.05, abs=TOL)
  assert reference["mean_change"]["verdict"] == "not met"
  assert reference["mean_change"]["per_run"]["baseline"][0]["key"] == CURV
  assert reference["mean_change"]["per_run"]["treatment"][0]["key"] == REF
  assert [r["spikes"] for r in reference["spikes"]["per_run"]["treatment"]] == [0]
  assert reference["verdict"] == "met"
  assert result["overall"] == {"verdict": "met", "curvature_judged_on": "reference",
                               "caveat": None}
  assert "min(SNR, gamma)/SNR" in result["note"]


def test_e6_fid_worse_than_tolerance_fails(tmp_path):
  b, t = write_e6_pair(tmp_path, base_fid=200.0, treat_fid=224.0)  # +12% > +10%
  result = criteria.e6_vs_e5(*groups_of(b, t))
  assert result["final_fid"]["relative_change"].estimate == pytest.approx(0.12, abs=TOL)
  assert result["final_fid"]["verdict"] == "not met"
  assert result["overall"]["verdict"] == "not met"


def test_e6_without_reference_is_judged_on_train_objective_with_caveat(tmp_path):
  b, t = write_e6_pair(tmp_path, ref_values=None)
  result = criteria.e6_vs_e5(*groups_of(b, t))
  assert result["reference_objective"]["verdict"] == "skipped"
  assert "'curvature/ref/hutch_trace_mean' is not logged in e6" in (
      result["reference_objective"]["mean_change"]["reason"])
  assert result["overall"]["curvature_judged_on"] == "train"
  assert "lowers that trace by construction" in result["overall"]["caveat"]


def test_e6_infinite_curvature_skips_mean_but_counts_as_spike(tmp_path):
  steps, base, treat = planted_e6_curvature(1000)
  treat[steps == 900] = math.inf
  b = write_run(tmp_path, "e5", series_records(CURV, steps, base),
                make_config("e5", 0, total_steps=1000))
  t = write_run(tmp_path, "e6", series_records(CURV, steps, treat),
                make_config("e6", 0, "minsnr", total_steps=1000))
  result = criteria.e6_vs_e5(*groups_of(b, t))["train_objective"]
  assert result["mean_change"]["verdict"] == "skipped"
  assert "1 infinite 'curvature/hutch_trace_mean' value(s) in steps 600-1000" in (
      result["mean_change"]["reason"])
  assert [r["spikes"] for r in result["spikes"]["per_run"]["treatment"]] == [3]  # 2 planted + inf


def test_bad_options_are_user_errors():
  with pytest.raises(errors.UserError, match="late_window must satisfy"):
    criteria.Options(late_window=(0.8, 0.6))
  with pytest.raises(errors.UserError, match="confidence must be in"):
    criteria.Options(confidence=95)


def test_e6_missing_keys_skip_with_reason(tmp_path):
  b = write_run(tmp_path, "e5", series_records("train/loss", [100, 200], [1, 2]),
                make_config("e5"))
  t = write_run(tmp_path, "e6", series_records("train/loss", [100, 200], [1, 2]),
                make_config("e6", weighting="minsnr"))
  result = criteria.e6_vs_e5(*groups_of(b, t))
  reason = result["train_objective"]["mean_change"]["reason"]
  assert result["train_objective"]["mean_change"]["verdict"] == "skipped"
  assert f"'{CURV}' is not logged in e5 seed 0 ({b})" == reason
  assert "'eval/final/fid' is not logged" in result["final_fid"]["reason"]
  assert result["overall"]["verdict"] == "skipped"
  text = analysis.write_report(analysis.load_runs([b, t]), tmp_path / "out").read_text()
  assert f"- (a) mean curvature over the late window: **skipped**: {reason}" in text
  assert "- skipped e6_vs_e5.final_fid: 'eval/final/fid' is not logged in e5" in text


def test_e6_replicates_use_welch_intervals(tmp_path):
  # Seeds 0-2 against 10-12: nothing pairs the groups, so they are independent samples.
  total, steps = 1000, np.arange(10, 1001, 10)
  base_levels, treat_levels = [100.0, 104.0, 97.0], [80.0, 83.0, 79.0]
  paths = []
  for seed, (lb, lt) in enumerate(zip(base_levels, treat_levels)):
    paths.append(write_run(tmp_path, f"e5_s{seed}", series_records(CURV, steps, np.full(100, lb)),
                           make_config("e5", seed, total_steps=total)))
    paths.append(write_run(tmp_path, f"e6_s{seed}", series_records(CURV, steps, np.full(100, lt)),
                           make_config("e6", seed + 10, "minsnr", total_steps=total)))
  groups = groups_of(*paths)
  base, treat, how = roles.e6_roles(groups)
  assert (base.name, treat.name, base.size) == ("e5", "e6", 3)
  result = criteria.e6_vs_e5(base, treat)["train_objective"]["mean_change"]
  low, high = welch_ci(treat_levels, base_levels)
  assert (result["difference"].low, result["difference"].high) == pytest.approx((low, high),
                                                                                abs=TOL)
  assert high < 0  # precondition of the planted case: the interval excludes 0
  assert not result["pairing"]["paired"] and "seed lists differ" in result["pairing"]["how"]
  p = sps.ttest_ind(treat_levels, base_levels, equal_var=False).pvalue
  assert result["difference"].p_value == pytest.approx(p, rel=1e-9)
  assert result["verdict"] == "met" and result["basis"].startswith("Welch t, p = ")


def log_ratio_interval(a, b):
  """Reference: delta-method interval of mean(b)/mean(a) - 1 on the log scale, by hand."""
  a, b = np.asarray(a), np.asarray(b)
  va, vb = a.var(ddof=1) / (a.size * a.mean() ** 2), b.var(ddof=1) / (b.size * b.mean() ** 2)
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
  center = math.log(b.mean() / a.mean())
  return math.expm1(center - half), math.expm1(center + half)


@pytest.mark.parametrize("treat_fids, verdict", [
    ((215.0, 230.0, 200.0), "inconclusive"),  # estimate +7.5% but the interval reaches > +10%
    ((205.0, 207.0, 206.0), "met"),           # whole interval below +10%
    ((240.0, 242.0, 238.0), "not met"),       # whole interval above +10%
])
def test_e6_final_fid_non_inferiority_with_replicates(tmp_path, treat_fids, verdict):
  base_fids = (200.0, 202.0, 198.0)
  paths = []
  for seed, (fb, ft) in enumerate(zip(base_fids, treat_fids)):
    paths.append(write_run(tmp_path, f"e5_s{seed}", [{"step": 100, FINAL: fb}],
                           make_config("e5", seed)))
    paths.append(write_run(tmp_path, f"e6_s{seed}", [{"step": 100, FINAL: ft}],
                           make_config("e6", seed + 10, "minsnr")))
  base, treat, _ = roles.e6_roles(groups_of(*paths))
  result = criteria.e6_vs_e5(base, treat)["final_fid"]
  low, high = log_ratio_interval(base_fids, treat_fids)
  assert (result["relative_change"].low, result["relative_change"].high) == pytest.approx(
      (low, high), abs=TOL)
  assert result["verdict"] == verdict


def test_e6_roles_by_config_and_by_flag(tmp_path):
  rec = [{"step": 1, "a": 1.0}]
  paths = [write_run(tmp_path, "const", rec, make_config("const")),
           write_run(tmp_path, "msnr", rec, make_config("msnr", weighting="minsnr")),
           write_run(tmp_path, "wide", rec, make_config("wide", base_channels=64))]
  groups = groups_of(*paths)
  base, treat, how = roles.e6_roles(groups)
  assert (base.name, treat.name) == ("const", "msnr") and "by config" in how
  base, treat, _ = roles.e6_roles(groups, baseline="wide")
  assert (base.name, treat.name) == ("wide", "msnr")
  with pytest.raises(errors.UserError, match="--baseline 'nope': no run or group"):
    roles.e6_roles(groups, baseline="nope")


def test_planted_e6_detrended_spikes_are_the_planted_bumps(tmp_path):
  # The planted curves are flat (100 and 80) with bumps: most second differences are 0, so
  # the noise SD is 0 and every point above its rolling median counts. The
  # baseline's bump at the window's first step (2000) sits next to the 1000-level burn-in:
  # its neighbourhood's median is the bump itself, so it is not above its trend.
  b, t = write_e6_pair(tmp_path, 10_000)
  result = criteria.e6_vs_e5(*groups_of(b, t))["train_objective"]["detrended_spikes"]
  assert result["per_run"]["baseline"][0]["spike_steps"] == [3000, 4000, 5000]
  assert result["per_run"]["treatment"][0]["spike_steps"] == [2500, 3500, 4500]
  assert result["per_run"]["baseline"][0]["noise_sd"] == 0.0
  assert result["verdict"] == "not met"  # 3 vs 3: not fewer


def write_smooth_e5_e6(root, noise=None, spike_at=None):
  """E5 = 300 + 600 exp(-s/3000) and E6 = 0.94 E5, every 100 steps to 10k, FID 200 for both.

  Optionally plus seeded noise (the same draw on both) and a spike on E5 at `spike_at`.
  """
  steps = np.arange(100, 10001, 100)
  e5 = 300 + 600 * np.exp(-steps / 3000)
  e6 = 0.94 * e5
  if noise is not None:
    e5, e6 = e5 + noise, e6 + noise
  if spike_at is not None:
    e5[steps == spike_at] += 40.0
  fid = [{"step": 10_000, FINAL: 200.0}]
  return (write_run(root, "e5", series_records(CURV, steps, e5) + fid,
                    make_config("e5", 1077)),
          write_run(root, "e6", series_records(CURV, steps, e6) + fid,
                    make_config("e6", 1077, "minsnr")))


def test_noise_free_curves_have_no_detrended_spikes_and_verdict_not_met(tmp_path):
  # Finding 1 of issue 12: with the seeds' literal count these spike-free curves give 4 vs 0
  # (E5's points at 2000-2300 are above 1.5 x the pooled median 300 + 600 exp(-2) = 381.2)
  # and the overall verdict "met". Detrended, both curves are their own rolling median: no
  # spikes at all; (a) is -6% against the 15% asked: the verdict is "not met".
  result = criteria.e6_vs_e5(*groups_of(*write_smooth_e5_e6(tmp_path)))
  train = result["train_objective"]
  literal = train["spikes"]
  assert [r["spikes"] for r in literal["per_run"]["baseline"]] == [4]
  assert [r["spikes"] for r in literal["per_run"]["treatment"]] == [0]
  assert literal["level_sensitive"] and not literal["used_in_verdict"]
  assert literal["baseline_median"] == pytest.approx(300 + 600 * math.exp(-2), abs=1e-9)
  detrended = train["detrended_spikes"]
  assert [r["spikes"] for role in detrended["per_run"].values() for r in role] == [0, 0]
  assert detrended["verdict"] == "not met"
  assert train["mean_change"]["relative_change"].estimate == pytest.approx(-0.06, abs=TOL)
  assert train["mean_change"]["verdict"] == "not met"
  assert train["verdict"] == "not met"
  assert result["overall"]["verdict"] == "not met"


def test_detrended_spike_found_on_a_noisy_decaying_curve(tmp_path):
  # Noise SD 2 around the decay (the same draw on both), and +40 (20 SD) on E5 at step 5000.
  # The noise SD is estimated from 81 second differences, so within ~+-25% of 2 (SE of a
  # MAD-based SD over 81 points ~ 0.13 relative; the trend's own second difference is
  # < 0.7, a small bias): 3.5 of them is 5-9, the spike's residual ~38 passes, and a noise
  # point's residual (rarely above 2.5 SD x 2 = 5 among 81) stays below.
  noise = np.random.default_rng(12).normal(0.0, 2.0, 100)
  result = criteria.e6_vs_e5(*groups_of(*write_smooth_e5_e6(tmp_path, noise, 5000)))
  detrended = result["train_objective"]["detrended_spikes"]
  assert detrended["per_run"]["baseline"][0]["spike_steps"] == [5000]
  assert detrended["per_run"]["treatment"][0]["spike_steps"] == []
  assert 1.5 < detrended["per_run"]["baseline"][0]["noise_sd"] < 2.5
  assert detrended["verdict"] == "met"  # E6 has 0 against E5's 1: fewer (single seed)
  # The literal count misses it (5000's value, ~453, is below 1.5 x the pooled median,
  # ~572) and counts E5's early points instead, as on the noise-free curves (there 2000-2300;
  # 2300 is only 6.8 above the line, within the noise's reach).
  literal = result["train_objective"]["spikes"]
  steps, values = analysis.load_run(tmp_path / "e5").series(CURV)
  assert values[steps == 5000][0] < literal["threshold"]
  assert literal["per_run"]["baseline"][0]["spikes"] in (3, 4)


BASE_LEVELS = (60.0, 95.0, 40.0, 120.0, 75.0, 50.0, 110.0, 85.0)  # mean 79.4, SD 27


def write_level_pairs(root, shifts, paired=True, total=1000):
  """Flat curvature per run: E5 seed i at BASE_LEVELS[i], E6 at BASE_LEVELS[i] + shifts[i].

  E5 and E6 share seeds 1077... when `paired`, else E6 uses seeds 2077...
  """
  steps = np.arange(10, total + 1, 10)
  paths = []
  for i, (level, shift) in enumerate(zip(BASE_LEVELS, shifts)):
    paths.append(write_run(root, f"e5_s{i}", series_records(CURV, steps, np.full(steps.size,
                                                                                   level)),
                           make_config("e5", 1077 + i, total_steps=total)))
    paths.append(write_run(root, f"e6_s{i}", series_records(
        CURV, steps, np.full(steps.size, level + shift)),
                           make_config("e6", (1077 if paired else 2077) + i, "minsnr",
                                       total_steps=total)))
  return groups_of(*paths)


def test_paired_seeds_with_a_constant_shift_are_distinguished_where_welch_is_not(tmp_path):
  # Every E6 seed sits 20 below its E5 seed (-25% on average, past the 15% asked); seed to
  # seed the levels spread far more (SD 27). Paired: every difference is -20, so no spread
  # and no interval, but the exact sign-flip p is 2/256 (only all-minus and all-plus reach
  # 8 x 20); Holm over (a) and (b) doubles it (b's p is 1: no spikes anywhere) to 1/64.
  shifts = [-20.0] * 8
  paired = criteria.e6_vs_e5(*write_level_pairs(tmp_path / "p", shifts))["train_objective"]
  change = paired["mean_change"]
  assert change["pairing"]["paired"] and change["pairing"]["seeds"] == list(range(1077, 1085))
  assert change["difference"].method == "no spread: 8 pairs, identical values"
  assert change["difference"].p_value == 2 / 256
  assert change["p_holm"] == pytest.approx(4 / 256, abs=TOL)
  assert change["verdict"] == "met" and paired["verdict"] == "met"
  # The same numbers with unrelated seeds: Welch's interval includes 0.
  low, high = welch_ci(np.array(BASE_LEVELS) - 20, BASE_LEVELS)
  assert low < 0 < high  # precondition, by scipy
  welch = criteria.e6_vs_e5(*write_level_pairs(tmp_path / "w", shifts, paired=False))
  change = welch["train_objective"]["mean_change"]
  assert not change["pairing"]["paired"]
  assert (change["difference"].low, change["difference"].high) == pytest.approx((low, high),
                                                                                abs=TOL)
  assert change["verdict"] == "not distinguishable"


def test_criteria_joined_by_or_are_holm_corrected(tmp_path):
  # Shifts -20 x 6 and +5, +5: the sign-flip p is 8/256 = 1/32 (the six -20s must keep their
  # sign to reach |sum| >= 110; the two 5s may take any of 4 sign pairs; times 2 for the
  # mirror image). 1/32 <= 0.05 alone, but Holm with (b) (p = 1) makes it 1/16 > 0.05.
  shifts = [-20.0] * 6 + [5.0, 5.0]
  result = criteria.e6_vs_e5(*write_level_pairs(tmp_path, shifts))["train_objective"]
  change = result["mean_change"]
  d = np.array(shifts)
  ref = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf)
  assert change["difference"].p_value == pytest.approx(ref.pvalue, abs=TOL) == 1 / 32
  assert result["detrended_spikes"]["difference"].p_value == 1.0
  assert result["correction"] == {"method": "Holm", "alpha": pytest.approx(0.05), "family": 2}
  assert change["p_holm"] == pytest.approx(1 / 16, abs=TOL)
  assert change["verdict"] == "not distinguishable" and result["verdict"] == "not distinguishable"
  assert "Holm-adjusted p = 0.0625" in change["basis"]


# --------------------------------------------------------------------------- E7


def test_best_fid_planted_step_source_and_ties(tmp_path):
  records = [{"step": s, MILESTONE: f} for s, f in
             zip(range(2000, 10001, 2000), [210.0, 203.6, 205.0, 203.6, 208.0])]
  records.append({"step": 10000, FINAL: 208.5})
  best = criteria.best_fid(analysis.load_run(write_run(tmp_path, "a", records)))
  assert (best["best_fid"], best["step"], best["source"]) == (203.6, 4000, MILESTONE)
  assert not best["at_first_eval"]
  assert best["num_evaluations"] == 5
  # The final FID (another sample size) never competes, and a NaN milestone is no evaluation.
  records = [{"step": 2000, MILESTONE: 210.0}, {"step": 4000, MILESTONE: math.nan},
             {"step": 4000, FINAL: 205.0}]
  best = criteria.best_fid(analysis.load_run(write_run(tmp_path, "b", records)))
  assert (best["best_fid"], best["step"], best["source"]) == (210.0, 2000, MILESTONE)
  assert best["num_evaluations"] == 1


@pytest.mark.parametrize("ref, longer, wider, outcome, steps_verdict, capacity_verdict", [
    (200.0, 180.0, 199.9, "under-training", "clearly better", "not distinguishable"),
    (200.0, 200.1, 180.0, "under-capacity", "not distinguishable", "clearly better"),
    (200.0, 185.0, 180.0, "both", "clearly better", "clearly better"),
    (203.6, 203.6, 203.2, "neither", "not distinguishable", "not distinguishable"),
    (200.0, 210.0, 199.0, "neither", "clearly worse", "better, but below the practical threshold"),
])
def test_e7_branches_with_four_seeds(tmp_path, ref, longer, wider, outcome, steps_verdict,
                                     capacity_verdict):
  groups = groups_of(*write_e7(tmp_path, ref, longer, wider))
  found, _, missing = roles.e7_roles(groups)
  assert not missing and [g.size for g in found.values()] == [4, 4, 4]
  result = criteria.e7_steps_vs_capacity(found["e7a"], found["e7b"], found["e7c"])
  ref_values = [ref + e for e in NOISE]
  for name, best, verdict in (("steps_effect", longer, steps_verdict),
                              ("capacity_effect", wider, capacity_verdict)):
    values = [best + e for e in NOISE]
    low, high = welch_ci(values, ref_values)
    comparison = result[name]
    assert comparison["difference"].estimate == pytest.approx(best - ref, abs=TOL)
    assert (comparison["difference"].low, comparison["difference"].high) == pytest.approx(
        (low, high), abs=TOL)
    assert comparison["improvement"] == pytest.approx((ref - best) / ref, abs=TOL)
    assert comparison["verdict"] == verdict
  mean_a = result["best_fid"]["e7a"]["best_fid"]
  half = sps.t.ppf(0.975, 3) * np.std(ref_values, ddof=1) / 2
  assert (mean_a.estimate, mean_a.low) == pytest.approx((ref, ref - half), abs=TOL)
  assert result["best_fid"]["e7a"]["steps"] == [2000] * 4
  assert result["interpretation"]["outcome"] == outcome


def test_e7_203_2_vs_203_6_is_not_distinguishable(tmp_path):
  noise = (-0.5, 0.4, 0.3, -0.2)  # seed noise as large as the gap
  groups = groups_of(*write_e7(tmp_path, 203.6, 203.6, 203.2, noise))
  found, _, _ = roles.e7_roles(groups)
  result = criteria.e7_steps_vs_capacity(found["e7a"], found["e7b"], found["e7c"])
  low, high = welch_ci([203.2 + e for e in noise], [203.6 + e for e in noise])
  assert low < 0 < high  # precondition: scipy's interval includes 0
  assert result["capacity_effect"]["verdict"] == "not distinguishable"


def test_e7_single_seed_cannot_be_decided(tmp_path):
  groups = groups_of(*write_e7(tmp_path, 203.6, 203.6, 203.2, noise=(0.0,)))
  found, _, _ = roles.e7_roles(groups)
  result = criteria.e7_steps_vs_capacity(found["e7a"], found["e7b"], found["e7c"])
  assert result["capacity_effect"]["verdict"] == "cannot be decided (single seed: no interval)"
  assert result["capacity_effect"]["difference"].estimate == pytest.approx(-0.4, abs=1e-9)
  interpretation = result["interpretation"]
  assert interpretation["outcome"] == "undecided"
  assert interpretation["text"].startswith("cannot be decided: single seed")
  assert "neither improves" in interpretation["text"]


def test_e7_missing_role_is_skipped(tmp_path):
  paths = write_e7(tmp_path, 200.0, 180.0, 199.0)
  groups = [g for g in groups_of(*paths) if g.name != "e7c"]
  found, _, missing = roles.e7_roles(groups)
  result = criteria.e7_steps_vs_capacity(found["e7a"], found["e7b"], found["e7c"],
                                         missing=missing)
  assert result["capacity_effect"]["verdict"] == "skipped"
  assert "no run named e7c" in result["capacity_effect"]["reason"]
  assert result["interpretation"]["outcome"] == "incomplete"


def test_planted_one_over_n_bias_does_not_move_best_step(tmp_path):
  # True FID 203.6 at 2k rising by 0.3 per milestone to 204.8 at 10k. Planted bias c / N with
  # c = 40000: +4.0 on the 10k-sample milestones, +0.8 on the 50k-sample final FID. The final
  # FID (205.6) is below every milestone (>= 207.6), so a minimum over both would put the best
  # at 10k, the end; over the milestones alone it is at 2k, where the true curve has it.
  true = {2000: 203.6, 4000: 203.9, 6000: 204.2, 8000: 204.5, 10000: 204.8}
  records = [{"step": s, MILESTONE: f + 40000 / 10_000} for s, f in true.items()]
  records.append({"step": 10_000, FINAL: true[10_000] + 40000 / 50_000})
  config = make_config("e7a", 1077)
  config["eval"] = dict(fid_num_samples=10_000, final_fid_num_samples=50_000)
  run = analysis.load_run(write_run(tmp_path, "e7a", records, config))
  best = criteria.best_fid(run)
  assert (best["step"], best["best_fid"], best["num_evaluations"]) == (2000, 207.6, 5)
  bias = criteria.fid_bias(run)
  # (208.8 - 205.6) / (1e-4 - 2e-5) = 40000 exactly, up to float round-off (~1e-12).
  assert bias["slope"] == pytest.approx(40000.0, rel=1e-9)
  assert bias["bias_at_milestone_samples"] == pytest.approx(4.0, rel=1e-9)
  assert bias["bias_at_final_samples"] == pytest.approx(0.8, rel=1e-9)
  assert bias["fid_at_infinite_samples"] == pytest.approx(204.8, rel=1e-9)


def test_fid_bias_needs_both_evaluations_at_one_step(tmp_path):
  records = [{"step": 8000, MILESTONE: 210.0}, {"step": 10_000, FINAL: 205.0}]
  run = analysis.load_run(write_run(tmp_path, "r", records, make_config("r")))
  result = criteria.guarded(criteria.fid_bias, run)
  assert result["verdict"] == "skipped" and "no milestone FID at step 10000" in result["reason"]


def write_e7_prefix(root, seeds, later):
  """E7a (10k) and E7b (50k) sharing `seeds`; E7b repeats E7a's milestones up to 10k and then
  logs `later` (20 values), as a run that differs only in length does."""
  paths = []
  for i, seed in enumerate(seeds):
    first = [210.0 + 0.1 * i, 211.0, 212.0, 213.0, 214.0]
    a = [{"step": 2000 * (i + 1), MILESTONE: f} for i, f in enumerate(first)]
    b = a + [{"step": 12_000 + 2000 * i, MILESTONE: f} for i, f in enumerate(later)]
    paths.append(write_run(root, f"e7a_s{seed}", a, make_config("e7a", seed)))
    paths.append(write_run(root, f"e7b_s{seed}", b, make_config("e7b", seed, total_steps=50_000)))
  return groups_of(*paths)


def test_e7_steps_effect_at_matched_milestones_and_whole_run_counts(tmp_path):
  # E7b's 20 later milestones scatter below E7a's whole run (down to 205). Over the whole
  # run E7b's minimum is over 25 evaluations against E7a's 5; at matched milestones (<= 10k)
  # both are over the same 5, which here are the same numbers: the runs coincide.
  later = [209.0 - 0.2 * i for i in range(20)]
  groups = write_e7_prefix(tmp_path, (1077, 1078, 1079, 1080), later)
  found, _, _ = roles.e7_roles(groups)
  result = criteria.e7_steps_vs_capacity(found["e7a"], found["e7b"], found["e7c"])
  matched = result["steps_effect"]
  assert matched["matched"] and matched["max_step"] == 10_000
  assert matched["num_evaluations"] == {"reference": [5] * 4, "variant": [5] * 4}
  assert matched["milestones"]["steps"] == [2000, 4000, 6000, 8000, 10000]
  assert matched["milestones"]["coincide"]
  assert matched["pairing"]["paired"]
  # Paired differences all 0: the sign-flip test cannot reject (every pattern ties): p = 1.
  assert matched["difference"].estimate == 0.0 and matched["difference"].p_value == 1.0
  assert matched["verdict"] == "not distinguishable"
  whole = result["steps_effect_over_run"]
  assert not whole["matched"]
  assert whole["num_evaluations"] == {"reference": [5] * 4, "variant": [25] * 4}
  assert whole["difference"].estimate == pytest.approx(later[-1] - np.mean(
      [210.0 + 0.1 * i for i in range(4)]), abs=1e-9)
  text = analysis.write_report(analysis.load_runs(
      [r.path for g in groups for r in g.runs]), tmp_path / "out").read_text()
  assert "minimum over 25 milestone(s) for e7b and 5 for e7a" in text
  assert "these are the same numbers" in text.lower()


def test_e7_zero_variance_pair_says_no_spread(tmp_path):
  # Every seed of each group has the same best FID: no spread, so no interval and no test.
  groups = groups_of(*write_e7(tmp_path, 203.6, 203.6, 203.2, noise=(0.0, 0.0, 0.0)))
  found, _, _ = roles.e7_roles(groups)
  result = criteria.e7_steps_vs_capacity(found["e7a"], found["e7b"], found["e7c"])
  message = "no spread: 3 and 3 runs, identical values in each group"
  assert result["capacity_effect"]["difference"].method == message
  assert result["capacity_effect"]["verdict"] == f"cannot be decided ({message})"
  assert result["best_fid"]["e7a"]["best_fid"].method == "no spread: 3 runs, identical values"
  assert result["interpretation"]["text"].startswith(f"cannot be decided: {message}")


# --------------------------------------------------------------------------- association


def test_association_pairs_use_last_curvature_at_or_before_milestone(tmp_path):
  paths = []
  for i, offset in enumerate((0.0, 50.0)):
    steps = np.arange(100, 10001, 100)
    curvature = 1000.0 - 0.05 * steps + offset
    records = series_records(CURV, steps, curvature)
    for m in (2050, 4050, 6050, 8050):
      # Planted: FID = 300 - 0.1 * curvature at step m - 50, exactly linear and decreasing.
      records.append({"step": m, MILESTONE: 300.0 - 0.1 * (1000.0 - 0.05 * (m - 50) + offset)})
    paths.append(write_run(tmp_path, f"r{i}", records, make_config(f"r{i}", i)))
  result = criteria.curvature_fid_association(analysis.load_runs(paths))
  assert result["n"] == 8
  assert [p["curvature_step"] for p in result["pairs"][:4]] == [2000, 4000, 6000, 8000]
  assert result["measures"]["pearson"].estimate == pytest.approx(-1.0, abs=1e-9)
  assert result["measures"]["spearman"].estimate == pytest.approx(-1.0, abs=1e-12)
  assert result["readings"]["pearson"] == "negative"
  assert result["warnings"] == ["only n = 8 milestone pairs (< 10): the intervals are "
                                "approximate and wide"]


def test_association_matches_scipy_on_noisy_pairs(tmp_path):
  rng = np.random.default_rng(11)
  paths, curv, fid = [], [], []
  for i in range(3):
    records = []
    for m in range(1000, 12001, 1000):
      c, f = 500.0 - 0.02 * m + rng.normal(0, 20), 200 + 0.0005 * m + rng.normal(0, 1)
      curv.append(c)
      fid.append(f)
      records += [{"step": m, CURV: c}, {"step": m, MILESTONE: f}]
    paths.append(write_run(tmp_path, f"r{i}", records, make_config(f"r{i}", i)))
  result = criteria.curvature_fid_association(analysis.load_runs(paths))
  assert result["n"] == 36 and not result["warnings"]
  assert result["measures"]["spearman"].estimate == pytest.approx(
      sps.spearmanr(curv, fid).statistic, abs=TOL)
  ci = sps.pearsonr(curv, fid).confidence_interval(0.95)
  assert (result["measures"]["pearson"].low, result["measures"]["pearson"].high) == \
      pytest.approx((ci.low, ci.high), abs=1e-7)


def test_association_with_too_few_pairs_is_skipped(tmp_path):
  path = write_run(tmp_path, "r", [{"step": 100, CURV: 1.0}, {"step": 100, MILESTONE: 200.0}],
                   make_config("r"))
  result = criteria.guarded(criteria.curvature_fid_association, [analysis.load_run(path)])
  assert result["verdict"] == "skipped"
  assert "(ema 0, raw 0, mismatched 1;" in result["reason"]


EMA_REF = "curvature/ema/ref/hutch_trace_mean"
RAW_FID = "val/fid_milestone_raw/fid"


def test_association_pairs_matched_parameters(tmp_path):
  # Planted: EMA curvature falls with step while EMA FID rises (exactly linear: r = -1); raw
  # curvature and raw FID both fall (r = +1). Matched parameters give the EMA reading on top
  # and the raw one beside it; the mismatched pairing is not used.
  paths = []
  for i in range(2):
    steps = np.arange(100, 10001, 100)
    records = (series_records(REF, steps, 900.0 - 0.05 * steps + i)
               + series_records(EMA_REF, steps, 800.0 - 0.04 * steps + i))
    for m in (2000, 4000, 6000, 8000, 10000):
      records.append({"step": m, MILESTONE: 750.0 - 0.5 * (800.0 - 0.04 * m + i),
                      RAW_FID: 100.0 + 0.2 * (900.0 - 0.05 * m + i)})
    paths.append(write_run(tmp_path, f"r{i}", records,
                           make_config(f"r{i}", i, weighting="minsnr")))
  result = criteria.curvature_fid_association(analysis.load_runs(paths))
  assert result["parameters"] == "ema" and result["n"] == 10
  assert {p["key"] for p in result["pairs"]} == {EMA_REF}
  assert {p["fid_key"] for p in result["pairs"]} == {MILESTONE}
  assert result["measures"]["pearson"].estimate == pytest.approx(-1.0, abs=1e-9)
  raw = result["by_parameters"]["raw"]
  assert raw["measures"]["pearson"].estimate == pytest.approx(1.0, abs=1e-9)
  assert all("different parameters" not in n for n in result["notes"])


def test_association_falls_back_to_mismatched_pairs_with_a_note(tmp_path):
  steps = np.arange(100, 10001, 100)
  records = series_records(CURV, steps, 1000.0 - 0.05 * steps)
  records += [{"step": m, MILESTONE: 200.0 + m / 1000} for m in range(2000, 10001, 2000)]
  config = make_config("r")
  config["train"]["ema_decay"] = 0.999
  result = criteria.curvature_fid_association(
      [analysis.load_run(write_run(tmp_path, "r", records, config))])
  assert result["parameters"] == "mismatched"
  assert "999 steps at decay 0.999" in result["notes"][0]
  assert result["by_parameters"]["ema"]["verdict"] == "skipped"


# --------------------------------------------------------------------------- yardsticks


def test_ema_init_weight_by_hand():
  # No warm-up: 0.999^s; the 13.5% at 2k and 1.8% at 4k.
  got = yardsticks.ema_init_weight([0, 2000, 4000], 0.999, warmup=False)
  assert got == pytest.approx([1.0, 0.999 ** 2000, 0.999 ** 4000], rel=1e-9)
  assert (round(got[1], 3), round(got[2], 3)) == (0.135, 0.018)
  # Warm-up: prod_{t<s} (1 + t)/(10 + t) = s! 9! / (s + 9)! while that ratio is below d
  # (t < 8991 at d = 0.999). Compared in logs (lgamma): round-off ~1e-12 relative.
  s = np.array([1, 100, 1000])
  closed = np.exp([math.lgamma(n + 1) + math.lgamma(10) - math.lgamma(n + 10) for n in s])
  assert yardsticks.ema_init_weight(s, 0.999, warmup=True) == pytest.approx(closed, rel=1e-9)
  assert yardsticks.ema_decays(0.999, True, 9000)[[0, 8990, 8999 - 1]] == pytest.approx(
      [0.1, 8991 / 9000, 0.999], abs=1e-12)


def test_weighting_effect_of_minsnr5_with_eps_and_linear_betas():
  # Reference from the formulas: SNR = ab / (1 - ab) with ab = cumprod(1 - linspace(1e-4,
  # 0.02, 1000)); Min-SNR-5's eps weight min(SNR, 5)/SNR is below 1 exactly where SNR > 5.
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  snr = ab / (1 - ab)
  config = make_config("e6", weighting="minsnr")
  got = yardsticks.weighting_effect(config)
  assert got["changed_timesteps"] == int(np.sum(snr > 5)) == 130
  assert got["changed_below_t"] == 130 and got["fraction_changed"] == 0.13
  assert got["weight_at_t0"] == pytest.approx(5 / snr[0], rel=1e-9)  # 5 / 9999
  assert yardsticks.weighting_effect(make_config("e5"))["changed_timesteps"] == 0


def test_training_budget_against_ddpm():
  config = make_config("e5")
  config["data"] = dict(name="cifar10", split="train", path="")
  got = yardsticks.training_budget(config, 10_000)
  assert got["images_seen"] == 40_000
  assert got["fraction_of_reference"] == pytest.approx(40_000 / (800_000 * 128), abs=1e-15)
  assert got["epochs"] == pytest.approx(0.8, abs=1e-12)


# --------------------------------------------------------------------------- report and CLI


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("loss_vs_step.png", "curvature_vs_step.png", "fid_vs_step.png",
           "fid_vs_wall_time.png", "sample_grids.png", "curvature_vs_fid.png")


def full_study(root):
  """E5/E6 single seeds plus E7a/b/c with two seeds each, all with loss and sample grids."""
  b, t = write_e6_pair(root)
  paths = [b, t] + write_e7(root, 200.0, 199.0, 198.0, noise=(-0.2, 0.2))
  rng = np.random.default_rng(0)
  for path in paths:
    run = analysis.load_run(path)
    total = run.total_steps
    steps = np.arange(total // 50, total + 1, total // 50)
    loss = 0.05 + np.exp(-steps / total * 5) + rng.uniform(0, 0.02, steps.size)
    curv = 300 + 500 * np.exp(-steps / total * 3)
    with open(path / "metrics.jsonl", "a") as f:
      for s, l, c in zip(steps, loss, curv):
        f.write(json.dumps({"step": int(s), "wall_time": float(s), "train/loss": float(l)}) + "\n")
        if not run.has(CURV):
          f.write(json.dumps({"step": int(s), CURV: float(c),
                              "curvature/hutch_trace_std": 30.0}) + "\n")
    (path / "samples").mkdir()
    matplotlib.image.imsave(path / "samples" / f"step_{total:06d}.png", rng.random((34, 34, 3)))
  return paths


def test_report_renders_figures_markdown_and_strict_json(tmp_path):
  paths = full_study(tmp_path / "runs")
  out = tmp_path / "report"
  report_path = analysis.write_report(analysis.load_runs(paths), out)
  for name in FIGURES:
    data = (out / name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
  text = report_path.read_text()
  for heading in ("## E6 vs E5", "(a) mean curvature", "(b) detrended spikes",
                  "(b, literal) the seeds' spike count, level-sensitive", "(c) final FID",
                  "## Why is FID ~ 200? The numbers",
                  "Reference objective", "## E7: steps vs capacity", "**Interpretation:",
                  "## Curvature-FID association", "![FID vs wall time](fid_vs_wall_time.png)"):
    assert heading in text, heading
  assert "steps 6000-10000" in text and "steps 2000-10000" in text
  assert "step grids differ" in text  # E7b (50k) logs on a different grid than E7a
  payload = json.loads((out / "criteria.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
  mean_change = payload["criteria"]["e6_vs_e5"]["train_objective"]["mean_change"]
  assert mean_change["relative_change"]["estimate"] == pytest.approx(-0.2, abs=TOL)
  assert payload["criteria"]["e7"]["best_fid"]["e7a"]["seeds"] == 2


def test_report_why_fid_section_numbers(tmp_path):
  # E5/E6 at the seeds' settings (linear betas, T = 1000, eps, EMA 0.999 without warm-up,
  # batch 4, CIFAR-10 train) with milestones every 2000 steps to 10k.
  paths = []
  for name, weighting in (("e5", "constant"), ("e6", "minsnr")):
    config = make_config(name, 1077, weighting)
    config["data"] = dict(name="cifar10", split="train", path="")
    config["eval"] = dict(fid_num_samples=10_000, final_fid_num_samples=50_000)
    records = [{"step": s, MILESTONE: 210.0 - s / 1000} for s in range(2000, 10001, 2000)]
    records.append({"step": 10_000, FINAL: 198.0})
    paths.append(write_run(tmp_path, name, records, config))
  text = analysis.write_report(analysis.load_runs(paths), tmp_path / "out").read_text()
  why = text[text.index("## Why is FID ~ 200?"):text.index("# Figures")]
  assert "10,000 steps x batch 4 = 40,000 images seen: 0.039% of DDPM" in why
  assert "0.80 epochs of the 50,000 training images" in why
  assert "2000: 13.5%; 4000: 1.8%" in why and "Above 5% at step(s) 2000" in why
  assert "weight != 1 at 130 of 1000 timesteps (13.0%), all t < 130" in why
  assert "constant: every timestep has weight 1" in why
  # Bias: (200 - 198) / (1e-4 - 2e-5) = 25000, so 2.5 on milestones and 0.5 on the final FID.
  assert "milestone FIDs sit about 2.5 above" in why and "final FIDs about 0.5" in why
  payload = json.loads((tmp_path / "out" / "criteria.json").read_text())
  assert payload["fid_context"][1]["weighting"]["changed_timesteps"] == 130


def test_report_different_step_grids_say_so(tmp_path):
  steps, base, treat = planted_e6_curvature(10_000)
  b = write_run(tmp_path, "e5", series_records(CURV, steps, base), make_config("e5"))
  fine = np.arange(50, 10001, 50)
  t = write_run(tmp_path, "e6", series_records(CURV, fine, np.interp(fine, steps, treat)),
                make_config("e6", weighting="minsnr"))
  result = criteria.e6_vs_e5(*groups_of(b, t))
  spikes = result["train_objective"]["spikes"]
  assert [r["points"] for r in spikes["per_run"]["treatment"]] == [161]  # its own points
  assert spikes["measure"] == "fraction" and "different numbers of points" in spikes["note"]
  notes = analysis.report.step_grid_notes(analysis.load_runs([b, t]))
  assert len(notes) == 1 and notes[0].startswith(f"step grids differ for `{CURV}`")


def test_curvature_figure_with_reference_objective_only(tmp_path):
  # curvature.objective="reference" logs only curvature/ref/...; the figure must still draw.
  steps = np.arange(100, 1001, 100)
  path = write_run(tmp_path, "r", series_records(REF, steps, 1000.0 / steps), make_config("r"))
  groups = groups_of(path)
  out = analysis.plots.plot_curvature(groups, analysis.plots.group_colors(groups),
                                      tmp_path / "c.png")
  assert out is not None and out.read_bytes().startswith(PNG_MAGIC)


def test_unreadable_sample_grid_does_not_stop_the_figure(tmp_path):
  path = write_run(tmp_path, "r", [{"step": 10, "a": 1.0}], make_config("r"), grid_steps=(10,))
  (path / "samples" / "step_000020.png").write_bytes(PNG_MAGIC + b"cut off")
  out = analysis.plots.plot_sample_grids(groups_of(path), tmp_path / "grids.png")
  assert out.read_bytes().startswith(PNG_MAGIC)


def run_cli(*args):
  """`python -m diffdyn.analysis ARGS` in a fresh process: the real entry point."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "diffdyn.analysis", *map(str, args)],
                        cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def run_cli_here(*args):
  """The same `main` in this process (argparse's usage errors included): (status, out, err)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      status = cli.main([str(a) for a in args])
    except SystemExit as e:
      status = e.code
  return status, out.getvalue(), err.getvalue()


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
  good = write_run(tmp_path, "good", [{"step": 1, "a": 1.0}], make_config("good"))
  bad = write_run(tmp_path, "bad", [{"step": 1, "a": 1.0}], make_config("bad"),
                  tail="not json\n{\"step\": 2}\n")
  proc = run_cli("report", good, bad, "--out", tmp_path / "out")
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [f"error: {bad / 'metrics.jsonl'}:2: not valid JSON: "
                                      "Expecting value at column 1"]
  status, _, err = run_cli_here("report", tmp_path / "absent", "--out", tmp_path / "out")
  assert status == 2 and len(err.splitlines()) == 1
  assert str(tmp_path / "absent") in err
  status, _, err = run_cli_here("report", good)  # --out missing: a usage error, also one line
  assert status == 2 and len(err.splitlines()) == 1
  (tmp_path / "a_file").write_text("")
  status, _, err = run_cli_here("report", good, "--out", tmp_path / "a_file")
  assert status == 2
  assert err.splitlines() == [f"error: cannot write the report: {tmp_path / 'a_file'}: "
                              "File exists"]


def test_cli_report_prints_windows_and_writes_files(tmp_path):
  b, t = write_e6_pair(tmp_path, total=1000)
  status, stdout, err = run_cli_here("report", b, t, "--out", tmp_path / "out",
                                     "--late-window", "0.5", "1.0", "--spike-k", "5",
                                     "--spike-median-window", "7")
  assert status == 0, err
  options = json.loads((tmp_path / "out" / "criteria.json").read_text())["options"]
  assert (options["spike_k"], options["spike_median_window"]) == (5.0, 7)
  text = (tmp_path / "out" / "report.md").read_text()
  assert "k = 5 noise SDs above the run's own rolling median over 7 logged points" in text
  status, _, err = run_cli_here("report", b, t, "--out", tmp_path / "out2",
                                "--spike-median-window", "4")
  assert status == 2
  assert err.splitlines() == ["error: spike_median_window must be an odd integer >= 3, got 4"]
  assert "late window for e5 seed 1077: steps 500-1000" in stdout
  assert "spike window for e6 seed 1077: steps 200-1000" in stdout
  assert (tmp_path / "out" / "report.md").is_file()
  assert (tmp_path / "out" / "criteria.json").is_file()


# --------------------------------------------------------------------------- curvature in detail

# Planted per-block shares of the total trace (each partition adds up to 1).
STAGE_SHARES = {"stem": 0.1, "down0": 0.3, "mid": 0.2, "up0": 0.3, "head": 0.1}
KIND_SHARES = {"conv": 0.7, "attention": 0.1, "norm": 0.2}
LR = 1e-4
THRESHOLD = 38.0 / LR   # 2 (1 + 0.9) / ((1 - 0.9) lr), Adam's stability threshold at b1 = 0.9
DETAIL_TOTAL = 200
DENSITY_STEPS = (50, 100, 150, 200)


def gaussian(x, mu, sigma):
  return np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def planted_density(step):
  """A two-node density per step: bulk at 0 (weight 0.99) and an outlier at step/10."""
  nodes = np.array([[0.0, step / 10.0]])
  weights = np.array([[0.99, 0.01]])
  sigma = 0.01 * step / 10.0
  grid = np.linspace(-5 * sigma, step / 10.0 + 5 * sigma, 256)
  density = (0.99 * gaussian(grid, 0.0, sigma) + 0.01 * gaussian(grid, step / 10.0, sigma))
  return dict(nodes=nodes, weights=weights, grid=grid, density=density, sigma=np.array(sigma))


def curvature_records(hessian=100.0, ggn_fraction=0.6, ema_factor=0.9, sharpness=1000.0,
                      threshold=None, blocks=True, ggn=True, precond=True, ema=True):
  """Every curvature key the probe logs, each constant over the steps except the sharpness,
  which is sharpness * (1 + i) at the i-th precond step (every 50)."""
  records = []
  for step in range(10, DETAIL_TOTAL + 1, 10):
    r = {"step": step, "wall_time": float(step)}
    params = [("curvature/", hessian)] + ([("curvature/ema/", ema_factor * hessian)] if ema else [])
    for head, h in params:
      for prefix in (head, head + "ref/"):
        r[prefix + "hutch_trace_mean"] = h
        r[prefix + "hutch_trace_stderr"] = 2.0
        if ggn:
          r[prefix + "ggn_trace_mean"] = ggn_fraction * h
          r[prefix + "ggn_trace_stderr"] = 1.0
        if blocks:
          r[prefix + "trace_per_param"] = h / 1000.0
          for partition, shares in (("stage", STAGE_SHARES), ("kind", KIND_SHARES)):
            for name, share in shares.items():
              r[f"{prefix}block/{partition}/{name}/hutch_trace_mean"] = share * h
              r[f"{prefix}block/{partition}/{name}/hutch_trace_stderr"] = 0.5
          for stage in ("up0", "up1", "down0"):
            r[prefix + f"block/gn_fed/{stage}/hutch_trace_mean"] = 0.05 * h
            r[prefix + f"block/gn_fed/{stage}/normalized_trace"] = 7.0
            r[prefix + f"block/gn_fed/{stage}/normalized_trace_stderr"] = 0.5
    if precond and step % 50 == 0:
      for prefix in ("curvature/", "curvature/ref/"):
        r[prefix + "precond_sharpness"] = sharpness * step / 50
        r[prefix + "precond_threshold"] = THRESHOLD if threshold is None else threshold(step)
    records.append(r)
  return records


def write_curvature_run(root, name, seed, weighting, density=True, **kwargs):
  config = make_config(name, seed, weighting, total_steps=DETAIL_TOTAL)
  config["train"].update(learning_rate=LR, adam_b1=0.9)
  path = write_run(root, f"{name}_seed{seed}", curvature_records(**kwargs), config)
  if density:
    (path / "curvature_density").mkdir()
    for step in DENSITY_STEPS:
      arrays = {f"{o}_{k}": v for o in ("train", "ref") for k, v in planted_density(step).items()}
      np.savez(path / "curvature_density" / f"step_{step:06d}.npz", **arrays)
  return path


def curvature_study(root, **kwargs):
  """E5 (constant) and E6 (Min-SNR) with two shared seeds each, every curvature key logged."""
  return [write_curvature_run(root, name, seed, weighting, **kwargs)
          for name, weighting in (("e5", "constant"), ("e6", "minsnr")) for seed in (1077, 1078)]


DETAIL_FIGURES = ("blocks_by_stage", "blocks_by_kind", "gn_fed_normalized", "ggn_vs_hessian",
                  "trace_per_param", "precond_sharpness", "spectral_density", "ema_vs_raw")


def test_curvature_detail_figures_render_with_captions(tmp_path):
  out = tmp_path / "report"
  text = analysis.write_report(analysis.load_runs(curvature_study(tmp_path / "runs")),
                               out).read_text()
  payload = json.loads((out / "criteria.json").read_text())
  for name in DETAIL_FIGURES:
    file_name = f"e6_vs_e5_{name}.png"
    data = (out / file_name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, file_name
    assert f"]({file_name})" in text and file_name in payload["figures"]
  assert "# Curvature in detail" in text and "## E6 vs E5 (e6 vs e5)" in text
  for key in ("`curvature/ref/block/stage/<stage>/hutch_trace_mean`", "`curvature/ggn_trace_mean`",
              "`curvature/precond_threshold`", "`curvature_density/step_XXXXXX.npz`",
              "`curvature/ema/hutch_trace_mean`", "`curvature/trace_per_param`"):
    assert key in text, key
  assert not [n for n in payload["notes"] if "not drawn" in n]


def test_curvature_detail_figures_skipped_with_a_note_when_keys_are_absent(tmp_path):
  paths = curvature_study(tmp_path / "runs", density=False, blocks=False, ggn=False,
                          precond=False, ema=False)
  out = tmp_path / "report"
  text = analysis.write_report(analysis.load_runs(paths), out).read_text()
  for name in DETAIL_FIGURES:
    assert not (out / f"e6_vs_e5_{name}.png").exists(), name
  for reason in ("e6_vs_e5_blocks_by_stage.png (E6 vs E5 (e6 vs e5)) not drawn: no per-block "
                 "traces logged (curvature.blocks=True)",
                 "e6_vs_e5_ggn_vs_hessian.png (E6 vs E5 (e6 vs e5)) not drawn: no "
                 "`curvature/ggn_trace_mean` logged (curvature.ggn=True)",
                 "not drawn: no `curvature/precond_sharpness` logged",
                 "not drawn: no curvature_density/*.npz files",
                 "not drawn: no EMA curvature logged (curvature.params='ema' or 'both')"):
    assert reason in text, reason
  # The curvature itself was logged, so the trace figure and the section are still there.
  assert (out / "curvature_vs_step.png").is_file() and "# Curvature in detail" in text


def test_precond_threshold_line_is_the_planted_threshold(tmp_path):
  paths = curvature_study(tmp_path, density=False)
  lines = analysis.plots.precond_threshold_lines(groups_of(*paths))
  assert [name for name, _, _ in lines] == ["e5", "e6"]
  for _, steps, values in lines:
    assert steps.tolist() == [50, 100, 150, 200]
    np.testing.assert_allclose(values, 380_000.0, rtol=1e-12)   # 38 / 1e-4
  group = groups_of(*paths)[0]
  assert (analysis.plots._threshold_label(group, lines[0][2])
          == "stability threshold 38/lr = 3.8e+05")


def test_precond_threshold_line_follows_a_warmup(tmp_path):
  # With a linear warm-up over 100 steps the threshold is 38 / (lr min(1, s / 100)).
  warm = lambda s: THRESHOLD / min(1.0, s / 100)
  path = write_curvature_run(tmp_path, "e5", 1, "constant", density=False, threshold=warm)
  [(_, steps, values)] = analysis.plots.precond_threshold_lines(groups_of(path), "curvature/ref/")
  np.testing.assert_allclose(values, [760_000.0, 380_000.0, 380_000.0, 380_000.0], rtol=1e-12)
  assert "follows the learning rate" in analysis.plots._threshold_label(groups_of(path)[0],
                                                                         values)


def test_curvature_detail_numbers_are_the_planted_ratios(tmp_path):
  paths = curvature_study(tmp_path, density=False)
  comparisons = roles.curvature_comparisons(groups_of(*paths))
  assert [c.tag for c in comparisons] == ["e6_vs_e5"]
  result = analysis.curvature_detail.curvature_detail(comparisons, (0.6, 1.0))["e6_vs_e5"]
  base = result["groups"][0]
  assert base["group"] == "e5" and base["seeds"] == 2
  m = base["mean"]
  assert m["ggn_over_hessian"]["train"]["mean"] == pytest.approx(0.6, abs=TOL)
  assert m["ggn_over_hessian"]["reference"]["n"] == 2
  assert m["ema_over_raw"]["reference"]["mean"] == pytest.approx(0.9, abs=TOL)
  assert m["trace_per_param"]["reference"]["mean"] == pytest.approx(0.1, abs=TOL)
  for name, share in STAGE_SHARES.items():
    assert m["stage_share"]["reference"][name]["mean"] == pytest.approx(share, abs=TOL)
  assert list(m["stage_share"]["reference"]) == ["stem", "down0", "mid", "up0", "head"]
  assert list(m["kind_share"]["train"]) == ["conv", "attention", "norm"]
  # Blocks in the network's order: the up path from the deepest level back to level 0.
  assert analysis.curvature_detail.block_names(
      analysis.load_runs(paths), "curvature/ref/", "gn_fed") == ["down0", "up1", "up0"]
  # Sharpness 1000 x (1, 2, 3, 4) at steps 50...200: the largest ratio is 4000 / 380000 at 200.
  edge = base["per_run"][0]["precond"]["train"]
  assert edge["max_step"] == 200 and edge["points"] == 4
  assert edge["max_ratio"] == pytest.approx(4000.0 / 380_000.0, abs=TOL)
  assert m["precond_max_ratio"]["train"]["mean"] == pytest.approx(4000.0 / 380_000.0, abs=TOL)


def test_curvature_comparisons_follow_the_report_roles(tmp_path):
  paths = curvature_study(tmp_path / "e56", density=False)
  e7 = [write_curvature_run(tmp_path / "e7", name, 1, "constant", density=False)
        for name in ("e7a", "e7b", "e7c")]
  comparisons = roles.curvature_comparisons(groups_of(*paths, *e7))
  assert [(c.tag, [g.name for g in c.groups]) for c in comparisons] == [
      ("e6_vs_e5", ["e5", "e6"]), ("e7c_vs_e7a", ["e7a", "e7c"])]
  only = roles.curvature_comparisons(groups_of(e7[1]))
  assert [(c.tag, [g.name for g in c.groups]) for c in only] == [("runs", ["e7b"])]


def test_density_map_puts_every_step_on_one_grid(tmp_path):
  path = write_curvature_run(tmp_path, "e5", 1, "constant")
  (path / "curvature_density" / "step_000250.npz").write_bytes(b"PK\x03\x04 cut off")
  diverged = {k: np.full_like(v, np.nan) for k, v in planted_density(300).items()}
  np.savez(path / "curvature_density" / "step_000300.npz",
           **{f"ref_{k}": v for k, v in diverged.items()})
  notes = []
  found = analysis.plots.density_map(analysis.load_run(path), "ref", notes)
  assert found["steps"].tolist() == list(DENSITY_STEPS)
  assert len(notes) == 2 and "step_000250.npz: not a readable .npz" in notes[0]
  assert "step_000300.npz: ref_density has no positive value" in notes[1]
  np.testing.assert_allclose(found["largest"], [s / 10 for s in DENSITY_STEPS], rtol=1e-12)
  # The common grid spans every file's grid: from step 200's low end to its high end.
  sigma = 0.01 * 20.0
  assert found["grid"][0] == pytest.approx(-5 * sigma) and found["grid"][-1] == pytest.approx(
      20.0 + 5 * sigma)
  for row, step in enumerate(DENSITY_STEPS):
    s = 0.01 * step / 10
    exact = 0.99 * gaussian(found["grid"], 0.0, s) + 0.01 * gaussian(found["grid"], step / 10, s)
    inside = (found["grid"] >= -5 * s) & (found["grid"] <= step / 10 + 5 * s)
    # Linear interpolation of a Gaussian sampled at spacing h errs by at most
    # h^2/8 max|f''| = h^2/8 x 0.99/(sqrt(2 pi) s^3); h = (step/10 + 10 s)/255.
    h = (step / 10 + 10 * s) / 255
    bound = h ** 2 / 8 * 0.99 / (math.sqrt(2 * math.pi) * s ** 3)
    assert np.max(np.abs(found["density"][row, inside] - exact[inside])) <= bound * 1.001
    assert np.all(found["density"][row, ~inside] == 0.0)   # outside a file's own grid
  assert analysis.plots.density_map(analysis.load_run(path), "ema_ref") is None


def test_density_colour_scale_reaches_down_to_the_outliers(tmp_path):
  path = write_curvature_run(tmp_path, "e5", 1, "constant")
  found = analysis.plots.density_map(analysis.load_run(path), "train")
  low, high = analysis.plots.density_color_range([found])
  # The outlier (weight 0.01 at step/10, sigma 0.01 step/10) is faintest at step 200, sigma 0.2:
  # its density there is 0.01 N(0; 0, 0.2^2), and the scale starts at half of that. The files'
  # own grids, spacing h, bound the interpolation error by h^2/8 max|f''|, with
  # max|f''| = w / (sqrt(2 pi) sigma^3) for a Gaussian of weight w.
  err = lambda h, w, s: h ** 2 / 8 * w / (math.sqrt(2 * math.pi) * s ** 3)
  outlier = 0.01 * gaussian(0.0, 0.0, 0.2)
  assert low == pytest.approx(0.5 * outlier, abs=0.5 * err((20 + 2) / 255, 0.01, 0.2))
  # The peak is step 50's bulk, 0.99 N(0; 0, 0.05^2), its own grid's spacing h = 5.5/255: the
  # interpolant is off by at most err(h), and the common grid (spacing <= h) has a point within
  # h/2 of the peak, where the Gaussian is lower by at most (h/2)^2/2 max|f''| = err(h).
  peak = 0.99 * gaussian(0.0, 0.0, 0.05)
  assert peak - 2 * err(5.5 / 255, 0.99, 0.05) <= high <= peak
  assert high / low > 100   # the outlier is two decades and more below the bulk


def test_e7_curvature_figures_for_single_seeds(tmp_path):
  # E7a and E7c, one seed each: the E7c vs E7a figures, drawn with probe-stderr bands.
  paths = [write_curvature_run(tmp_path, name, 1, "constant", density=False, hessian=h)
           for name, h in (("e7a", 100.0), ("e7c", 300.0))]
  out = tmp_path / "report"
  text = analysis.write_report(analysis.load_runs(paths), out).read_text()
  for name in ("blocks_by_stage", "ggn_vs_hessian", "trace_per_param", "precond_sharpness"):
    assert (out / f"e7c_vs_e7a_{name}.png").read_bytes().startswith(PNG_MAGIC), name
  assert "## E7c vs E7a (e7c vs e7a)" in text
  assert "e7c_vs_e7a_spectral_density.png (E7c vs E7a (e7c vs e7a)) not drawn" in text
  detail = json.loads((out / "criteria.json").read_text())["curvature_detail"]["e7c_vs_e7a"]
  # tr/P planted as H / 1000: 0.1 for E7a and 0.3 for E7c.
  assert [g["mean"]["trace_per_param"]["reference"]["mean"] for g in detail["groups"]] == [
      pytest.approx(0.1, abs=TOL), pytest.approx(0.3, abs=TOL)]
