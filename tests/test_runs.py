"""pipeline/runs.py: run directories and locks, the run record, the fingerprint and the resume state;
and through `train`, the statuses a run goes through (failed, trained -> export, finished) and
its resume across sessions (after SIGKILL and Ctrl-C: the same history and metrics)."""

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

import pipeline.train
from pipeline import runs
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import DataError, data_identity
from pipeline.distribute import WorkerBackupAndRestore
from pipeline.model import build_model
from pipeline.runs import (
    DirLock,
    ResumableEarlyStopping,
    ResumeError,
    RunBusyError,
    SeedStateBackup,
    fingerprint,
    open_run,
    restored_epoch,
    run_fingerprint,
    tidy_history,
)
from pipeline.train import train
from tests.helpers import RESUME_EPOCHS, RESUME_EXTRA, StopAt, tiny_overrides, write_aclimdb

ROOT = Path(__file__).resolve().parents[1]


def _fp(cfg) -> str:
    return run_fingerprint(cfg, data_identity(cfg.data))


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


# --- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_is_short_and_ignores_key_order():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint({})) == 10


@pytest.mark.parametrize("volatile", [
    "runs_dir=elsewhere", "export.dir=elsewhere", "train.verbose=2", "tune.epochs=9",
    "tune.directory=elsewhere", "pretrain.workers=7", "pretrain.directory=elsewhere",
    "model.tuned_hparams=latest",
])
def test_run_fingerprint_ignores_what_does_not_shape_the_weights(imdb_dir, tmp_path, volatile):
    base = load_config(None, tiny_overrides(imdb_dir, tmp_path))
    assert _fp(load_config(None, tiny_overrides(imdb_dir, tmp_path) + [volatile])) == _fp(base)


@pytest.mark.parametrize("change", ["model.lstm_units=9", "seed=1", "train.batch_size=8",
                                    "data.max_train_examples=50", "vectorize.max_tokens=99",
                                    "data.labels=[pos, neg]", "data.train_split=validation"])
def test_run_fingerprint_covers_what_shapes_the_weights(imdb_dir, tmp_path, change):
    base = load_config(None, tiny_overrides(imdb_dir, tmp_path))
    assert _fp(load_config(None, tiny_overrides(imdb_dir, tmp_path) + [change])) != _fp(base)


def test_run_fingerprint_follows_the_data_not_its_path(imdb_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path))
    moved = shutil.copytree(imdb_dir, tmp_path / "moved")
    cfg_moved = load_config(None, tiny_overrides(moved, tmp_path))
    assert _fp(cfg_moved) == _fp(cfg)  # same reviews elsewhere: the same run
    review = next((moved / "train" / "pos").glob("*.txt"))
    review.write_text(review.read_text() + " more")
    assert _fp(cfg_moved) != _fp(cfg)  # other data: another run


def test_data_key_leaves_out_the_files_paths_and_keeps_every_other_key():
    from pipeline.config import DataConfig
    from pipeline.runs import FILES_KEYS, data_key

    dumped = DataConfig(source="files", train_files="a.csv", text_column="body").model_dump()
    assert set(data_key(dumped)) == set(dumped) - set(FILES_KEYS)
    assert data_key(dumped)["text_column"] == "body"


def test_every_hash_carries_the_fingerprint_version(monkeypatch):
    import pipeline.runs as runs

    before = runs.fingerprint({"a": 1})
    monkeypatch.setattr(runs, "FINGERPRINT_VERSION", runs.FINGERPRINT_VERSION + 1)
    # A new version renames every run, cache and search, so none of the old meaning is reused.
    assert runs.fingerprint({"a": 1}) != before


def test_tfds_identity_comes_from_the_builder_info_without_a_download(monkeypatch):
    import tensorflow_datasets as tfds

    class Split:
        def __init__(self, n):
            self.num_examples = n

    class Info:
        full_name, version = "imdb_reviews/plain_text/1.0.0", "1.0.0"
        splits = {"train": Split(25000), "test": Split(25000)}

    calls = []

    def builder(name, data_dir=None, **kwargs):
        calls.append((name, data_dir, kwargs))
        return type("Builder", (), {"info": Info})()

    monkeypatch.setattr(tfds, "builder", builder)
    cfg = load_config(None, ["data.data_dir=/somewhere"]).data
    assert data_identity(cfg) == {"source": "tfds", "name": "imdb_reviews/plain_text/1.0.0",
                                  "version": "1.0.0", "splits": {"test": 25000, "train": 25000}}
    assert calls == [("imdb_reviews", "/somewhere", {})]  # no download_and_prepare, no options

    def broken(*args, **kwargs):
        raise FileNotFoundError("no dataset_info.json")

    monkeypatch.setattr(tfds, "builder", broken)
    with pytest.raises(DataError, match="imdb_reviews"):
        data_identity(cfg)


# --- run directories and locks --------------------------------------------------------------------


def test_code_commit_is_the_checkouts_or_none_without_git(monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(runs.__file__).parent,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert runs.code_commit() in (head, f"{head}-dirty")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(runs.subprocess, "run", no_git)
    assert runs.code_commit() is None


def test_open_run_resumes_running_and_trained_runs_only(tiny_cfg):
    fp = _fp(tiny_cfg)
    with open_run(tiny_cfg, fp, fresh=False) as run:
        assert not run.resumed and run.status == "running"
        record = json.loads((run.dir / "run.json").read_text())
        assert record["fingerprint"] == fp and record["command"] == sys.argv[1:]
        assert record["commit"] == runs.code_commit()  # this checkout's commit
    with open_run(tiny_cfg, fp, fresh=False) as again:
        assert (again.dir, again.resumed) == (run.dir, True)
        again.update(status="trained")
    with open_run(tiny_cfg, fp, fresh=False) as again:
        assert again.dir == run.dir  # trained: resumed at the evaluation
        again.update(status="finished")
    with open_run(tiny_cfg, fp, fresh=False) as new:
        assert new.dir != run.dir and not new.resumed
        new.update(status="failed")
    with open_run(tiny_cfg, fp, fresh=False) as newer:
        assert newer.dir not in (run.dir, new.dir)
    with open_run(tiny_cfg, fp, fresh=True) as fresh:
        assert fresh.dir != newer.dir and not fresh.resumed
    with open_run(tiny_cfg, "0123456789", fresh=False) as other:  # another config
        assert not other.resumed


def test_pipeline_error_marks_a_training_run_failed_but_not_a_trained_one(tiny_cfg):
    fp = _fp(tiny_cfg)
    with pytest.raises(DataError), open_run(tiny_cfg, fp, fresh=False) as run:
        raise DataError("cannot read record 3")
    record = json.loads((run.dir / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == "cannot read record 3"
    with pytest.raises(DataError), open_run(tiny_cfg, fp, fresh=False) as run:
        run.update(status="trained")
        raise DataError("disk full during export")
    assert json.loads((run.dir / "run.json").read_text())["status"] == "trained"
    with pytest.raises(KeyboardInterrupt), open_run(tiny_cfg, fp, fresh=False) as run:
        raise KeyboardInterrupt
    assert json.loads((run.dir / "run.json").read_text())["status"] == "trained"


def test_an_error_after_a_stop_signal_leaves_the_run_resumable(tiny_cfg, monkeypatch):
    # tfds turns whatever reading raised, a re-raised Ctrl-C included, into a DataError.
    monkeypatch.setattr(runs, "stop_signal", lambda: signal.SIGINT)
    with pytest.raises(DataError), open_run(tiny_cfg, _fp(tiny_cfg), fresh=False) as run:
        raise DataError("cannot load 'imdb_reviews': RuntimeError")
    assert json.loads((run.dir / "run.json").read_text())["status"] == "running"


def test_a_held_run_is_refused_with_one_line_naming_dir_and_pid(tiny_cfg):
    fp = _fp(tiny_cfg)
    with open_run(tiny_cfg, fp, fresh=False) as run:
        with pytest.raises(RunBusyError) as err:
            open_run(tiny_cfg, fp, fresh=False)
        message = str(err.value)
        assert "\n" not in message and str(run.dir) in message and f"pid {os.getpid()}" in message
    with open_run(tiny_cfg, fp, fresh=False) as again:  # released on leaving the `with`
        assert again.dir == run.dir


def test_the_lock_dies_with_its_process(tmp_path):
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.runs import DirLock; "
         "l = DirLock(__import__('pathlib').Path(sys.argv[1]), 'run'); print('held', flush=True); "
         "time.sleep(300)", str(lock)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusyError, match=f"pid {holder.pid}"):
            DirLock(lock, "run")
        holder.send_signal(signal.SIGKILL)  # nothing gets to clean up
        holder.wait(timeout=30)
        with DirLock(lock, "run"):  # no stale lock left behind
            assert lock.read_text().strip() == str(os.getpid())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_second_train_of_a_live_run_exits_1_with_one_line(imdb_dir, tmp_path, capsys):
    overrides = tiny_overrides(imdb_dir, tmp_path)
    cfg = load_config(None, overrides)
    with open_run(cfg, _fp(cfg), fresh=False) as live:  # as a first `train` would hold it
        assert main(["train"] + _set_args(overrides)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(live.dir) in err[0] and f"pid {os.getpid()}" in err[0]
        assert len(list((tmp_path / "runs" / "tiny").iterdir())) == 1  # no second run started
    assert not (tmp_path / "saved_models").exists()


@pytest.mark.slow
def test_two_train_processes_of_one_config_never_share_a_run(imdb_dir, tmp_path, capsys):
    """The reported double start, reproduced: a second `train` while the first is training stops at once."""
    import time

    overrides = tiny_overrides(imdb_dir, tmp_path) + [  # long enough to be caught mid-training
        "train.epochs=100000", "train.early_stopping_patience=100000", "train.verbose=2"]
    log = tmp_path / "first.log"
    with log.open("w") as f:
        first = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--no-export",
                                  *_set_args(overrides)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "Epoch 2/" not in log.read_text():  # the first is in the middle of its training
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        (live,) = (tmp_path / "runs" / "tiny").iterdir()
        assert main(["train", "--no-export"] + _set_args(overrides)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(live) in err[0] and f"pid {first.pid}" in err[0]
        assert list((tmp_path / "runs" / "tiny").iterdir()) == [live]  # no second run started
        assert json.loads((live / "run.json").read_text())["status"] == "running"
        assert first.poll() is None  # the first one goes on undisturbed
    finally:
        first.kill()
        first.wait()


def test_a_data_error_writes_no_run(tmp_path, capsys):
    args = ["train", "--set", f"runs_dir={tmp_path / 'runs'}", "--set", "data.source=directory",
            "--set", f"data.directory={tmp_path / 'missing'}"]
    assert main(args) == 1
    assert not (tmp_path / "runs").exists()


# --- statuses through `train` ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_failed_run_is_marked_and_not_resumed(imdb_dir, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path) + ["train.epochs=1"])

    def unreadable(*args, **kwargs):
        raise DataError("cannot read record 7 of train.tfrecord")

    with monkeypatch.context() as m:
        m.setattr(pipeline.train, "adapt_vectorizer", unreadable)
        with pytest.raises(DataError):
            train(cfg, export=False)
    (failed,) = (tmp_path / "runs" / "tiny").iterdir()
    assert json.loads((failed / "run.json").read_text())["status"] == "failed"
    result = train(cfg, export=False)
    assert result.run_dir != failed
    assert json.loads((result.run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_interrupted_export_resumes_at_export_without_training(imdb_dir, tmp_path, monkeypatch,
                                                               capsys):
    args = ["train"] + _set_args(tiny_overrides(imdb_dir, tmp_path) + ["train.epochs=2",
                                                                      "train.verbose=2"])

    def killed(*a, **kw):
        raise KeyboardInterrupt  # what Ctrl-C (or a kill) during the export looks like

    with monkeypatch.context() as m:
        m.setattr(pipeline.train, "export_model", killed)
        assert main(args) == 130
    first = capsys.readouterr()
    assert "Epoch 1/2" in first.out
    hint = [line for line in first.err.splitlines() if line.startswith("interrupted:")]
    assert len(hint) == 1 and "evaluation and export" in hint[0]
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "trained" and not (run / "backup").exists()
    history = (run / "history.csv").read_text()
    metrics = json.loads((run / "metrics.json").read_text())

    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a trained run's weights are saved: no pretrained start
        m.setattr(pipeline.train, "initial_weights", lambda *a: pytest.fail("pretrained again"))
        assert main(args) == 0
    # the optimizer was never built in this session; evaluation and export need none of its state
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    second = capsys.readouterr()
    assert "Epoch 1/" not in second.out and "exported:" in second.out
    assert [p.name for p in (tmp_path / "runs" / "tiny").iterdir()] == [run.name]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert (run / "history.csv").read_text() == history  # no epoch trained again
    assert json.loads((run / "metrics.json").read_text()) == metrics  # the same weights
    assert (tmp_path / "saved_models" / "tiny" / "1" / "saved_model.pb").is_file()


@pytest.mark.slow
def test_fallback_to_the_older_backup_matches_an_uninterrupted_run(imdb_dir, tmp_path, monkeypatch,
                                                                  caplog, reference_run):
    # reference_run (conftest): the same config, never interrupted.
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path / "out") + RESUME_EXTRA)
    make_callbacks = pipeline.train.make_callbacks
    with monkeypatch.context() as m:
        m.setattr(pipeline.train, "make_callbacks", lambda *a: make_callbacks(*a) + [StopAt(3)])
        with pytest.raises(KeyboardInterrupt):
            train(cfg, export=False)
    (run,) = (tmp_path / "out" / "runs" / "tiny").iterdir()
    latest = run / "backup" / "latest.weights.h5"
    assert json.loads((run / "backup" / "training_metadata.json").read_text())["epoch"] == 3
    latest.write_bytes(latest.read_bytes()[:300])  # the newest copy cut short

    with caplog.at_level(logging.INFO):
        resumed = train(cfg, export=False)
    assert resumed.run_dir == run
    assert "the latest backup" in caplog.text and "cannot be read" in caplog.text
    assert f"resuming from epoch 3 of {RESUME_EPOCHS}" in caplog.text  # the copy before: 2 epochs done
    assert json.loads((run / "run.json").read_text())["started_at_epoch"] == 3
    # Epoch counter, shuffles and seed states of the copy actually loaded: identical results.
    assert (run / "history.csv").read_text() == (reference_run.run_dir / "history.csv").read_text()
    assert resumed.metrics == reference_run.metrics


# --- resume state, unit by unit -------------------------------------------------------------------


def _model(dropout: float = 0.3) -> keras.Model:
    return build_model(10, embedding_dim=4, lstm_units=2, dropout=dropout)


def _write_history(path: Path, values: list[float]) -> None:
    rows = [f"{i},{v}" for i, v in enumerate(values)]
    path.write_text("\n".join(["epoch,val_accuracy", *rows]) + "\n")


def test_resumable_early_stopping_replays_the_finished_epochs(tmp_path):
    history = tmp_path / "history.csv"
    _write_history(history, [0.5, 0.7, 0.6])
    stop = ResumableEarlyStopping(history, monitor="val_accuracy", mode="max", patience=2)
    stop.set_model(_model())
    stop.on_train_begin()
    assert (stop.best, stop.best_epoch, stop.wait) == (0.7, 1, 1)
    stop.on_epoch_end(3, {"val_accuracy": 0.65})  # a second epoch without improvement
    assert stop.model.stop_training  # where an uninterrupted run stops too
    assert runs.best_so_far(history, "val_accuracy") == 0.7


def test_seed_state_backup_restores_the_states_of_the_resumed_epoch(tmp_path):
    path = tmp_path / "backup" / "seed_state.json"
    model = _model()
    saver = SeedStateBackup(path)
    saver.set_model(model)
    states = saver._states()
    assert states and all(v.path.endswith("seed_generator_state") for v in states)
    for epoch in range(4):
        for var in states:
            var.assign(np.full(var.shape, epoch + 1, dtype=var.dtype))
        saver.on_epoch_end(epoch)
    saved = json.loads(path.read_text())
    assert sorted(saved) == ["2", "3", "4"]  # the last three: either backup copy can resume

    other = _model()
    restorer = SeedStateBackup(path)
    restorer.set_model(other)
    restorer.on_train_begin()
    restorer.on_epoch_begin(3)  # resuming after 3 epochs: the states saved at the end of epoch 3
    assert all((np.asarray(v) == 3).all() for v in restorer._states())
    restorer.on_epoch_begin(4)  # later epochs of the session restore nothing
    assert all((np.asarray(v) == 3).all() for v in restorer._states())


def test_seed_state_backup_refuses_states_that_do_not_fit(tmp_path, caplog):
    path = tmp_path / "seed_state.json"
    path.write_text(json.dumps({"2": [[1, 2]]}))  # one state; the model has more
    restorer = SeedStateBackup(path)
    restorer.set_model(_model())
    restorer.on_train_begin()
    with pytest.raises(ResumeError, match="do not fit"):
        restorer.on_epoch_begin(2)
    restorer.on_train_begin()
    with caplog.at_level(logging.WARNING):
        restorer.on_epoch_begin(5)  # nothing saved for that epoch: said, not silent
    assert "no saved dropout seed states for epoch 6" in caplog.text


@pytest.fixture(scope="module")
def three_epoch_backup(tmp_path_factory) -> Path:
    """The backup folder a kill after the third epoch leaves (both copies); copy before changing."""
    x, y = np.array([[2, 3, 4], [5, 6, 0]]), np.array([1.0, 0.0])
    backup_dir = tmp_path_factory.mktemp("backup") / "backup"
    _model().fit(x, y, epochs=3, verbose=0, callbacks=[WorkerBackupAndRestore(
        str(backup_dir), double_checkpoint=True, delete_checkpoint=False)])
    return backup_dir


def test_restored_epoch_falls_back_to_the_older_copy_whole(three_epoch_backup, tmp_path, caplog):
    backup_dir = shutil.copytree(three_epoch_backup, tmp_path / "backup")
    assert restored_epoch(backup_dir) == 3
    latest = backup_dir / "latest.weights.h5"
    older = (backup_dir / "latest.weights.h5.bkp").read_bytes()
    latest.write_bytes(latest.read_bytes()[:300])
    with caplog.at_level(logging.WARNING):
        assert restored_epoch(backup_dir) == 2  # the epoch of the copy that will be loaded
    assert "cannot be read" in caplog.text
    assert latest.read_bytes() == older
    model = _model()
    restore = WorkerBackupAndRestore(str(backup_dir), double_checkpoint=True)
    restore.set_model(model)
    restore.on_train_begin()
    assert model._initial_epoch == 2  # Keras resumes from the same copy


def test_restored_epoch_without_a_readable_copy_is_an_error(three_epoch_backup, tmp_path):
    backup_dir = shutil.copytree(three_epoch_backup, tmp_path / "backup")
    for name in ("latest.weights.h5", "latest.weights.h5.bkp"):
        (backup_dir / name).write_bytes(b"not hdf5")
    with pytest.raises(ResumeError, match="--fresh"):
        restored_epoch(backup_dir)
    assert restored_epoch(tmp_path / "none") == 0  # no backup: a fresh start


def test_tuning_folder_is_refused_while_held(imdb_dir, tmp_path):
    from pipeline import tune

    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path))
    out = tune.output_dir(cfg)
    with DirLock(out.parent / f".{out.name}.lock", "tuning"):
        with pytest.raises(RunBusyError, match=f"tuning folder {out}.*pid {os.getpid()}"):
            tune.run_search(cfg)
    assert not out.exists()  # refused before anything was written


def test_fresh_folder_data_identity_counts_every_review(tmp_path):
    root = write_aclimdb(tmp_path / "imdb", n_train=8, n_test=4)
    (root / "train" / "unsup").mkdir()
    (root / "train" / "unsup" / "0_0.txt").write_text("unlabelled")
    identity = data_identity(load_config(None, ["data.source=directory",
                                                f"data.directory={root}"]).data)
    assert identity["source"] == "directory" and identity["files"] == 8 + 4 + 1


# --- resume across sessions: SIGKILL and Ctrl-C, and same seed -> same metrics -----------------


def _resume_overrides(imdb_dir: Path, out: Path) -> list[str]:
    # The config of conftest's `reference_run`: the uninterrupted run a resumed one must match.
    return tiny_overrides(imdb_dir, out) + RESUME_EXTRA


def _start(imdb_dir: Path, out: Path, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline", "train", "--no-export"]
    for item in _resume_overrides(imdb_dir, out):
        args += ["--set", item]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with log.open("w") as f:
        # SIG_DFL: a child of a background job would inherit an ignored SIGINT (no Ctrl-C handler).
        return subprocess.Popen(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _only_run_dir(out: Path) -> Path:
    runs = list((out / "runs" / "tiny").iterdir())
    assert len(runs) == 1, runs  # every session works in the same run directory
    return runs[0]


def _backup_epoch(out: Path) -> int:
    """Completed epochs recorded by BackupAndRestore so far (0 before the first)."""
    metas = list((out / "runs" / "tiny").glob("*/backup/training_metadata.json"))
    try:
        return json.loads(metas[0].read_text())["epoch"] if metas else 0
    except (json.JSONDecodeError, KeyError):  # caught mid-write
        return 0


def _stop_after_epoch(proc: subprocess.Popen, out: Path, after: int, sig: int) -> None:
    """Signal `proc` once it has completed more than `after` epochs, a moment into the next one."""
    deadline = time.monotonic() + 300
    while _backup_epoch(out) <= after:
        assert proc.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline, "no epoch completed"
        time.sleep(0.05)
    time.sleep(0.2)  # into the next epoch
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)


@pytest.mark.slow
def test_killed_run_resumes_in_the_same_run_dir(imdb_dir, tmp_path, reference_run):
    out = tmp_path / "out"
    # 1. SIGKILL mid-run: nothing gets to clean up.
    first = _start(imdb_dir, out, tmp_path / "first.log")
    _stop_after_epoch(first, out, 0, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    killed_at = _backup_epoch(out)
    assert 1 <= killed_at < RESUME_EPOCHS

    # 2. The same command resumes; Ctrl-C then stops it with a hint and exit code 130.
    second = _start(imdb_dir, out, tmp_path / "second.log")
    _stop_after_epoch(second, out, killed_at, signal.SIGINT)
    log = (tmp_path / "second.log").read_text()
    assert f"resuming from epoch {killed_at + 1} of {RESUME_EPOCHS}" in log
    assert second.returncode == 130, log[-2000:]
    hint = [line for line in log.splitlines() if line.startswith("interrupted:")]
    assert len(hint) == 1 and "rerun the same command to resume" in hint[0] and "--fresh" in hint[0]
    interrupted_at = _backup_epoch(out)
    assert killed_at < interrupted_at < RESUME_EPOCHS

    # 3. Once more: it resumes again and finishes in the same run directory.
    third = _start(imdb_dir, out, tmp_path / "third.log")
    assert third.wait(timeout=300) == 0, (tmp_path / "third.log").read_text()[-2000:]
    third_log = (tmp_path / "third.log").read_text()
    assert f"resuming from epoch {interrupted_at + 1} of {RESUME_EPOCHS}" in third_log

    run = _only_run_dir(out)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["started_at_epoch"] == interrupted_at + 1
    # Keras really skipped the restored epochs ...
    assert info["epochs_run_this_session"] == RESUME_EPOCHS - interrupted_at
    assert not (run / "backup").exists()  # removed once fit completed
    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == list(range(RESUME_EPOCHS))
    # ... and restored weights, optimizer, shuffle order and dropout seeds: on a CPU every
    # epoch and the test metrics equal the uninterrupted run's exactly.
    with (reference_run.run_dir / "history.csv").open() as f:
        assert rows == list(csv.DictReader(f))
    assert json.loads((run / "metrics.json").read_text()) == reference_run.metrics


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(imdb_dir, tmp_path, reference_run):
    cfg = load_config(None, _resume_overrides(imdb_dir, tmp_path))
    again = train(cfg, export=False)
    assert again.run_dir != reference_run.run_dir
    assert again.metrics == reference_run.metrics  # exactly: deterministic ops, seeded shuffles
    histories = [(run / "history.csv").read_text() for run in (again.run_dir, reference_run.run_dir)]
    assert histories[0] == histories[1]


def test_tidy_history_keeps_one_row_per_completed_epoch(tmp_path):
    path = tmp_path / "history.csv"
    # Epoch 1 logged twice (killed before its backup, then rerun) and epoch 2 half-written.
    path.write_text("epoch,loss,val_loss\n0,0.9,0.8\n1,0.7,0.6\n1,0.5,0.4\n2,0.3\n")
    tidy_history(path, epochs_done=2)
    assert path.read_text().splitlines() == ["epoch,loss,val_loss", "0,0.9,0.8", "1,0.5,0.4"]
    tidy_history(path, epochs_done=0)
    assert path.read_text().splitlines() == ["epoch,loss,val_loss"]
