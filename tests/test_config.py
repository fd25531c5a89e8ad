from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.cli import main
from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.embedding_dim > 0
    assert 0 < cfg.data.validation_fraction < 1


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["train.epochs=3", "model.bidirectional=false", "model.dropout=0.5"])
    assert (cfg.train.epochs, cfg.model.bidirectional, cfg.model.dropout) == (3, False, 0.5)


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(ValidationError):
        cfg.train.epochs = 5  # type: ignore[misc]


BAD = [
    ("train:\n  epochz: 3\n", "train.epochz"),
    ("train:\n  epochs: three\n", "train.epochs"),
    ("train:\n  batch_size: -8\n", "train.batch_size"),
    ("vectorize:\n  max_length: -5\n", "vectorize.max_length"),
    ("model:\n  lstm_units: -4\n", "model.lstm_units"),
    ("model:\n  embedding_dim: 0\n", "model.embedding_dim"),
    ("model:\n  lstm_units: 1.5\n", "model.lstm_units"),
    ("data:\n  validation_fraction: 1.0\n", "data.validation_fraction"),
    ("data:\n  validation_fraction: 0\n", "data.validation_fraction"),
    ("data:\n  validation_fraction: -0.2\n", "data.validation_fraction"),
    ("distribute:\n  strategy: tpu_pod\n", "distribute.strategy"),
    ("data:\n  source: directory\n", "data.directory"),
    ("tune:\n  embedding_dims: []\n", "tune.embedding_dims"),
    ("tune:\n  tuner: annealing\n", "tune.tuner"),
    ("tune:\n  embedding_dims: [16, 32.5]\n", "tune.embedding_dims"),
    ("colour: blue\n", "colour"),
    ("- just\n- a list\n", "top level"),
]


@pytest.mark.parametrize("text,key", BAD)
def test_bad_config_names_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


@pytest.mark.parametrize("text,key", BAD)
def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys, monkeypatch, text, key):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


def test_cli_missing_config_file_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "no/such.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no/such.yaml" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_bad_override_exits_2(capsys):
    assert main(["check-config", "--set", "train.epochs=-1"]) == 2
    assert "train.epochs" in capsys.readouterr().err
