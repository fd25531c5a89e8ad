import csv
import json

import pytest
import yaml

from pipeline.data import data_identity
from pipeline.runs import latest_finished_run, run_fingerprint


def test_run_directory_holds_everything(trained_run):
    cfg, result = trained_run
    run = result.run_dir
    for name in ("config.yaml", "run.json", "vocabulary.txt", "model.weights.h5", "history.csv",
                 "metrics.json", "curves.png", "export.json", "checkpoints/best.weights.h5",
                 "ngrams.npz"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert 1 <= len(rows) <= cfg.train.epochs and "val_accuracy" in rows[0]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["fingerprint"] == run_fingerprint(cfg, data_identity(cfg.data))
    assert latest_finished_run(cfg) == run


def test_metrics_are_consistent(trained_run):
    _, result = trained_run
    m = json.loads((result.run_dir / "metrics.json").read_text())
    (tn, fp), (fn, tp) = m["confusion_matrix"]["rows_true_cols_pred"]
    assert tn + fp + fn + tp == m["examples"] == 40
    assert abs(m["accuracy"] - (tp + tn) / 40) < 1e-9
    assert m["accuracy"] >= 0.8  # separable tiny data
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["auc"] >= 0.8 and 0.0 < m["loss"] < 0.69  # better than a coin: ln 2 is its loss
    # the served model blends the two parts; each part is scored alone as well
    assert set(m["blend"]) == {"lstm", "ngrams", "intercept"}
    for part in ("lstm", "ngrams"):
        assert 0.5 <= m[part]["accuracy"] <= 1.0 and 0.0 < m[part]["loss"]



def test_ngram_branch_sees_training_reviews_only_and_is_fitted_once(tiny_cfg, monkeypatch):
    import pipeline.ngrams
    from pipeline.data import decoded, load_raw
    from pipeline.train import ngram_branch, train

    seen = []
    fit = pipeline.ngrams.fit
    monkeypatch.setattr(pipeline.ngrams, "fit", lambda texts, *a: seen.append(list(texts)) or fit(texts, *a))
    cfg = tiny_cfg.model_copy(update={"ngrams": tiny_cfg.ngrams.model_copy(update={"enabled": True}),
                                      "train": tiny_cfg.train.model_copy(update={"epochs": 1})})
    result = train(cfg, export=False)
    raw = load_raw(cfg.data, cfg.seed)
    (train_texts, _), (val_texts, _), (test_texts, _) = (decoded(s) for s in (raw.train, raw.validation,
                                                                              raw.test))
    assert len(seen) == 1 and sorted(seen[0]) == sorted(train_texts)
    assert not set(seen[0]) & (set(val_texts) | set(test_texts))
    assert result.metrics["ngrams"]["accuracy"] >= 0.8  # separable tiny data

    class FinishedRun:  # a rerun reloads the saved branch instead of fitting it again
        dir = result.run_dir

    again = ngram_branch(cfg, raw, None, None, FinishedRun())
    assert len(seen) == 1 and again.blend == pytest.approx(tuple(result.metrics["blend"].values()))
