import json

import pytest

from pipeline import data as data_mod
from pipeline.run_files import load_run
from pipeline.scoring import evaluate_rows


def test_a_loaded_run_scores_its_test_split_as_the_run_did(trained_run):
    cfg, result = trained_run
    run_cfg, vectorizer, model, ngram = load_run(result.run_dir)
    assert run_cfg == cfg and ngram is not None  # ngrams.enabled: the branch comes back too
    texts, labels = data_mod.decoded(data_mod.load_raw(cfg.data, cfg.seed).test)
    metrics, _ = evaluate_rows(vectorizer, model, texts, labels, cfg.vectorize.max_length, ngram)
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["confusion_matrix"] == saved["confusion_matrix"]
    assert metrics["blend"] == saved["blend"] and metrics["loss"] == pytest.approx(saved["loss"], abs=1e-6)
