"""A lever on the distilled BiLSTM, measured on the second round alone: one finished teacher run.

    TFDS_DATA_DIR=<prepared tfds folder> .venv/bin/python benchmarks/student_levers.py \
        TEACHER_RUN_DIR NAME [key=value ...]

A full `make train` trains the teacher round with the same settings as the student, so a
change to the model costs both rounds (about 35 minutes here). This script keeps one finished
teacher run (its served scores of the unlabelled reviews, `teacher_scores.npz`, are reused) and
trains only a student of configs/default.yaml with the overrides, under runs/<NAME>/, so each
lever costs one round. A lever that wins here is then confirmed with the full two rounds.
Prints the student's test figures: the BiLSTM alone and served.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline import train as train_mod  # noqa: E402
from pipeline.cli import setup_logging  # noqa: E402
from pipeline.config import load_config  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def main(teacher_dir: Path, name: str, overrides: list[str]) -> None:
    if not (teacher_dir / "run.json").is_file():
        sys.exit(f"error: {teacher_dir} is not a run folder (no run.json)")
    setup_logging(verbose=False)
    cfg = load_config(CONFIG, [f"name={name}", *overrides])

    def fixed_teacher(cfg, provenance):  # the given run teaches, whatever the student's settings
        train_mod.served_teacher(cfg, teacher_dir)
        return teacher_dir

    train_mod.first_round = fixed_teacher
    result = train_mod.train(cfg, export=False)
    m = result.metrics
    print(json.dumps({"name": name, "overrides": overrides, "run": str(result.run_dir),
                      "served_accuracy": m["accuracy"], "served_auc": m["auc"],
                      "lstm_accuracy": m["lstm"]["accuracy"], "lstm_auc": m["lstm"]["auc"]}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3:])
