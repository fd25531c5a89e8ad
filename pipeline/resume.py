"""Resume state: what a rerun needs to continue an interrupted fit exactly where it stopped,
beyond what Keras' own BackupAndRestore keeps.

`restored_epoch` says which epoch the backup resumes from, falling back to the copy before
it when the newest cannot be read; `tidy_history` drops history rows of epochs that will run
again and `best_so_far` reads the best monitored value back; `ResumableEarlyStopping` and
`SeedStateBackup` carry early stopping's count and the dropout seed states over a resume.
How a resume works and what it keeps: docs/resume.md.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import keras
import numpy as np

from pipeline import atomic
from pipeline.runs import BACKUP_METADATA, BACKUP_WEIGHTS, ResumeError, read_json, write_json

log = logging.getLogger(__name__)


def _history_rows(history: Path) -> list[dict]:
    if not history.is_file():
        return []
    with history.open(newline="") as f:
        return list(csv.DictReader(f))


def _monitored(history: Path, monitor: str) -> list[float]:
    return [float(row[monitor]) for row in _history_rows(history) if row.get(monitor)]


def best_so_far(history: Path, monitor: str) -> float | None:
    """Best monitored value in a resumed run's history, so a checkpoint is never downgraded."""
    values = _monitored(history, monitor)
    if not values:
        return None
    return min(values) if monitor.endswith("loss") else max(values)


def best_epoch_of(history: Path, monitor: str) -> tuple[int, int | None]:
    """(epochs in the history, the 1-based epoch with the best monitored value; None if none)."""
    values = _monitored(history, monitor)
    if not values:
        return 0, None
    best = (np.argmin if monitor.endswith("loss") else np.argmax)(values)
    return len(values), int(best) + 1


def tidy_history(history: Path, epochs_done: int) -> None:
    """Keep one row per completed epoch, dropping the rows of epochs that will be run again.

    A kill can land after CSVLogger wrote a row (or half a row) but before the
    backup recorded that epoch; the rerun epoch would otherwise appear twice.
    """
    if not history.is_file():
        return
    with history.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    if not fields:
        return
    kept: dict[int, dict] = {}
    for row in rows:
        epoch = row.get("epoch") or ""
        if epoch.isdigit() and int(epoch) < epochs_done and None not in row.values():
            kept[int(epoch)] = row  # the last complete row of an epoch wins
    with atomic.atomic_path(history) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept[e] for e in sorted(kept))


def _readable_h5(path: Path) -> bool:
    """Whether every dataset of an HDF5 weights file can be read (a cut-short file cannot)."""
    import h5py

    def read(_name, obj):
        if isinstance(obj, h5py.Dataset):
            obj[()]

    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
    except Exception:  # h5py raises OSError, KeyError, ValueError, RuntimeError alike
        return False
    return True


def restored_epoch(backup_dir: Path) -> int:
    """Epochs completed by the backup that `fit` will resume from (0 without one).

    When the newest copy cannot be read, the previous copy (weights and epoch) replaces it
    first, with a warning, so that the epoch counter, the shuffles skipped and the seed
    states restored all belong to the weights that are actually loaded.
    """
    weights, meta = backup_dir / BACKUP_WEIGHTS, backup_dir / BACKUP_METADATA
    prev_weights, prev_meta = backup_dir / f"{BACKUP_WEIGHTS}.bkp", backup_dir / f"{BACKUP_METADATA}.bkp"
    if weights.is_file() and not _readable_h5(weights):
        if not prev_weights.is_file() or not _readable_h5(prev_weights):
            raise ResumeError(f"the backup {weights} cannot be read and there is no readable "
                              "copy before it: start over with --fresh")
        log.warning("the latest backup %s cannot be read; resuming from the copy before it", weights)
        atomic.copy_file(prev_weights, weights)
        if prev_meta.is_file():
            atomic.copy_file(prev_meta, meta)
        else:  # the previous copy predates the first epoch's record
            meta.unlink(missing_ok=True)
    return int(read_json(meta).get("epoch", 0))


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that carries its best value and patience count over a resume."""

    def __init__(self, history: Path, **kwargs):
        super().__init__(**kwargs)
        self._history = history

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # Replay the finished epochs, so a resumed run stops where an uninterrupted one would.
        for epoch, value in enumerate(_monitored(self._history, self.monitor)):
            self.wait += 1
            if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
                self.best, self.best_epoch, self.wait = value, epoch, 0


class SeedStateBackup(keras.callbacks.Callback):
    """Backs up the dropout seed states each epoch and restores them on a resume.

    BackupAndRestore's weights file leaves SeedGenerator states out, so a resumed run
    would draw other dropout masks than an uninterrupted one. The states are kept per
    completed epoch (the last three), so they match whichever backup copy the resume loads,
    the previous one included. Saved states that do not fit the model raise ResumeError.
    """

    def __init__(self, path: Path):
        super().__init__()
        self._path = path
        self._restored = False

    def _states(self) -> list:
        weights = {id(v) for v in self.model.weights}
        return [v for v in self.model.variables
                if id(v) not in weights and v.path.endswith("seed_generator_state")]

    def on_train_begin(self, logs=None):
        self._restored = False

    def on_epoch_begin(self, epoch, logs=None):
        # The first epoch of a session is the one the backup resumed at, whatever decided it.
        if self._restored:
            return
        self._restored = True
        states = self._states()
        saved = read_json(self._path).get(str(epoch))
        if saved is None:
            if epoch > 0 and states:
                log.warning("no saved dropout seed states for epoch %d in %s: the resumed run "
                            "draws other dropout masks than an uninterrupted one", epoch + 1, self._path)
            return
        shapes = [tuple(var.shape) for var in states]
        if [np.shape(value) for value in saved] != shapes:
            raise ResumeError(f"{self._path}: the saved seed states of epoch {epoch + 1} "
                              f"({[np.shape(v) for v in saved]}) do not fit the model's ({shapes}): "
                              "start over with --fresh")
        for var, value in zip(states, saved, strict=True):
            var.assign(np.asarray(value, dtype=var.dtype))

    def on_epoch_end(self, epoch, logs=None):
        saved = {k: v for k, v in read_json(self._path).items() if int(k) >= epoch - 1}
        saved[str(epoch + 1)] = [np.asarray(var).tolist() for var in self._states()]
        self._path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self._path, saved)
