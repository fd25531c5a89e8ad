"""pipeline/runs.py: run directories and locks, the run record; and through `train`, the statuses
a run goes through (failed, trained -> export, finished) and its resume across sessions (after
SIGKILL and Ctrl-C: the same history and metrics). The resume state unit by unit:
test_resume.py."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import pipeline.train
from pipeline import runs
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.runs import (
    DirLock,
    RunBusyError,
    adopt_run,
    open_run,
)
from pipeline.train import train
from tests.helpers import RESUME_EPOCHS, RESUME_EXTRA, StopAt, tiny_overrides
from tests.test_fingerprint import fp_of

ROOT = Path(__file__).resolve().parents[1]


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


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
    fp = fp_of(tiny_cfg)
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


def test_an_adopted_run_is_a_copy_marked_trained_that_a_rerun_resumes(tiny_cfg, tmp_path):
    source_cfg = tiny_cfg.model_copy(update={"name": "searched", "runs_dir": str(tmp_path / "search")})
    with open_run(source_cfg, "aaaaaaaaaa", fresh=False) as searched:
        (searched.dir / "history.csv").write_text("epoch,val_accuracy\n0,0.5\n")
        (searched.dir / "backup").mkdir()
        searched.update(status="finished", trainable_params=7)
    fp = fp_of(tiny_cfg)
    adopted = adopt_run(searched.dir, tiny_cfg, fp, adopted_from=str(searched.dir))
    assert adopted.parent == Path(tiny_cfg.runs_dir) / tiny_cfg.name and adopted.name.endswith(fp)
    record = json.loads((adopted / "run.json").read_text())
    assert (record["status"], record["fingerprint"], record["adopted_from"], record["trainable_params"]) == (
        "trained", fp, str(searched.dir), 7)
    assert (adopted / "history.csv").read_text() == (searched.dir / "history.csv").read_text()
    assert not (adopted / "backup").exists() and not (adopted / ".lock").exists()
    assert json.loads((searched.dir / "run.json").read_text())["status"] == "finished"  # untouched
    assert [p.name for p in adopted.parent.iterdir()] == [adopted.name]  # no temp folder left
    with open_run(tiny_cfg, fp, fresh=False) as run:
        assert (run.dir, run.resumed, run.status) == (adopted, True, "trained")


def test_pipeline_error_marks_a_training_run_failed_but_not_a_trained_one(tiny_cfg):
    fp = fp_of(tiny_cfg)
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
    with pytest.raises(DataError), open_run(tiny_cfg, fp_of(tiny_cfg), fresh=False) as run:
        raise DataError("cannot load 'imdb_reviews': RuntimeError")
    assert json.loads((run.dir / "run.json").read_text())["status"] == "running"


def test_a_held_run_is_refused_with_one_line_naming_dir_and_pid(tiny_cfg):
    fp = fp_of(tiny_cfg)
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
    with open_run(cfg, fp_of(cfg), fresh=False) as live:  # as a first `train` would hold it
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


def test_tuning_folder_is_refused_while_held(imdb_dir, tmp_path):
    from pipeline import tune

    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path))
    out = tune.output_dir(cfg)
    with DirLock(out.parent / f".{out.name}.lock", "tuning"):
        with pytest.raises(RunBusyError, match=f"tuning folder {out}.*pid {os.getpid()}"):
            tune.run_search(cfg)
    assert not out.exists()  # refused before anything was written


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
