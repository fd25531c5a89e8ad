import json
import logging
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.distribute import WorkerBackupAndRestore
from pipeline.model import build_model
from pipeline.resume import (
    ResumableEarlyStopping,
    SeedStateBackup,
    best_so_far,
    restored_epoch,
    tidy_history,
)
from pipeline.runs import ResumeError


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
    assert best_so_far(history, "val_accuracy") == 0.7


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


def test_tidy_history_keeps_one_row_per_completed_epoch(tmp_path):
    path = tmp_path / "history.csv"
    # Epoch 1 logged twice (killed before its backup, then rerun) and epoch 2 half-written.
    path.write_text("epoch,loss,val_loss\n0,0.9,0.8\n1,0.7,0.6\n1,0.5,0.4\n2,0.3\n")
    tidy_history(path, epochs_done=2)
    assert path.read_text().splitlines() == ["epoch,loss,val_loss", "0,0.9,0.8", "1,0.5,0.4"]
    tidy_history(path, epochs_done=0)
    assert path.read_text().splitlines() == ["epoch,loss,val_loss"]
