from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.helpers import files_overrides, review_rows, write_table

ROOT = Path(__file__).resolve().parents[1]


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml", "gpu.yaml", "example-files.yaml"])
def test_shipped_configs_load_with_every_value_they_set(name):
    path = ROOT / "configs" / name
    resolved = load_config(path).to_dict()
    given = dict(_leaves(yaml.safe_load(path.read_text())))
    assert given  # every profile sets something
    for key, value in given.items():
        node = resolved
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_the_readmes_own_data_command_trains_on_one_csv(tmp_path):
    from pipeline.data import DataError
    from pipeline.rounds import train_rounds
    from pipeline.train import train

    reviews = write_table(tmp_path / "reviews.csv", review_rows(60, labels=("bad", "good")))
    tiny = [o for o in files_overrides(reviews, tmp_path) if not o.startswith("data.")]
    # README "Your own data": the example profile with only the training file given
    cfg = load_config(ROOT / "configs" / "example-files.yaml", [*tiny, f"data.train_files={reviews}"])
    result = train(cfg, export=False)
    assert result.metrics["confusion_matrix"]["labels"] == ["bad", "good"]
    # the default profile's teacher wants unlabelled reviews too, and says so before training
    default = load_config(ROOT / "configs" / "default.yaml", [*tiny, "name=d", "data.source=files",
                                                               f"data.train_files={reviews}"])
    with pytest.raises(DataError, match="need unlabelled reviews.*data.unlabelled_files"):
        train_rounds(default, export=False)
    assert not (tmp_path / "runs" / "d").exists()


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
    ("tune:\n  pick: annealing\n", "tune.pick"),
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


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../up", "my model", ""])
def test_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match=r"^name: must be a plain folder name"):
        load_config(None, [f"name={name!r}"])


def test_name_may_hold_dots_dashes_and_underscores():
    assert load_config(None, ["name=imdb_lstm-v1.2"]).name == "imdb_lstm-v1.2"


def test_duplicate_yaml_key_is_named(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 8\n  epochs: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "duplicate key 'epochs'" in message and "line 4" in message
    assert len(message.splitlines()) == 1


def test_duplicate_top_level_section_is_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  lstm_units: 8\ntrain:\n  batch_size: 8\n")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "duplicate key 'train'" in err[0]


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("x-base: &base {epochs: 3, batch_size: 8}\n")
    from pipeline.config import _yaml_load

    data = _yaml_load(path.read_text() + "train:\n  <<: *base\n  epochs: 4\n")
    assert data["train"] == {"epochs": 4, "batch_size": 8}


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(str(info.value).splitlines()) == 1 and "line" in str(info.value)


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_data_download_modes(mode):
    assert load_config(None, [f"data.download={mode}"]).data.download == mode


def test_data_download_rejects_other_values():
    with pytest.raises(ConfigError, match=r"data\.download"):
        load_config(None, ["data.download=sometimes"])
