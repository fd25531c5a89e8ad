import json
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import tiny_overrides


@pytest.mark.slow
def test_cli_train_end_to_end(imdb_dir, tmp_path, capsys):
    args = ["train"]
    for item in tiny_overrides(imdb_dir, tmp_path) + ["train.epochs=2"]:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "exported:" in out
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


def test_module_entry_point_help():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "train" in proc.stdout


def test_cli_unreadable_review_exits_nonzero_with_one_line(tmp_path, capsys):
    from tests.conftest import write_aclimdb

    root = write_aclimdb(tmp_path / "imdb", n_train=8, n_test=4)
    (root / "test" / "neg" / "7_1.txt").symlink_to(tmp_path / "gone.txt")
    args = ["train"]
    for item in tiny_overrides(root, tmp_path):
        args += ["--set", item]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "7_1.txt" in err[0] and "broken link" in err[0]
    assert not (tmp_path / "saved_models").exists()
