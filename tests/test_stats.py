import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn import metrics as sk
from sklearn.calibration import calibration_curve

from pipeline import stats


def _predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and imperfect probabilities, with ties and the extremes 0 and 1 among them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.25), 0.0, 1.0)
    p[:20] = np.round(p[:20], 1)  # ties
    p[20:25], p[25:30] = 0.0, 1.0
    return y, p


def test_metrics_equal_scikit_learns_on_the_same_predictions():
    y, p = _predictions(2000)
    m = stats.binary_metrics(y, p, resamples=50)
    called = p >= 0.5
    assert m["rows"] == 2000
    assert m["accuracy"]["value"] == sk.accuracy_score(y, called)
    assert m["precision"]["value"] == sk.precision_score(y, called)
    assert m["recall"]["value"] == sk.recall_score(y, called)
    assert m["f1"]["value"] == pytest.approx(sk.f1_score(y, called), abs=1e-12)
    assert m["auc"]["value"] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    assert m["log_loss"]["value"] == pytest.approx(sk.log_loss(y, p), abs=1e-12)
    assert m["brier"]["value"] == pytest.approx(sk.brier_score_loss(y, p), abs=1e-12)
    (tn, fp), (fn, tp) = sk.confusion_matrix(y, called)
    assert m["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert m["precision"]["rows"] == tp + fp and m["recall"]["rows"] == tp + fn
    for key in ("accuracy", "precision", "recall", "f1", "auc", "log_loss", "brier", "ece"):
        low, high = m[key]["interval"]
        assert low <= m[key]["value"] <= high, key


def test_wilson_interval_known_values():
    assert stats.wilson_interval(0, 10) == (0.0, pytest.approx(3.8415 / 13.8415, abs=1e-4))
    low, high = stats.wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / 13.8415, abs=1e-4)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_covers_the_truth_95_in_100_times():
    rng = np.random.default_rng(7)
    truth, n, draws = 0.9, 200, 500
    hits = sum(low <= truth <= high for low, high in
               (stats.wilson_interval(int(k), n) for k in rng.binomial(n, truth, draws)))
    assert 0.93 <= hits / draws <= 0.97


def test_bootstrap_interval_covers_the_truth_95_in_100_times():
    rng = np.random.default_rng(3)
    truth, n, draws = 0.3, 200, 300
    hits = 0
    for seed in range(draws):
        values = rng.random(n) < truth
        low, high = stats.bootstrap_interval(np.mean, values, resamples=400, seed=seed)
        hits += low <= truth <= high
    assert 0.92 <= hits / draws <= 0.97


def test_bootstrap_interval_repeats_with_its_seed_and_skips_undefined_resamples():
    y, p = _predictions(300)
    first = stats.bootstrap_interval(stats.auc, y, p, resamples=200, seed=1)
    assert stats.bootstrap_interval(stats.auc, y, p, resamples=200, seed=1) == first
    assert stats.bootstrap_interval(stats.auc, y, p, resamples=200, seed=2) != first
    one_class = np.ones(50, dtype=int)
    assert np.isnan(stats.bootstrap_interval(stats.auc, one_class, p[:50], resamples=20)).all()


def test_mcnemar_counts_only_the_rows_where_the_two_disagree():
    a = np.array([1] * 50 + [1] * 12 + [0] * 3 + [0] * 35, dtype=bool)
    b = np.array([1] * 50 + [0] * 12 + [1] * 3 + [0] * 35, dtype=bool)
    assert stats.mcnemar_p(a, b) == pytest.approx(binomtest(12, 15, 0.5).pvalue)
    assert stats.mcnemar_p(a, a) == 1.0
    d = stats.paired_difference(a, b, resamples=500)
    assert d["rows"] == 100 and d["a"] == 0.62 and d["b"] == 0.53
    assert d["difference"] == pytest.approx(-0.09)
    assert d["low"] < -0.09 < d["high"] < 0 and d["p"] == stats.mcnemar_p(a, b)


def test_paired_difference_under_no_difference_rarely_calls_one_better():
    rng = np.random.default_rng(11)
    draws, rejected, covered = 300, 0, 0
    for seed in range(draws):  # two models right 80% of the time, independently, on 300 rows
        a, b = rng.random(300) < 0.8, rng.random(300) < 0.8
        d = stats.paired_difference(a, b, resamples=300, seed=seed)
        rejected += d["p"] < 0.05
        covered += d["low"] <= 0.0 <= d["high"]
    assert rejected / draws <= 0.06  # exact McNemar is conservative: at most its 5%, give or take
    assert 0.92 <= covered / draws <= 0.98


def test_reliability_bins_match_scikit_learns_calibration_curve():
    y, p = _predictions(3000, seed=4)
    table = stats.reliability_bins(y, p)
    full = [b for b in table if b["rows"]]
    share, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert [b["positive_rate"] for b in full] == pytest.approx(share.tolist())
    assert [b["mean_probability"] for b in full] == pytest.approx(mean.tolist())
    assert sum(b["rows"] for b in table) == 3000
    assert [(b["low"], b["high"]) for b in table][0] == (0.0, 0.1) and table[-1]["high"] == 1.0


def test_expected_calibration_error_by_hand():
    y = np.array([0, 0, 1, 1, 1, 1])
    p = np.array([0.05, 0.15, 0.15, 0.95, 0.95, 1.0])  # bins 0-0.1, 0.1-0.2 and 0.9-1.0
    gaps = [(1, abs(0.05 - 0)), (2, abs(0.15 - 0.5)), (3, abs((0.95 + 0.95 + 1.0) / 3 - 1))]
    assert stats.expected_calibration_error(y, p) == pytest.approx(sum(n / 6 * g for n, g in gaps))
    assert stats.expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


@pytest.mark.parametrize("metric", ["accuracy", "f1"])
def test_best_threshold_is_the_best_of_every_cut(metric):
    y, p = _predictions(400, seed=5)
    score = {"accuracy": lambda t: np.mean((p >= t) == y), "f1": lambda t: sk.f1_score(y, p >= t)}[metric]
    threshold, value = stats.best_threshold(y, p, metric)
    best = max(score(t) for t in np.unique(p))
    assert value == pytest.approx(best) and score(threshold) == pytest.approx(best)
