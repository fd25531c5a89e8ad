"""Writing a file so that no reader (nor a rerun after a kill) ever sees half of it.

Every writer in the pipeline goes through `atomic_path`: the content goes to a temporary
name in the target's own folder (so the rename never crosses a file system), and only a
complete file is renamed over the target with `os.replace`, which is all or nothing. A
failed write removes its temporary file; one left by `kill -9` is hidden (a leading dot)
and carries the writer's pid.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write to, renamed over `path` when the block succeeds.

    `suffix` ends the temporary name, for writers that pick a format by extension (Keras'
    `.weights.h5`, NumPy's `.npz`). `fsync`: flush the file to disk before the rename, for
    files that must survive a power cut as well as a kill.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    """`Path.write_text` (UTF-8), all or nothing."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`shutil.copyfile`, all or nothing: `dst` is the old file or the whole copy."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
