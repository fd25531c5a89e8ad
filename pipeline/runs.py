"""Run bookkeeping: run directories and their locks, the run record, JSON state, the
fingerprint, and the resume state that Keras' own backup leaves out.

A run lives in `runs/<name>/<time>-<fingerprint>/`. One live process holds it (an OS lock,
released when the process ends however it ends); its record `run.json` says how far it got:

- `running`: training; a rerun of the same config resumes from the last completed epoch.
- `trained`: training finished, the best weights are saved; a rerun evaluates and exports
  without training again.
- `finished`: evaluated (and exported unless `--no-export`); a rerun starts a new run.
- `failed`: stopped by an error the user must fix (e.g. unreadable data); never resumed.

Nothing here imports a pipeline stage: stages import this module, never the other way.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import keras
import numpy as np

from pipeline import atomic
from pipeline.config import Config
from pipeline.errors import PipelineError, stop_signal

log = logging.getLogger(__name__)

# What a run directory holds.
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"  # holds the pid of the live process; the OS lock is what counts
VOCAB_FILE = "vocabulary.txt"
WEIGHTS_FILE = "model.weights.h5"
BEST_FILE = "checkpoints/best.weights.h5"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"
EXPORT_FILE = "export.json"
NGRAMS_FILE = "ngrams.npz"  # the fitted n-gram branch and its blend (ngrams.enabled)
BACKUP_DIR = "backup"
SEED_STATE_FILE = "seed_state.json"  # beside the Keras backup, deleted with it
# Keras' BackupAndRestore file names (double_checkpoint=True keeps a `.bkp` copy of each).
BACKUP_WEIGHTS = "latest.weights.h5"
BACKUP_METADATA = "training_metadata.json"

RESUMABLE = ("running", "trained")

# Config keys that do not change the trained weights: where files go (paths can move),
# how much is printed, how tuning searches and word2vec caches, and where tuned values
# came from (the values themselves count). The data's identity replaces its paths.
NOT_IN_FINGERPRINT = ("runs_dir", "export", "tune", "train.verbose", "pretrain.workers",
                      "pretrain.directory", "model.tuned_hparams", "data.data_dir", "data.directory",
                      "data.download", "data.train_files", "data.test_files", "data.unlabelled_files")
# Bumped when what a fingerprint means changes, so that no run, cache or search of the old
# meaning is resumed or reused as if it were of the new one.
FINGERPRINT_VERSION = 2


class RunBusyError(PipelineError):
    """Another live process holds the run (or tuning) directory."""


class ResumeError(PipelineError):
    """The saved resume state does not fit the run being resumed."""


class RunNotFoundError(PipelineError):
    """No run of this config name got far enough for what was asked."""


# --- JSON state and fingerprints ----------------------------------------------------------------


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when it does not exist yet."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, obj: dict) -> None:
    """Write all or nothing, so a kill never leaves half a file."""
    atomic.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fingerprint(obj: dict) -> str:
    """Short stable hash of a JSON-able dict (key order does not matter) and FINGERPRINT_VERSION."""
    versioned = {"fingerprint_version": FINGERPRINT_VERSION, "key": obj}
    return hashlib.sha256(json.dumps(versioned, sort_keys=True).encode()).hexdigest()[:10]


FILES_KEYS = ("train_files", "test_files", "unlabelled_files")  # paths: their data identity counts


def data_key(data: dict) -> dict:
    """A dumped DataConfig as fingerprints and cache names key it: without the files' paths."""
    return {k: v for k, v in data.items() if k not in FILES_KEYS}


def run_fingerprint(cfg: Config, data_identity: dict) -> str:
    """The run's identity: every config key that shapes the trained weights, and the data's."""
    d = cfg.to_dict()
    for key in NOT_IN_FINGERPRINT:
        section, _, name = key.rpartition(".")
        (d[section] if section else d).pop(name)
    d["data"] = data_key(d["data"])
    return fingerprint(d | {"data_identity": data_identity})


# --- locks --------------------------------------------------------------------------------------


class DirLock:
    """An exclusive OS lock (flock) on a file, held by this process until `release` or its end.

    The kernel drops the lock when the process dies, kill -9 included, so a lock is never
    stale; the pid written into the file only names the holder in the error.
    """

    def __init__(self, path: Path, what: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self._file.seek(0)
            pid = self._file.read().strip() or "unknown"
            self._file.close()
            raise RunBusyError(f"{what} is in use by another process (pid {pid}): wait for it to "
                               "finish or stop it; two processes never share it") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _FolderLock:
    """A short blocking flock on a folder itself, so that picking a run is one step."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(folder, os.O_RDONLY)

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        os.close(self._fd)


# --- run directories and the run record ---------------------------------------------------------


@dataclass
class Run:
    """One run directory held by this process, and its record (`run.json`).

    `update` is the only writer of the record. Use as a context manager: leaving it releases
    the lock (the process ending does too), and leaving it on a PipelineError while the run
    is still training marks it `failed`, so that no rerun resumes it (unless a stop signal came
    first: then the error is the interruption, and the rerun resumes).
    """

    dir: Path
    resumed: bool
    lock: DirLock
    record: dict = field(default_factory=dict)

    @property
    def status(self) -> str | None:
        return self.record.get("status")

    def update(self, **fields) -> None:
        self.record |= fields
        write_json(self.dir / RUN_FILE, self.record)

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if isinstance(exc, PipelineError) and self.status == "running" and stop_signal() is None:
                self.update(status="failed", error=str(exc))
        finally:
            self.close()


def code_commit() -> str | None:
    """The git commit of this code (`-dirty` if tracked files differ from it); None outside git."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        return None


def _hold(run_dir: Path, resumed: bool, fp: str) -> Run:
    lock = DirLock(run_dir / LOCK_FILE, f"run {run_dir}")
    run = Run(run_dir, resumed, lock, read_json(run_dir / RUN_FILE))
    if not resumed:  # the code and the command that started it, so a result names both
        run.update(status="running", fingerprint=fp, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   commit=code_commit(), command=sys.argv[1:])
    return run


def open_run(cfg: Config, fp: str, fresh: bool) -> Run:
    """Hold the newest resumable run of fingerprint `fp` (unless `fresh`), or a new one.

    A resumable run that another live process holds is refused (RunBusyError), never shared
    and never bypassed: the same command twice at once is a mistake, not two runs.
    """
    root = Path(cfg.runs_dir) / cfg.name
    with _FolderLock(root):  # a concurrent start sees this run's record once it has the lock
        if not fresh:
            for run_dir in sorted(root.glob(f"[!.]*-{fp}"), reverse=True):  # not worker temps
                if read_json(run_dir / RUN_FILE).get("status") in RESUMABLE:
                    return _hold(run_dir, True, fp)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = root / f"{stamp}-{fp}"
        suffix = 1
        while run_dir.exists():  # two runs started in the same second
            run_dir = root / f"{stamp}.{suffix}-{fp}"
            suffix += 1
        run_dir.mkdir()
        return _hold(run_dir, False, fp)


def open_worker_run(cfg: Config, fp: str, task: str, fresh: bool) -> Run:
    """Hold the scratch dir of multi-worker non-chief `task`: `.workertemp-<task>-<fp>`.

    It holds what the worker's callbacks write, its backup included, so its name is
    the same on a restart; the caller deletes it when the worker finishes.
    """
    work_dir = Path(cfg.runs_dir) / cfg.name / f".workertemp-{task}-{fp}"
    if fresh:
        shutil.rmtree(work_dir, ignore_errors=True)
    resumed = work_dir.is_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    return _hold(work_dir, resumed, fp)


def finished_run(cfg: Config, fp: str) -> Path | None:
    """The newest finished run of fingerprint `fp`, if any: what another run can build on."""
    for run_dir in sorted((Path(cfg.runs_dir) / cfg.name).glob(f"[!.]*-{fp}"), reverse=True):
        if read_json(run_dir / RUN_FILE).get("status") == "finished":
            return run_dir
    return None


def latest_finished_run(cfg: Config) -> Path:
    """The newest run directory of this model name whose training finished."""
    root = Path(cfg.runs_dir) / cfg.name
    for run_dir in sorted(root.glob("[!.]*-*"), reverse=True):
        if read_json(run_dir / RUN_FILE).get("status") in ("finished", "trained"):
            return run_dir
    raise RunNotFoundError(f"no finished run under {root}: run `make train` first")


# --- resume state -------------------------------------------------------------------------------


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
