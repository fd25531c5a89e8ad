import csv
import json

import pytest
import yaml

from pipeline.data import data_identity
from pipeline.fingerprint import run_fingerprint
from pipeline.runs import latest_finished_run
from tests.helpers import forbid


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
    # every epoch runs: early stopping's patience is as long as the run
    assert len(rows) == cfg.train.epochs == cfg.train.early_stopping_patience and "val_accuracy" in rows[0]
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
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    # The figures of this seeded run: the same to the last digit run after run on a CPU (the 1%
    # leaves room for another CPU's rounding). Separable tiny data: all 40 right, served and alone.
    assert (m["accuracy"], m["auc"], m["loss"]) == (1.0, 1.0, pytest.approx(0.01801, rel=0.01))
    # the served model blends the two parts; each part is scored alone as well
    assert set(m["blend"]) == {"lstm", "ngrams", "intercept"}
    assert (m["lstm"]["accuracy"], m["lstm"]["loss"]) == (1.0, pytest.approx(0.2045, rel=0.01))
    assert (m["ngrams"]["accuracy"], m["ngrams"]["loss"]) == (1.0, pytest.approx(0.01692, rel=0.01))



def test_ngram_branch_sees_training_reviews_only_and_is_fitted_once(trained_run, monkeypatch):
    import numpy as np

    import pipeline.ngrams
    from pipeline.data import decoded, load_raw
    from pipeline.train import ngram_branch

    cfg, result = trained_run
    raw = load_raw(cfg.data, cfg.seed)
    saved = pipeline.ngrams.load(result.run_dir / "ngrams.npz")
    # The vocabulary and idf depend on every review fitted on (idf on their number too):
    # rebuilt from the training split alone, they come out the same.
    train_texts, _ = decoded(raw.train)
    vocabulary, idf = pipeline.ngrams.build_vocabulary(train_texts, cfg.ngrams)
    assert saved.vocabulary == vocabulary and np.array_equal(saved.idf, idf)
    _, all_idf = pipeline.ngrams.build_vocabulary(
        train_texts + decoded(raw.validation)[0] + decoded(raw.test)[0], cfg.ngrams)
    assert not np.array_equal(all_idf[:len(idf)], idf)  # the check can tell the difference
    assert result.metrics["ngrams"]["accuracy"] == 1.0  # separable tiny data: all 40 test reviews

    forbid(monkeypatch, pipeline.ngrams, "fit", "the saved branch should have been reloaded")

    class FinishedRun:
        dir = result.run_dir

    again = ngram_branch(cfg, raw, None, None, FinishedRun())
    assert again.blend == pytest.approx(tuple(result.metrics["blend"].values()))


def test_a_csv_with_string_labels_trains_and_records_their_names(files_run):
    _, result = files_run
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["labels"] == ["bad", "good"]
    assert info["data_sizes"] == {"train": 72, "validation": 24, "test": 24}
    assert result.metrics["confusion_matrix"]["labels"] == ["bad", "good"]
    assert result.metrics["examples"] == 24 and result.metrics["accuracy"] == 1.0  # separable: all 24


@pytest.mark.parametrize("ext", ["tsv", "jsonl"])
def test_each_file_format_trains_end_to_end(tmp_path, ext):
    from pipeline.config import load_config
    from pipeline.train import train
    from tests.helpers import files_overrides, review_rows, write_table

    table = write_table(tmp_path / f"reviews.{ext}", review_rows(60, (0, 1)))
    cfg = load_config(None, files_overrides(table, tmp_path, "train.bucket_by_length=false"))
    result = train(cfg, export=False)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["labels"] == ["0", "1"]
    assert info["data_sizes"] == {"train": 36, "validation": 12, "test": 12}
    assert result.metrics["examples"] == 12


@pytest.mark.slow
def test_a_model_trained_adversarially_serves_end_to_end(imdb_dir, tmp_path):
    from pipeline.config import load_config
    from pipeline.train import train
    from tests.helpers import tiny_overrides

    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path) + ["experimental.adversarial_epsilon=0.05",
                                                                  "train.epochs=3"])
    result = train(cfg)
    # The export is checked against the trained model inside `train`: it serves the same.
    assert result.export is not None and result.export.version == 1
    assert result.metrics["accuracy"] >= 0.8  # the tiny reviews stay separable
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["experimental"] == {
        "adversarial_epsilon": 0.05}
