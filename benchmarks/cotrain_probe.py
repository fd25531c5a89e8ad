"""Co-training probe: does the n-gram branch gain from the unlabelled reviews, labelled by
the finished run's BiLSTM (the other view), and does the served blend gain with it?

    TFDS_DATA_DIR=<prepared tfds folder> .venv/bin/python benchmarks/cotrain_probe.py runs/<name>/<run>/

For the run's own branch and for branches refitted on the training reviews plus the 50,000
unlabelled ones (`ngrams.fit(..., soft=...)`, as `ngrams.cotrain` does), it refits
the blend on validation and prints validation and test accuracy (all test reviews) of the
n-grams alone and served. The BiLSTM is the run's, unchanged.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from pipeline import data as data_mod  # noqa: E402
from pipeline import distill, ngrams  # noqa: E402
from pipeline.run_files import load_run  # noqa: E402
from pipeline.scoring import blend_logit, fit_blend, ngram_logits, score_texts, sigmoid  # noqa: E402


def main(run_dir: Path) -> None:
    cfg, vectorizer, model, branch = load_run(run_dir)
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    train, val, test = (data_mod.decoded(s) for s in (raw.train, raw.validation, raw.test))
    unlabelled = distill.unlabelled_reviews(cfg)
    L = cfg.vectorize.max_length
    t0 = time.time()
    z_u_lstm, z_u_ngram = score_texts(vectorizer, model, unlabelled, L, branch)
    z_v_lstm, _ = score_texts(vectorizer, model, val[0], L)
    z_t_lstm, _ = score_texts(vectorizer, model, test[0], L)
    print(f"scored in {time.time() - t0:.0f}s; BiLSTM val {np.mean((z_v_lstm > 0) == val[1]):.4f} "
          f"test {np.mean((z_t_lstm > 0) == test[1]):.4f}", flush=True)
    teachers = {
        "bilstm": sigmoid(z_u_lstm),
        "served": sigmoid(blend_logit(z_u_lstm, z_u_ngram, branch.blend)),
    }
    arms = [("run's branch", branch), ("refit, training reviews only", ngrams.fit(*train, cfg.ngrams))]
    for name, p in teachers.items():
        t0 = time.time()
        arms.append((f"refit, {name} labels", ngrams.fit(*train, cfg.ngrams, soft=(unlabelled, p))))
        print(f"fitted {name} in {time.time() - t0:.0f}s", flush=True)
    for name, b in arms:
        zv, zt = ngram_logits(b, val[0]), ngram_logits(b, test[0])
        blend = fit_blend(z_v_lstm, zv, val[1])
        served_v = np.mean((blend_logit(z_v_lstm, zv, blend) > 0) == val[1])
        served_t = blend_logit(z_t_lstm, zt, blend)
        print(f"{name}: n-grams val {np.mean((zv > 0) == val[1]):.4f} test {np.mean((zt > 0) == test[1]):.4f}"
              f" | served val {served_v:.4f} test {np.mean((served_t > 0) == test[1]):.4f}"
              f" auc {auc(test[1], served_t):.4f} | blend {tuple(round(v, 3) for v in blend)}", flush=True)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
