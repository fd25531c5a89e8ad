"""pipeline/distill.py: the teacher sees training reviews only, its probabilities are the student's
soft targets, its scores are cached, and a distilling run resumes as an uninterrupted one ends."""

import csv
import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

import pipeline.ngrams
from pipeline import distill
from pipeline.config import load_config
from pipeline.data import decoded, load_raw
from pipeline.rounds import train_rounds
from pipeline.runs import LOCK_FILE
from pipeline.scoring import ngram_logits
from pipeline.train import train
from tests.helpers import StopAt, add_unlabelled, forbid, sigmoid, spy, tiny_overrides, write_aclimdb

N_UNSUP = 60


@pytest.fixture(scope="module")
def unsup_dir(tmp_path_factory) -> Path:
    """The tiny aclImdb folder with unlabelled reviews in train/unsup, as aclImdb ships them."""
    return add_unlabelled(write_aclimdb(tmp_path_factory.mktemp("aclImdb_unsup"), seed=1), N_UNSUP)


def _cfg(root: Path, out: Path, *extra: str):
    return load_config(None, tiny_overrides(root, out) + [
        "distill.enabled=true", f"pretrain.directory={out / 'pretrained'}", *extra])


def test_teacher_and_student_never_see_validation_or_test_text(unsup_dir, tmp_path, monkeypatch):
    cfg = _cfg(unsup_dir, tmp_path, "train.epochs=1", "ngrams.enabled=true")
    fit = spy(monkeypatch, pipeline.ngrams, "fit")
    student = spy(monkeypatch, distill, "student_split")
    result = train(cfg, export=False)

    raw = load_raw(cfg.data, cfg.seed)
    train_texts = decoded(raw.train)[0]
    held_out = set(decoded(raw.validation)[0]) | set(decoded(raw.test)[0])
    assert len(fit.calls) == 1  # the teacher is the served branch too: fitted once
    fitted_texts = fit.calls[0]["texts"]
    assert fitted_texts == train_texts and not held_out & set(fitted_texts)
    assert len(student.calls) == 1
    student_rows = [t.decode() for t, _ in student.fn(**student.calls[0]).as_numpy_iterator()]
    assert len(student_rows) == len(train_texts) + N_UNSUP
    assert not held_out & set(student_rows)
    assert sum(t.startswith("unlabelled ") for t in student_rows) == N_UNSUP
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["distill"]["unlabelled_reviews"] == N_UNSUP and info["distill"]["cached"] is False


@pytest.mark.slow
def test_a_distilled_run_trained_in_bfloat16_is_scored_and_exported_in_float32(unsup_dir, tmp_path):
    """The n-gram teacher and branch score in float32 under a mixed policy, and the export check
    compares the served graph with the float32 model that was scored, at the float32 tolerance."""
    cfg = _cfg(unsup_dir, tmp_path, "train.epochs=2", "ngrams.enabled=true", "ngrams.cotrain=true",
               "distribute.mixed_precision=bfloat16")
    try:
        result = train(cfg)
    finally:
        keras.mixed_precision.set_global_policy("float32")  # the policy is global: never leak it
    assert result.export is not None and result.export.max_abs_diff <= cfg.export.verify_tolerance
    assert result.metrics["accuracy"] >= 0.8  # the tiny reviews stay separable
    assert json.loads((result.run_dir / "run.json").read_text())["precision"] == "mixed_bfloat16"


@pytest.mark.slow
def test_a_cotrained_branch_fits_the_unlabelled_reviews_on_the_bilstms_probabilities(
        unsup_dir, tmp_path, monkeypatch):
    from pipeline.run_files import load_run
    from pipeline.scoring import score_texts

    cfg = _cfg(unsup_dir, tmp_path, "train.epochs=2", "ngrams.enabled=true", "ngrams.cotrain=true")
    fit = spy(monkeypatch, pipeline.ngrams, "fit")
    result = train(cfg, export=False)

    raw = load_raw(cfg.data, cfg.seed)
    train_texts = decoded(raw.train)[0]
    held_out = set(decoded(raw.validation)[0]) | set(decoded(raw.test)[0])
    # twice: the teacher on the training reviews alone, then the served branch with the soft rows
    assert [call["texts"] == train_texts for call in fit.calls] == [True, True]
    assert fit.calls[0]["soft"] is None and fit.calls[1]["soft"] is not None
    texts, probabilities = fit.calls[1]["soft"]
    assert texts == distill.unlabelled_reviews(cfg) and not held_out & set(texts)
    run_cfg, vectorizer, model, _ = load_run(result.run_dir)
    z_lstm, _ = score_texts(vectorizer, model, texts, run_cfg.vectorize.max_length)
    np.testing.assert_allclose(probabilities, sigmoid(z_lstm), atol=1e-5)
    assert np.ptp(probabilities) > 0.1  # the trained BiLSTM's, not a constant
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["ngrams"]["cotrained_on"] == N_UNSUP


def test_soft_targets_are_the_teachers_probabilities(unsup_dir, tmp_path):
    cfg = _cfg(unsup_dir, tmp_path)
    raw = load_raw(cfg.data, cfg.seed)
    t = distill.ngram_teacher(cfg, decoded(raw.train))
    logits = ngram_logits(t.branch, t.texts)
    assert np.ptp(logits) > 1.0  # the teacher tells reviews apart
    rows = list(distill.student_split(raw.train, t).as_numpy_iterator())
    gold, soft = rows[:-N_UNSUP], rows[-N_UNSUP:]
    assert [text.decode() for text, _ in soft] == t.texts
    targets = np.array([y for _, y in soft])
    np.testing.assert_allclose(targets, sigmoid(logits), rtol=1e-5)
    # the labelled rows keep their gold 0/1 label
    assert [y for _, y in gold] == [float(y) for y in decoded(raw.train)[1]]


def test_a_rerun_reuses_the_cached_teacher_and_a_changed_review_is_scored_again(
        unsup_dir, tmp_path, monkeypatch):
    root = shutil.copytree(unsup_dir, tmp_path / "aclImdb")
    cfg = _cfg(root, tmp_path)
    train_split = decoded(load_raw(cfg.data, cfg.seed).train)
    first = distill.ngram_teacher(cfg, train_split)
    assert not first.cached

    forbid(monkeypatch, pipeline.ngrams, "fit", "the cached teacher should have been reused")
    again = distill.ngram_teacher(cfg, train_split)
    assert again.cached and again.texts == first.texts
    np.testing.assert_array_equal(again.probabilities, first.probabilities)

    (root / "train" / "unsup" / "0_0.txt").write_text("A brand new unlabelled review, great!")
    monkeypatch.undo()
    changed = distill.ngram_teacher(cfg, train_split)
    assert not changed.cached and changed.texts[0] != first.texts[0]


def test_distillation_needs_unlabelled_reviews(imdb_dir, tmp_path):
    from pipeline.data import DataError

    cfg = _cfg(imdb_dir, tmp_path)  # no train/unsup folder
    with pytest.raises(DataError, match="need unlabelled reviews"):
        distill.ngram_teacher(cfg, decoded(load_raw(cfg.data, cfg.seed).train))
    # co-training alone wants them too; either way the run stops before anything is written
    for settings in (["distill.enabled=true"], ["distill.enabled=false", "ngrams.enabled=true",
                                                "ngrams.cotrain=true"]):
        cfg = _cfg(imdb_dir, tmp_path, *settings)
        with pytest.raises(DataError, match="set distill.enabled=false ngrams.cotrain=false"):
            train(cfg, export=False)
        assert not (tmp_path / "runs").exists()


def test_the_teacher_is_this_config_taught_by_the_ngrams_without_experimental_levers():
    cfg = load_config(None, ["name=x", "distill.enabled=true", "distill.teacher=served",
                             "experimental.adversarial_epsilon=0.02", "model.pooling=concat"])
    first = distill.teacher_config(cfg)
    assert (first.name, first.distill.teacher) == ("x-teacher", "ngrams")
    assert first.experimental.adversarial_epsilon == 0.0
    assert first.ngrams.cotrain is False and distill.teacher_config(cfg.model_copy(update={
        "ngrams": cfg.ngrams.model_copy(update={"cotrain": True})})).ngrams == first.ngrams
    # Everything else is the same config.
    assert (first.model, first.train, first.vectorize, first.data) == (cfg.model, cfg.train,
                                                                      cfg.vectorize, cfg.data)


def test_training_metrics_count_a_soft_target_as_the_teachers_label():
    from pipeline.model import HardTargets

    accuracy = HardTargets(keras.metrics.BinaryAccuracy(name="accuracy"))
    accuracy.update_state(np.array([[0.8], [0.3], [1.0], [0.0]]), np.array([[0.9], [0.2], [0.4], [0.6]]))
    assert accuracy.name == "accuracy" and float(accuracy.result()) == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", [(), ("distill.teacher=served",)], ids=["ngrams", "served"])
def test_a_resumed_distilling_run_ends_as_an_uninterrupted_one(unsup_dir, tmp_path, monkeypatch, teacher):
    # a cosine rate, so the resumed optimizer must also carry on the schedule where it was
    extra = ("train.epochs=4", "train.early_stopping_patience=4", "model.dropout=0.3",
             "train.lr_schedule=cosine", *teacher)
    reference = train_rounds(_cfg(unsup_dir, tmp_path / "reference", *extra), export=False)

    import pipeline.train as spine

    # Ctrl-C in the student's third epoch; the teacher's round, in its own process, finishes
    callbacks = spine.make_callbacks
    monkeypatch.setattr(spine, "make_callbacks", lambda cfg, run_dir: callbacks(cfg, run_dir) + [StopAt(2)])
    cfg = _cfg(unsup_dir, tmp_path / "resumed", *extra)
    with pytest.raises(KeyboardInterrupt):
        train_rounds(cfg, export=False)
    monkeypatch.undo()
    resumed = train_rounds(cfg, export=False)
    info = json.loads((resumed.run_dir / "run.json").read_text())
    assert info["started_at_epoch"] == 3 and info["distill"]["cached"] is True
    assert resumed.metrics == reference.metrics
    with (resumed.run_dir / "history.csv").open() as f, (reference.run_dir / "history.csv").open() as g:
        assert list(csv.DictReader(f)) == list(csv.DictReader(g))


@pytest.mark.slow
def test_a_served_teacher_is_a_finished_first_run_whose_blend_labels_the_reviews(unsup_dir, tmp_path):
    from pipeline.run_files import load_run
    from pipeline.scoring import blend_logit, score_texts

    cfg = _cfg(unsup_dir, tmp_path, "distill.teacher=served", "ngrams.enabled=true", "train.epochs=2")
    with pytest.raises(ValueError, match="needs the teacher run's folder"):
        train(cfg, export=False)  # the spine trains one model: the rounds are above it
    student = train_rounds(cfg, export=False)
    teachers = [d for d in (tmp_path / "runs" / "tiny-teacher").iterdir()]
    assert len(teachers) == 1 and json.loads((teachers[0] / "run.json").read_text())["status"] == "finished"
    # the teacher trained in a process of its own: its lock names another pid than this one
    assert int((teachers[0] / LOCK_FILE).read_text()) != os.getpid()
    info = json.loads((student.run_dir / "run.json").read_text())["distill"]
    assert info["from"] == str(teachers[0])
    scores = teachers[0] / distill.SERVED_SCORES_FILE
    written = scores.stat().st_mtime_ns

    # the soft targets are the first run's served probabilities of the unlabelled reviews
    texts = distill.unlabelled_reviews(cfg)
    teacher_cfg, vectorizer, model, branch = load_run(teachers[0])
    z_lstm, z_ngram = score_texts(vectorizer, model, texts, teacher_cfg.vectorize.max_length, branch)
    served = sigmoid(blend_logit(z_lstm, z_ngram, branch.blend))
    t = distill.served_teacher(teachers[0], texts, branch, lambda _: pytest.fail("not cached"))
    assert t.cached
    np.testing.assert_allclose(t.probabilities, served, atol=1e-5)

    # a second run of the config reuses the finished teacher and its scores
    again = train_rounds(cfg, export=False, fresh=True)
    assert len(list((tmp_path / "runs" / "tiny-teacher").iterdir())) == 1
    assert json.loads((again.run_dir / "run.json").read_text())["distill"]["cached"] is True
    assert scores.stat().st_mtime_ns == written
    assert again.metrics == student.metrics  # the same seed draws the same numbers either way


def test_a_files_source_distills_from_its_unlabelled_files(tmp_path):
    from tests.helpers import files_overrides, review_rows, write_table

    train_file = write_table(tmp_path / "reviews.csv", review_rows(80, ("bad", "good")))
    unlabelled = write_table(tmp_path / "more.jsonl", [{"text": f"unlabelled {i}. " + r["text"]}
                                                       for i, r in enumerate(review_rows(30, seed=3))])
    cfg = load_config(None, files_overrides(train_file, tmp_path, "distill.enabled=true",
                                            f"data.unlabelled_files={unlabelled}",
                                            f"pretrain.directory={tmp_path / 'pretrained'}"))
    raw = load_raw(cfg.data, cfg.seed)
    t = distill.ngram_teacher(cfg, decoded(raw.train))
    assert len(t.texts) == 30 and all(text.startswith("unlabelled ") for text in t.texts)
    assert not t.cached and distill.ngram_teacher(cfg, decoded(raw.train)).cached
