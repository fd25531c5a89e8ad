"""What every process of the pipeline sets up first: its log lines, its stop signals, a quiet
TensorFlow import, and a stdout that may be closed under it (`| head`).

The CLI's process and the child that trains distillation's teacher (`pipeline.rounds`) log
alike and stop alike: SIGINT (Ctrl-C) and SIGTERM (kill, docker stop) unwind as a
KeyboardInterrupt, so a run saves its resume point and releases its lock on either.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings

from pipeline.errors import record_stop

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; kill and docker stop
STDOUT_CLOSED = 141  # 128 + SIGPIPE: what `yes | head -1` leaves for `yes`


def setup_logging(verbose: bool) -> None:
    """The pipeline's own INFO lines; libraries' only from WARNING up, unless `verbose`."""
    if not verbose:
        # Read once when TensorFlow loads, so it must be set before: hides its C++ start-up
        # lines (CPU features, CUDA probes, op attributes); failures still raise in Python.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # gensim (every lifecycle step), tensorflow (multi-worker collectives) and the rest log
    # at the root's level; ours is always shown.
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    # tfds warns through absl about folders it merely looked into ("Variant folder ... has no
    # dataset_info.json") while checking for a prepared copy.
    logging.getLogger("absl").setLevel(logging.NOTSET if verbose else logging.ERROR)
    # Keras' notes on every validation pass of a dataset without a known length.
    warnings.filterwarnings("ignore", message=".*(ran out of data|shuffle=True. was passed).*")


def is_verbose() -> bool:
    """Whether this process logs libraries' INFO lines (`setup_logging(True)`)."""
    return logging.getLogger().level == logging.INFO


def _on_stop_signal(signum, frame) -> None:
    # Raised where the program is, so SIGTERM unwinds (temp folders, child processes) as Ctrl-C
    # does; recorded, because TensorFlow may re-raise the interrupt as another error.
    record_stop(signum)
    raise KeyboardInterrupt()


def handle_stop_signals() -> dict:
    """Turn SIGINT and SIGTERM into a KeyboardInterrupt; returns the handlers it replaced.

    A SIGINT ignored from the start (a background job's child) stays ignored, as Python leaves it.
    """
    record_stop(None)
    if threading.current_thread() is not threading.main_thread():  # signal.signal's rule
        return {}
    handled = [sig for sig in STOP_SIGNALS
               if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL)]
    return {sig: signal.signal(sig, _on_stop_signal) for sig in handled}


def restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def import_tensorflow(verbose: bool) -> None:
    """Import TensorFlow, unless --verbose with stderr (fd 2) pointed at /dev/null meanwhile.

    Its C++ start-up lines (absl's InitializeLog notice, "Could not find cuda drivers") are
    printed during the import, before TF_CPP_MIN_LOG_LEVEL applies. An import that fails
    still raises, with its traceback, once stderr is back.
    """
    if verbose or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def flush_stdout() -> bool:
    """Flush now, where a closed pipe can be handled; False if the reader has gone."""
    try:
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        silence_stdout()
        return False
