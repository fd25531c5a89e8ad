"""pipeline/rounds.py: the served teacher's round runs in a process of its own, and what
happens there (an error, a stop) comes back to the process that asked for it."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.rounds import train_rounds
from pipeline.runs import LOCK_FILE
from tests.helpers import make_review, tiny_overrides, write_aclimdb

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each test starts a fresh interpreter that imports TensorFlow


@pytest.fixture(scope="module")
def unsup_dir(tmp_path_factory) -> Path:
    root = write_aclimdb(tmp_path_factory.mktemp("aclImdb_unsup"), seed=1)
    rng = random.Random(7)
    (root / "train" / "unsup").mkdir()
    for i in range(40):
        (root / "train" / "unsup" / f"{i}_0.txt").write_text(make_review(rng, i % 2))
    return root


def _served(root: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(root, out) + ["distill.enabled=true", "distill.teacher=served",
                                        f"pretrain.directory={out / 'pretrained'}", *extra]


def test_an_error_in_the_teachers_process_comes_back_as_itself(unsup_dir, tmp_path):
    empty = tmp_path / "vectors.txt"
    empty.write_text("")
    cfg = load_config(None, _served(unsup_dir, tmp_path, "model.embedding_init=file",
                                    f"model.embedding_file={empty}"))
    with pytest.raises(DataError, match=r"vectors.txt: no vectors found"):
        train_rounds(cfg, export=False)
    teacher = next((tmp_path / "runs" / "tiny-teacher").iterdir())
    record = json.loads((teacher / "run.json").read_text())
    assert record["status"] == "failed" and "no vectors found" in record["error"]
    assert not (tmp_path / "runs" / "tiny").exists()  # the student never started


def test_sigterm_to_the_parent_stops_the_teacher_resumably_and_leaves_no_process(unsup_dir, tmp_path):
    overrides = _served(unsup_dir, tmp_path, "train.epochs=500", "train.early_stopping_patience=500")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--no-export",
         *[arg for o in overrides for arg in ("--set", o)]],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # a background job's child inherits an ignored SIGINT; give it a terminal's
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        teachers = tmp_path / "runs" / "tiny-teacher"
        deadline = time.monotonic() + 240
        history = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(teachers.glob("*/history.csv")) if teachers.is_dir() else []
            if found and len(found[0].read_text().splitlines()) >= 3:  # the header and two epochs
                history = found[0]
                break
            time.sleep(0.2)
        assert history is not None, "the teacher never trained two epochs"
        child = int((history.parent / LOCK_FILE).read_text())
        assert child != proc.pid
        proc.send_signal(signal.SIGTERM)  # to the parent alone, as `kill <pid>` does
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    with pytest.raises(ProcessLookupError):  # the teacher's process went with it
        os.kill(child, 0)
    record = json.loads((history.parent / "run.json").read_text())
    assert record["status"] == "running"  # interrupted, not failed: a rerun resumes it
    assert (history.parent / "backup").is_dir()
