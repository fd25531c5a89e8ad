"""Other blends of a finished run's parts, refitted on validation and scored on test: no training.

    TFDS_DATA_DIR=<prepared tfds folder> .venv/bin/python benchmarks/blend_probe.py \
        RUN_DIR [--first-round TEACHER_RUN_DIR] [--sets SETS_DIR]

Each row is a logistic regression over some of the run's logits, fitted on the validation
reviews (as the served blend is), then scored on all test reviews and, with --sets (VADER's
sentences, see outside_imdb.py), on the sets from outside IMDB:
- each part alone (recalibrated), then as served: the BiLSTM and the n-gram branch (the
  run's own blend, refitted);
- with --first-round: the first round's BiLSTM alone, with the run's, and as a third logit;
- fitted on the validation reviews plus two sentence crops of each (`distill.sentence_crops`,
  labelled with their review's label), so the blend also sees short texts;
- the same, length-aware: each logit also enters times log(words), with log(words) itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from outside_imdb import SETS, read_set  # noqa: E402

from pipeline import data as data_mod  # noqa: E402
from pipeline.distill import sentence_crops  # noqa: E402
from pipeline.run_files import load_run  # noqa: E402
from pipeline.scoring import score_texts  # noqa: E402

CROPS = 2  # per validation review


def columns(texts: list[str], run: tuple, first_round: tuple | None) -> np.ndarray:
    """[BiLSTM, n-grams, log(words), first round's BiLSTM?] logits of `texts`."""
    cfg, vectorizer, model, branch = run
    z_lstm, z_ngram = score_texts(vectorizer, model, texts, cfg.vectorize.max_length, branch)
    parts = [z_lstm, z_ngram, np.log([max(1, len(t.split())) for t in texts])]
    if first_round is not None:
        first_cfg, first_vectorizer, first_model, _ = first_round
        parts.append(score_texts(first_vectorizer, first_model, texts, first_cfg.vectorize.max_length)[0])
    return np.stack(parts, axis=1)


# Columns of `columns` each kind of blend reads: 0 BiLSTM, 1 n-grams, 2 log(words), 3 first round's BiLSTM
KINDS = {"BiLSTM": [0], "n-grams": [1], "served": [0, 1], "first round": [3], "two BiLSTMs": [0, 3],
         "two BiLSTMs, n-grams": [0, 1, 3]}


def features(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "length-aware":
        return np.c_[x[:, :2], x[:, 2:3], x[:, :2] * x[:, 2:3]]
    return x[:, KINDS[kind]]


def main(run_dir: Path, first_round_dir: Path | None, sets_dir: Path | None) -> None:
    from sklearn.linear_model import LogisticRegression

    run = load_run(run_dir)
    first = load_run(first_round_dir) if first_round_dir else None
    cfg = run[0]
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    val_texts, val_y = data_mod.decoded(raw.validation)
    crops = sentence_crops(val_texts, CROPS, cfg.seed)
    crop_y = np.repeat(val_y, CROPS)  # every review yields exactly CROPS spans
    test_texts, test_y = data_mod.decoded(raw.test)
    scored = {"IMDB test": (columns(test_texts, run, first), test_y),
              "validation crops": (columns(crops, run, first), crop_y)}
    if sets_dir is not None:
        for name, file in SETS.items():
            texts, y = read_set(sets_dir / file)
            scored[name] = (columns(texts, run, first), y)
    val = columns(val_texts, run, first)
    rows = [("BiLSTM alone", "BiLSTM", val, val_y), ("n-grams alone", "n-grams", val, val_y),
            ("as served", "served", val, val_y)]
    if first is not None:
        rows += [("first round's BiLSTM alone", "first round", val, val_y),
                 ("both BiLSTMs", "two BiLSTMs", val, val_y),
                 ("both BiLSTMs and the n-grams", "two BiLSTMs, n-grams", val, val_y)]
    rows += [("fitted with validation crops", "served", np.r_[val, scored["validation crops"][0]],
              np.r_[val_y, crop_y]),
             ("fitted with crops, length-aware", "length-aware",
              np.r_[val, scored["validation crops"][0]], np.r_[val_y, crop_y])]
    outside = [n for n in scored if n in SETS]
    print("| blend | " + " | ".join(scored) + (" | outside mean |" if outside else " |"))
    print("| --- |" + " --- |" * (len(scored) + bool(outside)))
    for label, kind, x, y in rows:
        fitted = LogisticRegression(max_iter=1000).fit(features(x, kind), y)
        acc = {n: fitted.score(features(xs, kind), ys) for n, (xs, ys) in scored.items()}
        mean = f" {np.mean([acc[n] for n in outside]):.4f} |" if outside else ""
        print(f"| {label} | " + " | ".join(f"{a:.4f}" for a in acc.values()) + " |" + mean)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--first-round", type=Path)
    parser.add_argument("--sets", type=Path)
    args = parser.parse_args()
    main(args.run_dir.resolve(), args.first_round, args.sets)
