"""pipeline/train.py across sessions: resume after SIGKILL and Ctrl-C, and same seed -> same metrics."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runs import tidy_history
from pipeline.train import train
from tests.conftest import RESUME_EPOCHS as EPOCHS
from tests.conftest import RESUME_EXTRA as EXTRA
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _overrides(imdb_dir: Path, out: Path) -> list[str]:
    # The config of conftest's `reference_run`: the uninterrupted run a resumed one must match.
    return tiny_overrides(imdb_dir, out) + EXTRA


def _start(imdb_dir: Path, out: Path, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline", "train", "--no-export"]
    for item in _overrides(imdb_dir, out):
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
    assert 1 <= killed_at < EPOCHS

    # 2. The same command resumes; Ctrl-C then stops it with a hint and exit code 130.
    second = _start(imdb_dir, out, tmp_path / "second.log")
    _stop_after_epoch(second, out, killed_at, signal.SIGINT)
    log = (tmp_path / "second.log").read_text()
    assert f"resuming from epoch {killed_at + 1} of {EPOCHS}" in log
    assert second.returncode == 130, log[-2000:]
    hint = [line for line in log.splitlines() if line.startswith("interrupted:")]
    assert len(hint) == 1 and "rerun the same command to resume" in hint[0] and "--fresh" in hint[0]
    interrupted_at = _backup_epoch(out)
    assert killed_at < interrupted_at < EPOCHS

    # 3. Once more: it resumes again and finishes in the same run directory.
    third = _start(imdb_dir, out, tmp_path / "third.log")
    assert third.wait(timeout=300) == 0, (tmp_path / "third.log").read_text()[-2000:]
    assert f"resuming from epoch {interrupted_at + 1} of {EPOCHS}" in (tmp_path / "third.log").read_text()

    run = _only_run_dir(out)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["started_at_epoch"] == interrupted_at + 1
    # Keras really skipped the restored epochs ...
    assert info["epochs_run_this_session"] == EPOCHS - interrupted_at
    assert not (run / "backup").exists()  # removed once fit completed
    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == list(range(EPOCHS))
    # ... and restored weights, optimizer, shuffle order and dropout seeds: on a CPU every
    # epoch and the test metrics equal the uninterrupted run's exactly.
    with (reference_run.run_dir / "history.csv").open() as f:
        assert rows == list(csv.DictReader(f))
    assert json.loads((run / "metrics.json").read_text()) == reference_run.metrics


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(imdb_dir, tmp_path, reference_run):
    cfg = load_config(None, _overrides(imdb_dir, tmp_path))
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
