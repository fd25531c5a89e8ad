"""How sure a figure is: intervals, paired comparisons, calibration and binary metrics.

NumPy (and SciPy for the exact binomial test) only, no TensorFlow: plain functions of
arrays of labels, probabilities or per-row scores, so evaluation, the release gate and any
later comparison of two models call the same ones. Every resampling takes a seed, so a
figure repeats exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CONFIDENCE = 0.95  # two-sided, for every interval here
BEYOND_NOISE = 0.05  # a difference with a two-sided p below this is called real
RESAMPLES = 1000  # bootstrap resamples: the interval's ends move by well under its width between seeds
SEED = 0
BINS = 10  # equal-width probability bins for calibration
_CHUNK = 20_000_000  # resampled rows held at once (8 bytes each), so 25,000 rows x 1000 fit in memory


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n`; (0, 1) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage near 0 and 1
    (an accuracy of 1.0 on a small slice is not "certain").
    """
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    phat = successes / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _resampled_indices(n: int, resamples: int, seed: int):
    """Row indices of `resamples` bootstrap resamples of n rows, a block of resamples at a time."""
    rng = np.random.default_rng(seed)
    block = max(1, _CHUNK // max(n, 1))
    for start in range(0, resamples, block):
        yield rng.integers(0, n, size=(min(block, resamples - start), n))


def bootstrap_interval(statistic: Callable[..., float], *arrays: np.ndarray,
                       confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*arrays)`, the rows resampled together.

    A resample where the statistic is undefined (NaN, e.g. an AUC with one class) is dropped;
    (nan, nan) if all are.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    values = [statistic(*(a[idx] for a in arrays))
              for block in _resampled_indices(n, resamples, seed) for idx in block]
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact McNemar test: two-sided p that A and B are right equally often on the same rows.

    Only the rows where exactly one of them is right count; under no difference each of those
    is A's or B's with probability 1/2 (a binomial test).
    """
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def p_text(p: float) -> str:
    """`p = 0.031`, `p = 1.9e-06`; below what a float holds, `p < 1e-300`."""
    return f"p = {p:.2g}" if p > 1e-300 else "p < 1e-300"


def paired_difference(scores_a: np.ndarray, scores_b: np.ndarray, confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """B's mean per-row score minus A's on the same rows, with a paired bootstrap interval.

    For 0/1 scores (right or wrong) `p` is the exact McNemar test; otherwise it is the share
    of resampled differences on the other side of zero, doubled (a paired bootstrap test).
    """
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    diff = b - a
    means = np.concatenate([diff[idx].mean(axis=1)
                            for idx in _resampled_indices(len(diff), resamples, seed)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    if np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all():
        p = mcnemar_p(a == 1, b == 1)
    else:
        p = min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0)))
    return {"rows": int(diff.size), "a": float(a.mean()), "b": float(b.mean()),
            "difference": float(diff.mean()), "low": float(low), "high": float(high), "p": float(p)}


# --- binary metrics -----------------------------------------------------------------------------


def confusion(y: np.ndarray, predicted: np.ndarray) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) of 0/1 labels against 0/1 predictions."""
    y, predicted = np.asarray(y, bool), np.asarray(predicted, bool)
    return (int(np.sum(~y & ~predicted)), int(np.sum(~y & predicted)),
            int(np.sum(y & ~predicted)), int(np.sum(y & predicted)))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half, as scikit-learn's); NaN with one class."""
    from scipy.stats import rankdata

    y = np.asarray(y, bool)
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log-likelihood, probabilities clipped as scikit-learn clips them."""
    eps = np.finfo(np.float64).eps
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared distance between the probability and the 0/1 label."""
    return float(np.mean((np.asarray(p, np.float64) - np.asarray(y, np.float64)) ** 2))


def f1(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float:
    _, fp, fn, tp = confusion(y, np.asarray(p) >= threshold)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5, bins: int = BINS,
                   resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Accuracy, precision, recall, F1, AUC, log loss, Brier score, ECE and the confusion
    counts of probabilities `p` of label 1, each with its 95% interval: Wilson for the three
    proportions, a percentile bootstrap of the rows for the rest."""
    y, p = np.asarray(y, np.int64), np.asarray(p, np.float64)
    tn, fp, fn, tp = confusion(y, p >= threshold)

    def proportion(k: int, n: int) -> dict:
        return {"value": k / n if n else 0.0, "interval": list(wilson_interval(k, n)), "rows": n,
                "method": "wilson"}

    def resampled(metric: Callable[..., float]) -> dict:
        interval = bootstrap_interval(metric, y, p, resamples=resamples, seed=seed)
        return {"value": metric(y, p), "interval": list(interval), "rows": int(y.size), "method": "bootstrap"}

    return {
        "rows": int(y.size),
        "accuracy": proportion(tp + tn, int(y.size)),
        "precision": proportion(tp, tp + fp),
        "recall": proportion(tp, tp + fn),
        "f1": resampled(lambda yy, pp: f1(yy, pp, threshold)),
        "auc": resampled(auc),
        "log_loss": resampled(log_loss),
        "brier": resampled(brier),
        "ece": resampled(lambda yy, pp: expected_calibration_error(yy, pp, bins)),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


# --- calibration and thresholds -----------------------------------------------------------------


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per equal-width probability bin: its range, rows, mean probability and share of label 1.

    A probability on an edge goes to the lower bin, as in scikit-learn's `calibration_curve`;
    empty bins are listed with 0 rows and no means.
    """
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    which = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], p, side="left")
    table = []
    for b in range(bins):
        inside = which == b
        rows = int(inside.sum())
        table.append({"low": b / bins, "high": (b + 1) / bins, "rows": rows,
                      "mean_probability": float(p[inside].mean()) if rows else None,
                      "positive_rate": float(y[inside].mean()) if rows else None})
    return table


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> float:
    """Rows-weighted mean gap between a bin's mean probability and its share of label 1."""
    n = len(p)
    return float(sum(b["rows"] / n * abs(b["mean_probability"] - b["positive_rate"])
                     for b in reliability_bins(y, p, bins) if b["rows"])) if n else float("nan")


def best_threshold(y: np.ndarray, p: np.ndarray, metric: str) -> tuple[float, float]:
    """The threshold t (label 1 when p >= t) that maximizes `metric` (accuracy or f1) on these
    rows, and that maximum; ties go to the threshold nearest 0.5."""
    y, p = np.asarray(y, np.int64), np.asarray(p, np.float64)
    candidates = np.unique(np.concatenate([p, [np.inf]]))  # inf: no row is called label 1
    order = np.argsort(p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    # Rows at or above each candidate: counted from the top of the sorted probabilities.
    first = np.searchsorted(p_sorted, candidates, side="left")
    positives_above = np.concatenate([np.cumsum(y_sorted[::-1])[::-1], [0]])[first]
    called = len(p) - first
    tp = positives_above
    fp = called - tp
    fn = int(y.sum()) - tp
    if metric == "accuracy":
        values = (tp + (len(y) - int(y.sum()) - fp)) / len(y)
    elif metric == "f1":
        values = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    else:
        raise ValueError(f"metric: accuracy or f1 (got {metric!r})")
    best = np.flatnonzero(values == values.max())
    pick = best[np.argmin(np.abs(candidates[best] - 0.5))]
    return float(candidates[pick]), float(values[pick])
