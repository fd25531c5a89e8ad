import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import pipeline.export
from pipeline.export import existing_versions
from pipeline.gate import GateRows, gate, refusal
from pipeline.run_files import load_run
from pipeline.scoring import evaluate_rows
from tests.helpers import tiny_overrides


def _reload_here(path, texts):
    """The export check's reload, in this process: the gate tests need not start TensorFlow again."""
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    return sig(text=tf.constant(texts, dtype=tf.string))["probability"].numpy().astype(np.float64)


def _gate_rows(trained_run, model: str) -> GateRows:
    """trained_run's test split as the trained model serves it, or as the worse one does (p = 0.5)."""
    from pipeline import data as data_mod

    cfg, result = trained_run
    texts, labels = data_mod.decoded(data_mod.load_raw(cfg.data, cfg.seed).test)
    if model == "worse":
        return GateRows(texts, labels, np.full(len(texts), 0.5), ("neg", "pos"))
    _, vectorizer, trained, ngram = load_run(result.run_dir)
    _, served = evaluate_rows(vectorizer, trained, texts, labels, cfg.vectorize.max_length, ngram)
    return GateRows(texts, labels, served, ("neg", "pos"))


def _trained_metrics(trained_run) -> tuple[float, int, int]:
    """The trained model's test accuracy and its right negatives and wrong positives (tn, fn)."""
    _, result = trained_run
    m = json.loads((result.run_dir / "metrics.json").read_text())
    (tn, _), (fn, _) = m["confusion_matrix"]["rows_true_cols_pred"]
    return m["accuracy"], tn, fn


def test_gate_passes_a_first_version(trained_run, tmp_path):
    assert gate(tmp_path / "tiny", _gate_rows(trained_run, "worse")) == {"decision": "first", "rows": 40}
    (tmp_path / "tiny" / "1").mkdir(parents=True)  # a folder without a SavedModel is no version
    assert gate(tmp_path / "tiny", _gate_rows(trained_run, "worse"))["decision"] == "first"


@pytest.mark.parametrize("force", [False, True])
def test_gate_refuses_a_worse_model_unless_forced(trained_run, tmp_path, force):
    from scipy.stats import binomtest

    shutil.copytree(trained_run[1].export.path, tmp_path / "tiny" / "1")
    accuracy, tn, fn = _trained_metrics(trained_run)
    record = gate(tmp_path / "tiny", _gate_rows(trained_run, "worse"), force)
    # The worse model calls every review positive: right where the trained one is wrong on a
    # positive (fn), wrong where it is right on a negative (tn).
    assert record["p"] == pytest.approx(binomtest(fn, tn + fn, 0.5).pvalue) and record["p"] < 0.05
    assert record["decision"] == ("forced" if force else "refused")
    assert (record["version"], record["rows"]) == (1, 40)
    assert record["compared_with"] == str(tmp_path / "tiny" / "1")
    assert (record["accuracy"], record["previous_accuracy"]) == (0.5, pytest.approx(accuracy))
    assert record["difference"] == pytest.approx(0.5 - accuracy)
    assert record["interval"][0] < 0.5 - accuracy < record["interval"][1] < 0
    half = (record["interval"][1] - record["interval"][0]) / 2 * 100
    assert refusal(record, 2) == (
        f"not published: version 2 would score 0.5000 (test accuracy) against version 1's {accuracy:.4f}, "
        f"worse by {(accuracy - 0.5) * 100:.2f} ± {half:.2f} points (p = {record['p']:.2g}); "
        "`make export ARGS=--force` publishes this run anyway, without training again")


def test_gate_publishes_a_better_model(trained_run, worse_export, tmp_path):
    shutil.copytree(worse_export, tmp_path / "tiny" / "1")
    accuracy, _, _ = _trained_metrics(trained_run)
    record = gate(tmp_path / "tiny", _gate_rows(trained_run, "trained"))
    assert record["decision"] == "published" and record["p"] < 0.05
    assert (record["accuracy"], record["previous_accuracy"]) == (pytest.approx(accuracy), 0.5)


def _worse_run(trained_run, tmp_path: Path) -> Path:
    """A copy of trained_run's run folder whose weights are zeroed and whose n-gram branch is off."""
    import yaml

    cfg, result = trained_run
    run = tmp_path / "run"
    shutil.copytree(result.run_dir, run, ignore=shutil.ignore_patterns(".lock", "tensorboard", "checkpoints"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["ngrams"]["enabled"] = False
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    _, _, model, _ = load_run(run)
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    model.save_weights(str(run / "model.weights.h5"))
    return run


@pytest.mark.slow  # three exports; the decisions themselves are the fast tests above
def test_export_refused_by_the_gate_is_one_line_and_force_publishes(trained_run, tmp_path, monkeypatch,
                                                                    capsys):
    from pipeline.cli import main

    monkeypatch.setattr(pipeline.export, "reload_predict", _reload_here)
    run = _worse_run(trained_run, tmp_path)
    saved = tmp_path / "saved"
    shutil.copytree(trained_run[1].export.path, saved / "tiny" / "1")
    args = ["export", "--run", str(run), "--set", f"export.dir={saved}"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: not published: version 2 would score 0.5000")
    assert err[0].endswith("`make export ARGS=--force` publishes this run anyway, without training again")
    record = json.loads((run / "export.json").read_text())
    assert (record["path"], record["version"], record["gate"]["decision"]) == (None, None, "refused")
    assert existing_versions(saved / "tiny") == [1]
    assert not [p for p in (saved / "tiny").iterdir() if p.name.startswith(".tmp")]

    assert main([*args, "--force"]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out and "release gate: forced, test accuracy 0.5000 against version 1's " in out
    record = json.loads((run / "export.json").read_text())
    assert record["version"] == 2 and record["gate"]["decision"] == "forced" and record["gate"]["p"] < 0.05
    assert (saved / "tiny" / "2" / "assets.extra" / "labels.txt").read_text() == "neg\npos\n"

    assert main([*args, "--set", "export.gate=false"]) == 0  # the gate off: nothing compared
    assert json.loads((run / "export.json").read_text())["gate"] is None
    assert existing_versions(saved / "tiny") == [1, 2, 3]


@pytest.mark.slow
def test_a_run_refused_by_the_gate_is_finished_and_export_force_publishes_it(trained_run, imdb_dir, tmp_path,
                                                                             monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setattr(pipeline.export, "reload_predict", _reload_here)
    saved = tmp_path / "saved_models"
    shutil.copytree(trained_run[1].export.path, saved / "tiny" / "1")
    # A learning rate too small to move the weights: the new model is its random start.
    overrides = tiny_overrides(imdb_dir, tmp_path) + ["train.epochs=1", "model.learning_rate=1.0e-9"]
    args = [a for item in overrides for a in ("--set", item)]
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: not published: version 2 would score ")
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert json.loads((run / "metrics.json").read_text())["examples"] == 40
    assert json.loads((run / "export.json").read_text())["gate"]["decision"] == "refused"
    assert existing_versions(saved / "tiny") == [1]

    assert main(["export", *args, "--force"]) == 0  # what the message says: no training again
    assert "Epoch" not in capsys.readouterr().out
    assert existing_versions(saved / "tiny") == [1, 2]
    assert json.loads((run / "export.json").read_text())["gate"]["decision"] == "forced"
