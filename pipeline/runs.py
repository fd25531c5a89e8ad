"""Run bookkeeping: run directories and their locks, the run record and JSON state. A run's
name comes from `pipeline.fingerprint`; the resume state that Keras' own backup leaves out
is `pipeline.resume`'s.

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

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline import atomic
from pipeline.config import Config
from pipeline.errors import PipelineError, stop_signal

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


class RunBusyError(PipelineError):
    """Another live process holds the run (or tuning) directory."""


class ResumeError(PipelineError):
    """The saved resume state does not fit the run being resumed."""


class RunNotFoundError(PipelineError):
    """No run of this config name got far enough for what was asked."""


# --- JSON state -----------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when it does not exist yet."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, obj: dict) -> None:
    """Write all or nothing, so a kill never leaves half a file."""
    atomic.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
        if not fresh and (run_dir := resumable_run(cfg, fp)) is not None:
            return _hold(run_dir, True, fp)
        run_dir = _new_run_dir(root, fp)
        run_dir.mkdir()
        return _hold(run_dir, False, fp)


def resumable_run(cfg: Config, fp: str) -> Path | None:
    """The newest run of fingerprint `fp` that a rerun resumes (running or trained), if any."""
    for run_dir in sorted((Path(cfg.runs_dir) / cfg.name).glob(f"[!.]*-{fp}"), reverse=True):
        if read_json(run_dir / RUN_FILE).get("status") in RESUMABLE:  # not worker temps
            return run_dir
    return None


def _new_run_dir(root: Path, fp: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{stamp}-{fp}"
    suffix = 1
    while run_dir.exists():  # two runs started in the same second
        run_dir = root / f"{stamp}.{suffix}-{fp}"
        suffix += 1
    return run_dir


def taught_by(run: dict, teacher_dir: Path | str | None) -> bool:
    """Whether the run record `run` learned from the teacher run `teacher_dir` (None: any)."""
    return teacher_dir is None or run.get("distill", {}).get("from") == str(teacher_dir)


def adopt_run(source: Path, cfg: Config, fp: str, status: str = "trained", **record) -> Path:
    """A copy of the finished run `source` as a run of `cfg` with fingerprint `fp`, marked
    `status`: `trained`, so that a rerun of `cfg` resumes it at its evaluation, or `finished`;
    `record` joins its run.json. Copied under a hidden name and renamed: a kill leaves no half
    run behind."""
    root = Path(cfg.runs_dir) / cfg.name
    with _FolderLock(root):
        run_dir = _new_run_dir(root, fp)
        tmp = root / f".adopting-{fp}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(LOCK_FILE, BACKUP_DIR, METRICS_FILE,
                                                                   EXPORT_FILE))
        write_json(tmp / RUN_FILE, read_json(tmp / RUN_FILE) | record | {"status": status,
                                                                         "fingerprint": fp})
        tmp.rename(run_dir)
    return run_dir


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
