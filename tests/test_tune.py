"""Tuning on tiny data: the grid, the report against KerasTuner's own records, the hand-off to
training, resume after an interruption, chief/worker tuning, and bad tuning configs."""

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras_tuner as kt
import numpy as np
import pytest
import yaml

from pipeline import tune, tune_report
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model import build_model, model_kwargs
from tests.helpers import ctrl_c_inside_tensorflow, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
DIMS = [4, 8]


def _tune_overrides(imdb: Path, out: Path, dims: list[int] = DIMS) -> list[str]:
    # model.embedding_dim=6 is in no candidate list, so a model of dim 6 was not tuned.
    # One direction and one batch shape keep each trial's graph small: these tests are about
    # the search, not the model.
    return tiny_overrides(imdb, out) + [f"tune.embedding_dims=[{','.join(map(str, dims))}]",
                                        "tune.epochs=1", "model.embedding_dim=6",
                                        "model.bidirectional=false", "train.bucket_by_length=false",
                                        "ngrams.enabled=true"]  # as the default config ships


def _set_args(overrides: list[str]) -> list[str]:
    return [a for item in overrides for a in ("--set", item)]


def _oracle_trials(out: Path) -> dict[str, kt.engine.trial.Trial]:
    """KerasTuner's own record of each trial, as its oracle saved it."""
    trials = [kt.engine.trial.Trial.load(str(f)) for f in (out / "project").glob("trial_*/trial.json")]
    return {t.trial_id: t for t in trials}


@pytest.fixture(scope="module")
def searched(imdb_dir, tmp_path_factory):
    """One finished grid search over DIMS, counting how often the data is prepared."""
    out = tmp_path_factory.mktemp("tune")
    cfg = load_config(None, _tune_overrides(imdb_dir, out))
    calls = {"adapt": 0, "vectorize": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tune, "adapt_vectorizer", counting("adapt", tune.adapt_vectorizer))
        mp.setattr(tune, "vectorize_cached", counting("vectorize", tune.vectorize_cached))
        result = tune.run_search(cfg)
    return cfg, result, calls


def test_grid_tries_every_candidate_once_on_shared_data(searched):
    cfg, result, calls = searched
    trials = _oracle_trials(tune.output_dir(cfg))
    assert sorted(t.hyperparameters.values["embedding_dim"] for t in trials.values()) == DIMS
    assert all(t.status == "COMPLETED" for t in trials.values())
    assert sorted(t["trial_id"] for t in result.trained) == sorted(trials)
    # The vocabulary is adapted once and train/validation tokenized and cached once, for all trials.
    assert calls == {"adapt": 1, "vectorize": 2}
    for row in result.rows:
        assert 1 <= row["epochs_run"] <= cfg.tune.epochs


def test_every_trial_gets_the_same_batches(imdb_dir, tmp_path):
    cfg = load_config(None, _tune_overrides(imdb_dir, tmp_path))
    make_train, val_ds, vocabulary, sizes, _ = tune.prepare_data(cfg, tune.make_strategy(cfg.distribute))
    vocab_size = len(vocabulary)
    first, second = ([y.numpy().tolist() for _, y in make_train()] for _ in range(2))
    assert first == second and sum(map(len, first)) == sizes["train"]
    assert sizes == {"train": 90, "validation": 30} and vocab_size <= cfg.vectorize.max_tokens


def test_report_agrees_with_the_tuner_records(searched):
    cfg, result, _ = searched
    out = tune.output_dir(cfg)
    trials = _oracle_trials(out)
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [1, 2]
    assert sorted(int(r["embedding_dim"]) for r in rows) == DIMS
    for row in rows:
        trial = trials[row["trial_id"]]
        assert int(row["embedding_dim"]) == trial.hyperparameters.values["embedding_dim"]
        assert float(row["val_accuracy"]) == pytest.approx(trial.score)
        for key in ("val_loss", "trainable_params", "epochs_run", "seconds", tune_report.SERVED):
            assert float(row[key]) == pytest.approx(trial.metrics.get_last_value(key), abs=0.05)
        assert 0.5 <= float(row[tune_report.SERVED]) <= 1.0  # the n-grams alone read this tiny data
    # The parameter count is that of the plain builder's model with that embedding size.
    vocab = json.loads((out / "search.json").read_text())["vocabulary_size"]
    for row in rows:
        model = build_model(vocab, **model_kwargs(cfg.model) | {"embedding_dim": int(row["embedding_dim"])})
        assert int(row["trainable_params"]) == tune.trainable_params(model)
    # The best is the top row and has the best score the oracle recorded.
    best = json.loads((out / "best_hparams.json").read_text())
    hps = kt.HyperParameters.from_config(best)  # KerasTuner's own form
    assert hps.values["embedding_dim"] == int(rows[0]["embedding_dim"])
    assert trials[rows[0]["trial_id"]].score == max(t.score for t in trials.values())
    assert result.best["trial_id"] == rows[0]["trial_id"]
    md = (out / "results.md").read_text()
    results_table = md.split("## What each embedding learned")[0]
    assert results_table.count("\n| ") == 3 and f"embedding_dim={rows[0]['embedding_dim']}" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # TensorBoard: one log dir per trial with its HParams session, and the experiment at the top.
    for trial_id in trials:
        assert any((out / "logs" / trial_id).rglob("events.out.tfevents*"))
    assert any((out / "logs").glob("events.out.tfevents*"))
    text = tune_report.summary(result)
    assert f"best: embedding_dim={rows[0]['embedding_dim']}" in text and "best_hparams.json" in text


def test_rerun_trains_nothing_again(searched):
    cfg, result, _ = searched
    trials = tune.output_dir(cfg) / "project"
    before = {f: f.stat().st_mtime_ns for f in trials.glob("trial_*/*")}
    again = tune.run_search(cfg)
    assert again.trained == []
    assert [r["trial_id"] for r in again.rows] == [r["trial_id"] for r in result.rows]
    assert {f: f.stat().st_mtime_ns for f in trials.glob("trial_*/*")} == before


@pytest.mark.slow
def test_training_uses_the_tuned_values(searched, imdb_dir, tmp_path, capsys):
    cfg, result, _ = searched
    best_file = tune.output_dir(cfg) / "best_hparams.json"
    best_dim = result.best["embedding_dim"]
    overrides = _tune_overrides(imdb_dir, tmp_path) + ["train.epochs=1"]
    assert main(["train", "--no-export", "--tuned", str(best_file)] + _set_args(overrides)) == 0
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["embedding_dim"] == best_dim != 6
    assert saved["model"]["tuned_hparams"] == str(best_file)
    source = json.loads((run / "run.json").read_text())["hyperparameters_from"]
    assert source["source"] == "tuning" and source["file"] == str(best_file)
    assert source["values"] == {"embedding_dim": best_dim}
    assert source["search"]["trial_id"] == result.best["trial_id"]


def test_tuned_latest_without_a_tuning_is_an_error(imdb_dir, tmp_path, capsys):
    overrides = _tune_overrides(imdb_dir, tmp_path) + ["model.tuned_hparams=latest"]
    assert main(["train", "--no-export"] + _set_args(overrides)) == 1
    assert "no tuning result" in capsys.readouterr().err


def test_changed_settings_need_fresh(searched, imdb_dir):
    cfg, _, _ = searched
    out = Path(cfg.tune.directory).parent
    changed = load_config(None, _tune_overrides(imdb_dir, out) + ["model.lstm_units=9"])
    with pytest.raises(ConfigError, match="--fresh"):
        tune.run_search(changed)


@pytest.mark.slow
def test_interrupted_search_resumes_and_extends(searched, imdb_dir, tmp_path, monkeypatch, capsys, caplog,
                                                default_sigint):
    """A copy of the finished search, one more candidate listed, Ctrl-C during its trial (landing
    where TensorFlow re-raises it as a RuntimeError, which KerasTuner would take for a failed
    trial): the rerun trains that candidate only; the finished trials are kept as they were."""
    cfg, _, _ = searched
    out = tmp_path / "tuning" / "tiny"
    shutil.copytree(tune.output_dir(cfg), out)
    finished = {f: f.read_text() for f in out.glob("project/trial_*/trial.json")}
    fit = tune.EmbeddingHyperModel.fit

    def interrupted(self, hp, model, *args, **kwargs):
        if hp.values["embedding_dim"] == 16:
            ctrl_c_inside_tensorflow(monkeypatch)
        return fit(self, hp, model, *args, **kwargs)

    extended = _set_args(_tune_overrides(imdb_dir, tmp_path, DIMS + [16]))
    monkeypatch.setattr(tune.EmbeddingHyperModel, "fit", interrupted)
    assert main(["tune"] + extended) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    statuses = {t.hyperparameters.values["embedding_dim"]: t.status for t in _oracle_trials(out).values()}
    assert statuses == {4: "COMPLETED", 8: "COMPLETED", 16: "RUNNING"}

    monkeypatch.setattr(tune.EmbeddingHyperModel, "fit", fit)
    monkeypatch.setattr(tune_report, "summary", lambda r: json.dumps(r.trained))  # what this session ran
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.tune"):
        assert main(["tune"] + extended) == 0
    assert "2 finished trial(s) kept, 1 trial(s) to run" in caplog.text  # the interrupted one
    ran = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [t["values"] for t in ran] == [{"embedding_dim": 16}]
    trials = _oracle_trials(out)
    assert sorted(t.hyperparameters.values["embedding_dim"] for t in trials.values()) == [4, 8, 16]
    assert all(t.status == "COMPLETED" for t in trials.values())
    assert {f: f.read_text() for f in finished} == finished
    with (out / "results.csv").open() as f:
        assert sorted(int(r["embedding_dim"]) for r in csv.DictReader(f)) == [4, 8, 16]

    # --fresh starts over: the earlier trials and the report are gone.
    tune.prepare_output(load_config(None, _tune_overrides(imdb_dir, tmp_path)), out, fresh=True)
    assert not (out / "project").exists() and not (out / "best_hparams.json").exists()


@pytest.mark.parametrize("kind,oracle", [
    ("random", kt.oracles.RandomSearchOracle),
    ("bayesian", kt.oracles.BayesianOptimizationOracle),
    ("hyperband", kt.oracles.HyperbandOracle),
])
def test_other_tuners_search_the_same_space(kind, oracle, imdb_dir, tmp_path):
    cfg = load_config(None, _tune_overrides(imdb_dir, tmp_path) + [
        f"tune.tuner={kind}", "tune.lstm_units=[8,16]", "tune.dropout=[0.0,0.2]"])
    hypermodel = tune.EmbeddingHyperModel(cfg, cfg.vectorize.max_tokens)
    tuner = tune.make_tuner(cfg, hypermodel, tmp_path / "t", None)
    assert isinstance(tuner.oracle, oracle)
    assert {p.name: list(p.values) for p in tuner.oracle.hyperparameters.space} == {
        "embedding_dim": DIMS, "lstm_units": [8, 16], "dropout": [0.0, 0.2]}
    if kind != "hyperband":
        assert tuner.oracle.max_trials == 8  # the grid's size when tune.max_trials is unset


@pytest.mark.parametrize("override,key", [
    ("tune.embedding_dims=[]", "tune.embedding_dims"),
    ("tune.tuner=annealing", "tune.tuner"),
    ("tune.embedding_dims=[16,32.5]", "tune.embedding_dims"),
    ("tune.embedding_dims=[16,'big']", "tune.embedding_dims"),
    ("tune.lstm_units=[]", "tune.lstm_units"),
    ("tune.dropout=[0.2,1.5]", "tune.dropout"),
])
def test_bad_tuning_config_exits_2_naming_the_key(override, key, tmp_path, capsys):
    assert main(["tune", "--set", f"tune.directory={tmp_path / 'tuning'}", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and key in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tuning").exists()


def test_worker_needs_a_tuner_id(capsys):
    assert main(["tune", "--worker", "127.0.0.1:8000"]) == 2
    assert "--tuner-id" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the chief exited before serving"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the chief did not listen on port {port} within {timeout}s")


@pytest.mark.slow
def test_chief_and_two_workers_share_the_grid(imdb_dir, tmp_path):
    """Every candidate is trained exactly once across the workers; the chief reports the best."""
    dims = [4, 8]
    port = _free_port()
    args = [sys.executable, "-m", "pipeline", "tune"] + _set_args(_tune_overrides(imdb_dir, tmp_path, dims))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, extra: list[str]) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(args + extra, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, text=True)
        return procs[name]

    try:
        chief = start("chief", ["--chief", f"127.0.0.1:{port}"])
        _wait_for_port(port, chief, timeout=120)
        for name in ("tuner1", "tuner2"):
            start(name, ["--worker", f"127.0.0.1:{port}", "--tuner-id", name])
        chief.wait(timeout=300)  # it returns once every worker has been told the search is over
        for name in ("tuner1", "tuner2"):
            procs[name].wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{logs[name][-3000:]}"

    out = tmp_path / "tuning" / "tiny"
    ran = {name: json.loads((out / "workers" / f"{name}.json").read_text())["trained"]
           for name in ("tuner1", "tuner2")}
    tried = sorted(t["values"]["embedding_dim"] for trials in ran.values() for t in trials)
    assert tried == dims, ran
    assert all(t["status"] == "COMPLETED" for trials in ran.values() for t in trials)
    trials = _oracle_trials(out)  # the chief's oracle wrote these
    assert sorted(t.hyperparameters.values["embedding_dim"] for t in trials.values()) == dims
    best = json.loads((out / "best_hparams.json").read_text())["values"]["embedding_dim"]
    with (out / "results.csv").open() as f:
        top = next(csv.DictReader(f))
    assert int(top["embedding_dim"]) == best
    assert trials[top["trial_id"]].score == max(t.score for t in trials.values())
    assert f"best: embedding_dim={best}" in logs["chief"]


@pytest.mark.slow
def test_one_search_compares_random_and_word2vec_starts_per_size(imdb_dir, tmp_path):
    from gensim.models import KeyedVectors

    from pipeline.pretrain import word2vec_for_size

    cfg = load_config(None, _tune_overrides(imdb_dir, tmp_path) + [
        "tune.embedding_init=[random,word2vec]", "tune.max_train_examples=40",
        f"pretrain.directory={tmp_path / 'pre'}", "pretrain.min_count=1", "pretrain.epochs=1"])
    result = tune.run_search(cfg)
    assert sorted((r["embedding_init"], r["embedding_dim"]) for r in result.rows) == [
        ("random", 4), ("random", 8), ("word2vec", 4), ("word2vec", 8)]
    out = tune.output_dir(cfg)
    search = json.loads((out / "search.json").read_text())
    assert search["word2vec_vector_size"] == 8  # one word2vec run, at the largest size
    assert search["data_sizes"]["train_per_trial"] == 40
    # Each word2vec candidate started from vectors of its own size: 8-d as trained, 4-d reduced.
    searched_cfg = tune.with_search_vectors(cfg)
    hypermodel = tune.EmbeddingHyperModel(searched_cfg, 0)
    hypermodel.vocabulary = ["", "[UNK]", "great", "awful"]
    kv4 = KeyedVectors.load(str(word2vec_for_size(searched_cfg, 4)))
    np.testing.assert_allclose(hypermodel.pretrained_matrix("word2vec", 4)[2], kv4["great"])
    assert hypermodel.pretrained_matrix("random", 4) is None
    # What each trial's embedding learned: projector files and probe-word neighbours.
    for row in result.rows:
        folder = tune_report.trial_embedding_dir(out, row["trial_id"])
        neighbours = json.loads((folder / "neighbours.json").read_text())
        assert {"excellent", "awful", "boring"} <= set(neighbours)  # probes in the tiny vocabulary
        assert all(len(v) == 5 for v in neighbours.values())
        assert (folder / "projector_config.pbtxt").is_file()
    # The report: one row per (init, size), the neighbour tables side by side, the best projector.
    md = (out / "results.md").read_text()
    assert "### random start" in md and "### word2vec start" in md
    assert "| word | 4-d | 8-d |" in md and "| **awful** |" in md
    assert f"tensorboard --logdir {tune_report.trial_embedding_dir(out, result.best['trial_id'])}" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # The hand-off: the chosen start, and for word2vec the vectors it was scored with.
    best = result.best
    d = cfg.to_dict()
    d["model"]["tuned_hparams"] = str(out / "best_hparams.json")
    tuned, provenance = tune.apply_tuned(load_config(None, []).model_validate(d))
    assert tuned.model.embedding_init == best["embedding_init"]
    assert tuned.model.embedding_dim == best["embedding_dim"]
    assert provenance["values"]["embedding_init"] == best["embedding_init"]
    if best["embedding_init"] == "word2vec":
        assert tuned.pretrain.vector_size == 8


@pytest.mark.parametrize("init", ["file"])
def test_a_fixed_size_start_needs_a_searched_init(init, imdb_dir, tmp_path):
    extra = [f"model.embedding_file={tmp_path / 'v.txt'}"] if init == "file" else []
    cfg = load_config(None, _tune_overrides(imdb_dir, tmp_path) + [f"model.embedding_init={init}"] + extra)
    with pytest.raises(ConfigError, match="tune.embedding_init"):
        tune.check_tunable(cfg)
    ok = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"embedding_init": ["random"]})})
    tune.check_tunable(ok)


def test_word2vec_vectors_smaller_than_a_candidate_are_refused_up_front(imdb_dir, tmp_path):
    cfg = load_config(None, _tune_overrides(imdb_dir, tmp_path) + [
        "tune.embedding_init=[word2vec]", "pretrain.vector_size=4"])  # DIMS go up to 8
    with pytest.raises(ConfigError, match="pretrain.vector_size: 4-d word2vec vectors cannot start the 8-d"):
        tune.check_tunable(cfg)


def test_the_served_validation_accuracy_is_the_blend_of_the_bilstm_and_the_ngrams(imdb_dir, tmp_path):
    from pipeline.data import decoded, load_raw
    from pipeline.scoring import fit_blend
    from pipeline.vectorize import texts_to_padded_ids

    cfg = load_config(None, _tune_overrides(imdb_dir, tmp_path))
    raw = load_raw(cfg.data, cfg.seed)
    vectorizer = tune.adapt_vectorizer(cfg.vectorize, raw.train)
    served = tune.served_validation(cfg, vectorizer, raw, raw.train)
    model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))
    served.set_model(model)
    logs = {}
    served.on_epoch_end(0, logs)
    # the same figure from Keras' own predictions, turned back into logits
    texts, labels = decoded(raw.validation)
    ids = texts_to_padded_ids(vectorizer, np.array(texts), cfg.vectorize.max_length)
    p = np.clip(model.predict(ids, verbose=0).ravel().astype(np.float64), 1e-7, 1 - 1e-7)
    z_lstm = np.log(p / (1 - p))
    a, b, c = fit_blend(z_lstm, served.ngram_logits, labels)
    expected = np.mean(((a * z_lstm + b * served.ngram_logits + c) > 0) == labels)
    assert logs[tune_report.SERVED] == pytest.approx(expected, abs=1 / len(labels))
    assert tune.served_validation(cfg.model_copy(update={"ngrams": cfg.ngrams.model_copy(
        update={"enabled": False})}), vectorizer, raw, raw.train) is None
