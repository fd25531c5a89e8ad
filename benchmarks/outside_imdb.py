"""Finished runs and the linear peer on sentiment sets from outside IMDB.

    TFDS_DATA_DIR=<prepared tfds folder> .venv/bin/python benchmarks/outside_imdb.py \
        SETS_DIR RUN_DIR [RUN_DIR ...]

SETS_DIR is the folder `hutto_ICWSM_2014/` of VADER's human-rated sentences (Hutto & Gilbert,
ICWSM 2014), unpacked from `additional_resources/hutto_ICWSM_2014.tar.gz` of
github.com/cjhutto/vaderSentiment: movie-review snippets (critics' sentences from Rotten
Tomatoes), Amazon product-review sentences, tweets and New York Times editorial sentences, each
with the mean of about 20 raters' scores from -4 to 4. A sentence counts as positive above
+THRESHOLD and negative below -THRESHOLD; the near-neutral ones between are left out.

For each run (its BiLSTM alone, its n-gram branch alone, what it serves) and for the linear
peer (TF-IDF uni+bigrams, logistic regression, fitted on the run's training reviews, as
`make bench` fits it), prints accuracy at 0.5, AUC and the share called positive per set,
then the means, as JSON and (accuracy and AUC) as a markdown table. Nothing here trains the
runs: they are scored as they are.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline import data as data_mod  # noqa: E402
from pipeline.bench import fit_linear_peer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.run_files import load_run  # noqa: E402
from pipeline.runs import CONFIG_FILE  # noqa: E402
from pipeline.scoring import blend_logit, score_texts, sigmoid  # noqa: E402

THRESHOLD = 0.5  # |mean rating| below this: near neutral, not scored
SETS = {"movie critics": "movieReviewSnippets_GroundTruth.txt",
        "Amazon products": "amazonReviewSnippets_GroundTruth.txt",
        "tweets": "tweets_GroundTruth.txt",
        "NYT editorials": "nytEditorialSnippets_GroundTruth.txt"}


def read_set(path: Path) -> tuple[list[str], np.ndarray]:
    """(texts, 0/1 labels) of one ground-truth file: `id <tab> mean rating <tab> text` lines."""
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        rating = float(parts[1])
        if abs(rating) >= THRESHOLD:
            texts.append(parts[2])
            labels.append(int(rating > 0))
    if not texts:
        sys.exit(f"error: {path} has no `id<TAB>rating<TAB>text` lines")
    return texts, np.array(labels)


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    return {"accuracy": round(float(np.mean((probabilities >= 0.5) == labels)), 4),
            "auc": round(float(roc_auc_score(labels, probabilities)), 4),
            # against the set's own share: where a model's "no evidence" point lies
            "called_positive": round(float(np.mean(probabilities >= 0.5)), 3)}


def peer_probabilities(run_dir: Path, sets: dict) -> dict:
    """The linear peer, fitted on the run's training reviews, on every set."""
    cfg = load_config(run_dir / CONFIG_FILE)
    predict = fit_linear_peer(*data_mod.decoded(data_mod.load_raw(cfg.data, cfg.seed).train))
    return {name: predict(texts) for name, (texts, _) in sets.items()}


def run_probabilities(run_dir: Path, sets: dict) -> dict:
    """{part: {set: P(positive)}} for the run's BiLSTM alone, n-gram branch alone and served blend."""
    cfg, vectorizer, model, branch = load_run(run_dir)
    out = {"BiLSTM alone": {}, "n-grams alone": {}, "served": {}}
    for name, (texts, _) in sets.items():
        z_lstm, z_ngram = score_texts(vectorizer, model, texts, cfg.vectorize.max_length, branch)
        out["BiLSTM alone"][name] = sigmoid(z_lstm)
        if branch is not None:
            out["n-grams alone"][name] = sigmoid(z_ngram)
            out["served"][name] = sigmoid(blend_logit(z_lstm, z_ngram, branch.blend))
    return {part: probs for part, probs in out.items() if probs}


def main(sets_dir: Path, run_dirs: list[Path]) -> None:
    missing = [f for f in SETS.values() if not (sets_dir / f).is_file()]
    if missing:
        sys.exit(f"error: {sets_dir} lacks {', '.join(missing)} (see this script's docstring)")
    sets = {name: read_set(sets_dir / f) for name, f in SETS.items()}
    models = {"linear peer": peer_probabilities(run_dirs[0], sets)}
    for run_dir in run_dirs:
        for part, probs in run_probabilities(run_dir, sets).items():
            models[f"{run_dir.name}: {part}"] = probs
    result = {"threshold": THRESHOLD, "sets": {n: {"n": len(y), "positive": round(float(y.mean()), 3)}
                                               for n, (_, y) in sets.items()}, "models": {}}
    for model, probs in models.items():
        per_set = {n: scores(probs[n], sets[n][1]) for n in sets}
        per_set["mean"] = {k: round(float(np.mean([per_set[n][k] for n in sets])), 4)
                           for k in ("accuracy", "auc")}
        result["models"][model] = per_set
    print(json.dumps(result, indent=1))
    columns = [*sets, "mean"]
    print("\n| model | " + " | ".join(f"{c} (n={result['sets'][c]['n']})" if c in sets else c
                                      for c in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for model, per_set in result["models"].items():
        print(f"| {model} | " + " | ".join(f"{per_set[c]['accuracy']:.4f} ({per_set[c]['auc']:.4f})"
                                          for c in columns) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), [Path(p).resolve() for p in sys.argv[2:]])
