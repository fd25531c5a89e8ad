import json
import logging
import os
import signal
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS, INTERRUPT_HINT, main
from pipeline.process import setup_logging
from tests.helpers import ctrl_c_inside_tensorflow, damage, tiny_overrides, tiny_tfds, write_aclimdb


@pytest.mark.slow
def test_cli_train_end_to_end(imdb_dir, tmp_path, capsys):
    args = ["train"]
    for item in tiny_overrides(imdb_dir, tmp_path) + ["train.epochs=2", "ngrams.enabled=true"]:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "exported:" in out
    metrics = json.loads(next((tmp_path / "runs" / "tiny").glob("*/metrics.json")).read_text())
    # the served model is a blend, so the summary gives each part alone, the BiLSTM first
    assert f"alone: BiLSTM accuracy {metrics['lstm']['accuracy']:.4f}" in out
    version = tmp_path / "saved_models" / "tiny" / "1"
    assert (version / "saved_model.pb").is_file()
    # `export` re-exports the latest finished run as version 2.
    assert main(["export"] + [a for item in tiny_overrides(imdb_dir, tmp_path)
                              for a in ("--set", item)]) == 0
    assert (tmp_path / "saved_models" / "tiny" / "2" / "saved_model.pb").is_file()
    runs = list((tmp_path / "runs" / "tiny").iterdir())
    assert len(runs) == 1
    assert json.loads((runs[0] / "export.json").read_text())["version"] == 2


def test_cli_data_error_exits_nonzero_and_exports_nothing(tmp_path, capsys):
    args = ["train", "--set", f"runs_dir={tmp_path / 'runs'}",
            "--set", f"export.dir={tmp_path / 'saved'}",
            "--set", "data.source=directory", "--set", f"data.directory={tmp_path / 'missing'}"]
    assert main(args) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not Path(tmp_path / "saved").exists()
    assert not Path(tmp_path / "runs").exists()  # the data is loaded before a run folder is made


def test_module_entry_point_help():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "train" in proc.stdout


def test_cli_unreadable_review_exits_nonzero_with_one_line(tmp_path, capsys):
    root = write_aclimdb(tmp_path / "imdb", n_train=8, n_test=4)
    (root / "test" / "neg" / "7_1.txt").symlink_to(tmp_path / "gone.txt")
    args = ["train"]
    for item in tiny_overrides(root, tmp_path):
        args += ["--set", item]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "7_1.txt" in err[0] and "broken link" in err[0]
    assert not (tmp_path / "saved_models").exists()


ROOT = Path(__file__).resolve().parents[1]
# `python -m pipeline ...`, reporting on stdout whether TensorFlow was imported.
RUN_MODULE = """
import runpy, sys
sys.argv = ["pipeline", *sys.argv[1:]]
try:
    runpy.run_module("pipeline", run_name="__main__")
finally:
    print("TENSORFLOW_IMPORTED" if "tensorflow" in sys.modules else "NO_TENSORFLOW")
"""


def test_config_error_comes_before_tensorflow():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", RUN_MODULE, "train", "--set", "bogus=1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["config error: bogus: unknown key"]
    assert proc.stdout.strip() == "NO_TENSORFLOW"


def test_export_and_the_side_commands_never_load_the_training_spine():
    import subprocess
    import sys

    # The modules behind `export`, `bench`, `gpu-check`, `results` and `tune`, in a fresh interpreter.
    code = ("import sys, pipeline.cli, pipeline.export, pipeline.bench, pipeline.gpu_check, "
            "pipeline.results, pipeline.tune; "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = proc.stdout.strip().splitlines()[-1]
    assert "'pipeline.export'" in loaded and "'pipeline.train'" not in loaded


def _parsed_overrides(*sets: str) -> list[str]:
    from pipeline.cli import build_parser
    from pipeline.commands import overrides

    return overrides(build_parser().parse_args(["check-config", *(a for s in sets for a in ("--set", s))]))


def test_set_splits_pairs_and_keeps_spaces_in_values():
    assert _parsed_overrides("train.epochs=3 model.dropout=0.5") == ["train.epochs=3", "model.dropout=0.5"]
    assert _parsed_overrides("data.directory=/my reviews/aclImdb") == ["data.directory=/my reviews/aclImdb"]
    assert _parsed_overrides("data.directory='/a  b' train.epochs=2") == ["data.directory=/a  b",
                                                                           "train.epochs=2"]
    assert _parsed_overrides('data.directory="x=y z"') == ["data.directory=x=y z"]


def test_set_value_with_spaces_reaches_the_config(capsys):
    assert main(["check-config", "--set", "data.directory=/my reviews", "--set",
                 "data.data_dir='/two  spaces' train.epochs=3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["data"]["directory"] == "/my reviews" and cfg["data"]["data_dir"] == "/two  spaces"
    assert cfg["train"]["epochs"] == 3


def test_set_with_an_unmatched_quote_is_a_config_error(capsys):
    assert main(["check-config", "--set", "data.directory='/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No closing quotation" in err[0]


def _sigterm_caught(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (15 - 1)))
    return False


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_is_handled_like_ctrl_c(sig, code):
    import subprocess
    import sys
    import time

    # `predict` waits on stdin for its first review before loading anything: a quiet place to stop.
    # A child started from a background job inherits an ignored SIGINT (POSIX), and Python then
    # installs no Ctrl-C handler: give it the disposition a terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "predict", "--model", "nowhere"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not _sigterm_caught(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert err.strip().splitlines() == [INTERRUPT_HINT]


def test_ctrl_c_that_tensorflow_reraises_as_another_error_is_still_an_interruption(monkeypatch, capsys,
                                                                                    default_sigint):
    with pytest.raises(RuntimeError, match="REPLACED BY KeyboardInterrupt"):  # what main meets
        ctrl_c_inside_tensorflow(monkeypatch)

    monkeypatch.setitem(COMMANDS, "predict", lambda args: ctrl_c_inside_tensorflow(monkeypatch))
    assert main(["predict", "--model", "nowhere"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [INTERRUPT_HINT]
    # The next call in this process starts with no stop recorded: its errors are errors again.
    assert main(["check-config", "--set", "no.such_key=1"]) == 2


def test_tensorflow_start_up_lines_are_hidden():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model", "nowhere", "x"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [  # TensorFlow was loaded, and said nothing
        "error: no exported model under nowhere: run `make train` (or `make export`) first, "
        "or pass --model saved_models/<name>[/<N>]"]


def test_library_info_logs_only_with_verbose():
    root = logging.getLogger()
    before = root.level, logging.getLogger("absl").level
    try:
        setup_logging(verbose=False)
        assert logging.getLogger("pipeline.train").isEnabledFor(logging.INFO)
        for chatty in ("gensim.models.word2vec", "tensorflow", "absl"):
            assert not logging.getLogger(chatty).isEnabledFor(logging.INFO), chatty
        assert logging.getLogger("tensorflow").isEnabledFor(logging.WARNING)
        setup_logging(verbose=True)
        assert logging.getLogger("gensim.models.word2vec").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(before[0])
        logging.getLogger("absl").setLevel(before[1])


def test_verbose_is_accepted_before_and_after_the_command():
    from pipeline.cli import build_parser

    assert build_parser().parse_args(["--verbose", "check-config"]).verbose is True
    assert build_parser().parse_args(["check-config", "-v"]).verbose is True
    assert getattr(build_parser().parse_args(["check-config"]), "verbose", False) is False


def test_damaged_tfds_data_stops_before_training_with_one_line(tmp_path, capsys):
    bad = tiny_tfds(tmp_path / "tfds")
    damage(bad, "truncated")
    capsys.readouterr()  # tfds's progress bars while preparing
    args = ["train"]
    for item in tiny_overrides(tmp_path, tmp_path)[:3] + [
            "data.source=tfds", "data.tfds_name=tiny_reviews", f"data.data_dir={tmp_path / 'tfds'}",
            "data.download=never"]:
        args += ["--set", item]
    assert main(args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "damaged" in err[0]
    assert "Epoch" not in captured.out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "saved_models").exists()


def _unbalanced(path: Path) -> None:
    path.write_text('text,label\nA fine film,pos\n"Never closed,neg\nDull,neg\nGreat,pos\n')


BAD_TABLES = {  # what is wrong -> (how the file is written, overrides, what the one line says)
    "missing file": (None, [], r"data.train_files: '.*reviews.csv' does not exist"),
    "missing column": ("rows", ["data.text_column=review"],
                       r"no column 'review' \(columns found: 'text', 'label'\)"),
    "one class": ("one", [], r"has 1 class\(es\) \('pos': 8 rows\): exactly two are needed"),
    "three classes": ("three", [], r"has 3 values where two are needed: 'neg': 3, 'pos': 3 rows, and 'meh' "
                                   r"\(2 row\(s\), first at .*reviews.csv line 4\); a model here learns two"),
    "case variant": ("case", [], r"'pos' and 'POS' differ only in case: write each label one way$"),
    "unquoted comma": ("comma", [], r"reviews.csv: line 10: 3 fields where the header has 2: a text with an "
                                    r"unquoted comma\? Quote the field"),
    "a class too small": ("tiny", [], r"the class 'pos' has 2 row\(s\), too few to put one in each of train, "
                                      r"validation, test: each class needs at least 3"),
    "CR line endings": ("cr", [], r"reviews.csv: its lines end in CR alone"),
    "UTF-16": ("utf16", [], r"reviews.csv: the file is UTF-16 text"),
    "no rows": ("header", [], r"reviews.csv: no rows \(only a header\)"),
    "empty text": ("empty", [], r"1 row\(s\) with an empty 'text' and 1 row\(s\) with an empty "
                                r"'label' \(the first: .*line 10\).*skip_bad_rows"),
    "unbalanced quotes": ("quotes", [], r"reviews.csv: line 3: unbalanced quotes"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_table_is_one_line_exit_1_and_no_run_folder(tmp_path, capsys, case):
    import re

    from tests.helpers import files_overrides, review_rows, write_table

    how, extra, message = BAD_TABLES[case]
    path = tmp_path / "reviews.csv"
    rows = {"rows": review_rows(8), "one": review_rows(8, ("pos",)),
            "three": review_rows(8, ("neg", "pos", "meh")),
            "case": review_rows(8) + [{"text": "x", "label": "POS"}],
            "tiny": review_rows(40, ("neg",)) + review_rows(2, ("pos",)),
            "empty": review_rows(8) + [{"text": "", "label": "pos"}, {"text": "x", "label": " "}]}
    if how == "header":
        path.write_text("text,label\n")
    elif how == "quotes":
        _unbalanced(path)
    elif how == "comma":
        write_table(path, review_rows(8))
        path.write_text(path.read_text() + "the, film was great,pos\n")
    elif how in ("cr", "utf16"):
        write_table(path, review_rows(8))
        content = path.read_text().replace("\r\n", "\n")
        path.write_bytes(content.replace("\n", "\r").encode() if how == "cr" else content.encode("utf-16"))
    elif how is not None:
        write_table(path, rows[how])
    args = ["train"]
    for item in files_overrides(path, tmp_path, *extra):
        args += ["--set", item]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "saved_models").exists()


def test_a_data_error_is_the_only_line_on_stderr(tmp_path):
    import subprocess
    import sys

    from tests.helpers import files_overrides, review_rows, write_table

    path = write_table(tmp_path / "reviews.csv", review_rows(8, ("neg", "pos", "meh")))
    args = [a for item in files_overrides(path, tmp_path) for a in ("--set", item)]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # no strategy or other log line before it
    assert proc.stderr.startswith("error: data.train_files: the label column 'label' has 3 values")


def test_six_rows_train_with_the_blend_and_print_the_users_label_names(tmp_path, capsys):
    from tests.helpers import files_overrides, review_rows, write_table

    path = write_table(tmp_path / "reviews.csv", review_rows(6, ("good", "bad")))  # 3 of each
    args = ["train", "--no-export"]
    for item in files_overrides(path, tmp_path, "data.labels=[good,bad]", "ngrams.enabled=true",
                                "ngrams.min_df=1"):
        args += ["--set", item]
    assert main(args) == 0  # the blend is fitted on a validation split that holds both classes
    out = capsys.readouterr().out
    metrics = json.loads(next((tmp_path / "runs" / "tiny").glob("*/metrics.json")).read_text())
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["rows_true_cols_pred"]
    assert metrics["confusion_matrix"]["labels"] == ["good", "bad"] and metrics["examples"] == 2
    assert f"confusion (true x pred): good [{tn} {fp}]  bad [{fn} {tp}]" in out


def test_a_test_split_of_one_class_has_no_auc_and_says_so(monkeypatch, capsys):
    import numpy as np

    import pipeline.rounds
    from pipeline.scoring import metrics_of
    from pipeline.train import RunResult

    metrics = metrics_of(np.array([0.9, 0.2, 0.7]), np.array([1, 1, 1]), ("bad", "good"))
    assert metrics["auc"] is None and json.loads(json.dumps(metrics))["auc"] is None  # recorded as null
    monkeypatch.setattr(pipeline.rounds, "train_rounds", lambda *a, **k: RunResult(Path("r"), metrics, None))
    assert main(["train"]) == 0
    out = capsys.readouterr().out
    assert "auc undefined" in out
    assert "auc: undefined, the test split holds one class (recorded as null)" in out
    assert "confusion (true x pred): bad [0 0]  good [1 2]" in out


def test_train_waits_for_a_served_teachers_round_without_tensorflow(imdb_dir, tmp_path):
    import subprocess
    import sys

    # The teacher's round, stood in for: it reports what the waiting process has loaded.
    served = tiny_overrides(imdb_dir, tmp_path) + ["distill.enabled=true", "distill.teacher=served"]
    overrides = [a for o in served for a in ("--set", o)]
    code = ("import sys; from pipeline import rounds; from pipeline.cli import main\n"
            "def child(target, args, what):\n"
            "    print('tensorflow loaded:', 'tensorflow' in sys.modules); sys.exit(0)\n"
            "rounds.run_in_child = child\n"
            f"main(['train', *{overrides!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "tensorflow loaded: False"
