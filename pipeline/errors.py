"""The errors every stage raises and the CLI reports, and the record of a stop signal.

No TensorFlow and no other pipeline module here: the CLI catches every stage's error and
reads the stop signal without loading a stage.
"""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A failure the user can act on (bad data, a failed export check, ...): one line, exit 1."""


class DataError(PipelineError):
    """Data that cannot be read; the message says what to do (`pipeline.data` and its sources)."""


class ExportError(PipelineError):
    """The export could not be written or did not pass its reload check; nothing was published."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key: exit 2."""


_stop_signal: int | None = None


def record_stop(signum: int | None) -> None:
    """Note the signal (SIGINT, SIGTERM) that asked this process to stop; None forgets it."""
    global _stop_signal
    _stop_signal = signum


def stop_signal() -> int | None:
    """The signal that asked this process to stop, if one has.

    The KeyboardInterrupt raised for it can come out as another error: when it lands while
    TensorFlow builds a Python exception in C++ (the OutOfRangeError that ends every epoch),
    pybind11 raises a RuntimeError instead. An error after a stop was asked is the stop.
    """
    return _stop_signal
