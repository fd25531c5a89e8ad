import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.predict import resolve_version

ROOT = Path(__file__).resolve().parents[1]
# The CLI in a fresh process, reporting which heavy modules `predict` pulled in.
RUN_CLI = """
import json, sys
from pipeline.cli import main
rc = main(sys.argv[1:])
mods = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "pipeline"))
print("MODULES " + json.dumps(mods), file=sys.stderr)
sys.exit(rc)
"""


def _rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.strip().splitlines()]


def _check(row: dict, text: str) -> None:
    assert set(row) == {"text", "probability", "label"} and row["text"] == text
    assert type(row["probability"]) is float  # a JSON number, not a string or a list
    assert row["label"] == ("pos" if row["probability"] >= 0.5 else "neg")


def test_predict_texts_from_arguments_with_the_newest_version(trained_run, capsys):
    cfg, result = trained_run
    model_dir = Path(cfg.export.dir) / cfg.name
    newest = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    assert resolve_version(model_dir) == model_dir / str(newest)
    texts = ["A wonderful superb film!", "Awful boring waste.", ""]
    assert main(["predict", "--model", str(model_dir), *texts]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 3
    for row, text in zip(rows, texts, strict=True):
        _check(row, text)
    assert [rows[0]["label"], rows[1]["label"]] == ["pos", "neg"]  # separable tiny data


def test_predict_defaults_to_the_configs_export_and_takes_a_version(trained_run, capsys):
    cfg, result = trained_run
    overrides = [a for kv in (f"export.dir={cfg.export.dir}", f"name={cfg.name}") for a in ("--set", kv)]
    assert main(["predict", *overrides, "Great film."]) == 0
    by_config = _rows(capsys.readouterr().out)
    assert main(["predict", "--model", result.export.path, "Great film."]) == 0
    by_version = _rows(capsys.readouterr().out)
    assert by_config[0]["probability"] == pytest.approx(by_version[0]["probability"], abs=1e-6)


@pytest.mark.slow
def test_predict_lines_on_stdin_in_a_process_without_training_code(trained_run):
    _, result = trained_run
    stdin = b"A wonderful superb film!\n\nAwful boring waste.\r\n\xff\xfe not utf-8 \xe2\x9c\n"
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, "predict", "--model", result.export.path],
                          input=stdin, capture_output=True, cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    err = proc.stderr.decode()
    assert proc.returncode == 0, err[-2000:]
    rows = _rows(proc.stdout.decode())
    assert len(rows) == 3  # the blank line is skipped
    _check(rows[0], "A wonderful superb film!")
    _check(rows[1], "Awful boring waste.")
    _check(rows[2], "\ufffd\ufffd not utf-8 \ufffd")
    assert [rows[0]["label"], rows[1]["label"]] == ["pos", "neg"]
    mods = json.loads(err.split("MODULES ", 1)[1].splitlines()[0])
    # (`import tensorflow` itself loads keras here, so only our own training modules are checked.)
    assert not {"pipeline.train", "pipeline.model", "pipeline.export", "pipeline.vectorize"} & set(mods)


@pytest.mark.parametrize("layout", ["missing", "empty", "only_a_temp_folder"])
def test_predict_without_an_export_says_so(tmp_path, capsys, layout):
    model_dir = tmp_path / "saved_models" / "tiny"
    if layout != "missing":
        model_dir.mkdir(parents=True)
    if layout == "only_a_temp_folder":  # a half-written export is not a version
        (model_dir / ".tmp-export-abc").mkdir()
        (model_dir / "2").mkdir()
    assert main(["predict", "--model", str(model_dir), "Great film."]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "no exported model under" in err[0] and "make train" in err[0]
    assert captured.out == ""


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_predict_with_a_damaged_saved_model_says_so_in_one_line(trained_run, tmp_path, capsys, damage):
    import shutil

    _, result = trained_run
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(result.export.path, copy)
    pb = copy / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:100] if damage == "truncated" else b"\x00not a model\xff" * 10)
    assert main(["predict", "--model", str(copy), "Great film."]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"cannot load the exported model {copy}" in err[0]
    assert captured.out == ""


@pytest.mark.parametrize("stdin", [b"", b"\n  \n\r\n"])
def test_predict_with_empty_stdin_fails_in_one_line(stdin):
    # The model is never loaded: the input is checked first (no TensorFlow in this process either).
    proc = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model", "nowhere"],
                          input=stdin, capture_output=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "no reviews on stdin" in err[0]
    assert proc.stdout == b""


@pytest.mark.slow  # a fresh process that loads TensorFlow and the model
def test_predict_into_a_closed_pipe_is_a_quiet_exit(trained_run, tmp_path):
    # `imdb-pipeline predict ... | head -1`: the reader leaves after one line.
    _, result = trained_run
    reviews = tmp_path / "reviews.txt"
    reviews.write_bytes(b"A wonderful superb film!\n" * 20000)  # far more output than a pipe holds
    with reviews.open("rb") as stdin:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "predict", "--model",
                                 result.export.path], stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=ROOT)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert json.loads(first)["label"] == "pos"
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_predict_prints_the_users_label_names(files_run, capsys):
    _, result = files_run
    assert main(["predict", "--model", result.export.path, "A wonderful superb film!",
                 "Awful boring waste."]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [row["label"] for row in rows] == ["good", "bad"]
    assert rows[0]["probability"] >= 0.5 > rows[1]["probability"]
