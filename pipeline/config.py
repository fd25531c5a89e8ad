"""One typed, validated config: defaults, then a YAML file, then dotted overrides.

Unknown keys, wrong types and out-of-range values are refused at load with a
`ConfigError` whose message names the key; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class PipelineError(RuntimeError):
    """A failure the user can act on (bad data, a failed export check, ...): one line, exit 1.

    Defined here, in a module without TensorFlow, so the CLI can catch every stage's
    error without importing the stages.
    """


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    # strict: YAML already gives typed values, so "3" for an int is a mistake, not a wish.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataConfig(_Section):
    source: Literal["tfds", "directory"] = "tfds"
    tfds_name: str = "imdb_reviews"
    data_dir: str | None = None  # tfds data dir; None -> $TFDS_DATA_DIR, then ~/tensorflow_datasets
    directory: str | None = None  # aclImdb-style folder (train/{pos,neg}, test/{pos,neg})
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # carved from train, never from test
    max_train_examples: int | None = Field(None, gt=0)  # quick runs; None = all
    max_eval_examples: int | None = Field(None, gt=0)  # caps validation and test alike

    @model_validator(mode="after")
    def _directory_needs_path(self) -> DataConfig:
        if self.source == "directory" and not self.directory:
            raise ValueError("directory: required when source is 'directory'")
        return self


class VectorizeConfig(_Section):
    max_tokens: int = Field(20000, ge=3)  # vocabulary size, padding and OOV included
    max_length: int = Field(400, gt=0)  # tokens kept per review; IMDB averages ~230 words
    adapt_batch_size: int = Field(1024, gt=0)


class ModelConfig(_Section):
    embedding_dim: int = Field(128, gt=0)
    lstm_units: int = Field(64, gt=0)
    bidirectional: bool = True
    num_layers: int = Field(1, ge=1, le=4)
    pooling: Literal["last", "mean", "max"] = "last"  # how the LSTM outputs become one vector
    embedding_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # drops whole embedding channels
    dropout: float = Field(0.3, ge=0.0, lt=1.0)  # before the output layer
    learning_rate: float = Field(1e-3, gt=0.0)
    embedding_init: Literal["random", "word2vec", "file"] = "random"
    embedding_file: str | None = None  # GloVe/word2vec text file for embedding_init=file
    embedding_trainable: bool = True  # False freezes pretrained vectors
    # best_hparams.json from `make tune` (or its folder, or "latest"): its values override these.
    tuned_hparams: str | None = None

    @model_validator(mode="after")
    def _file_init_needs_path(self) -> ModelConfig:
        if self.embedding_init == "file" and not self.embedding_file:
            raise ValueError("embedding_file: required when embedding_init is 'file'")
        return self


class TrainConfig(_Section):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)  # per replica; global batch = this x replicas
    lr_scaling: Literal["fixed", "linear"] = "fixed"  # linear: lr x replicas
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    early_stopping_patience: int = Field(2, ge=0)
    shuffle_buffer: int = Field(25000, gt=0)
    bucket_by_length: bool = True  # batch similar lengths so the LSTM skips padding
    # auto: deterministic ops on CPU (same seed, same metrics), not on GPU, where they cannot
    # make the cuDNN LSTM reproducible and slow the embedding updates (distribute.resolve_deterministic)
    deterministic: bool | Literal["auto"] = "auto"
    verbose: Literal[0, 1, 2] | None = None  # Keras progress; None: bar on a TTY, lines otherwise


class DistributeConfig(_Section):
    strategy: Literal["auto", "default", "one_device", "mirrored", "multi_worker"] = "auto"
    devices: list[str] | None = None  # e.g. ["/gpu:0", "/gpu:1"]; None = all visible
    mixed_precision: bool = False  # mixed_float16; worth it on GPUs only


class ExportConfig(_Section):
    dir: str = "saved_models"  # versions land in <dir>/<name>/<N>/
    verify_tolerance: float = Field(1e-5, gt=0.0)  # max |reloaded - in-memory| probability


class TuneConfig(_Section):
    tuner: Literal["grid", "random", "hyperband", "bayesian"] = "grid"
    embedding_dims: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256])
    lstm_units: list[int] | None = None  # None: not searched
    dropout: list[float] | None = None
    learning_rate: list[float] | None = None
    max_trials: int | None = Field(None, gt=0)  # None: the whole grid
    epochs: int = Field(5, gt=0)  # per trial, with early stopping
    directory: str = "tuning"

    @model_validator(mode="after")
    def _candidates(self) -> TuneConfig:
        for key, ok, what in (("embedding_dims", lambda v: v > 0, "a positive integer"),
                              ("lstm_units", lambda v: v > 0, "a positive integer"),
                              ("dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
                              ("learning_rate", lambda v: v > 0.0, "positive")):
            values = getattr(self, key)
            if values is None:  # only the optional knobs can be null: not searched
                continue
            if not values:
                raise ValueError(f"{key}: must list at least one candidate")
            if not all(ok(v) for v in values):
                raise ValueError(f"{key}: every candidate must be {what} (got {values})")
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: candidates must be distinct (got {values})")
        return self


class PretrainConfig(_Section):
    vector_size: int | None = Field(None, gt=0)  # None: model.embedding_dim
    window: int = Field(5, gt=0)
    min_count: int = Field(2, gt=0)
    epochs: int = Field(5, gt=0)
    workers: int = Field(2, gt=0)  # gensim threads; this machine has 2 cores
    directory: str = "pretrained"  # cached vectors, keyed by their settings


class Config(_Section):
    name: str = Field("imdb_lstm", pattern=r"^[A-Za-z0-9_.-]+$")  # saved_models/<name>/
    seed: int = 42
    runs_dir: str = "runs"
    data: DataConfig = DataConfig()
    vectorize: VectorizeConfig = VectorizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    distribute: DistributeConfig = DistributeConfig()
    export: ExportConfig = ExportConfig()
    tune: TuneConfig = TuneConfig()
    pretrain: PretrainConfig = PretrainConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """Short hash of everything that shapes a trained model (not where files go)."""
        d = self.to_dict()
        for volatile in ("runs_dir",):
            d.pop(volatile)
        d["train"].pop("verbose")
        d["model"].pop("tuned_hparams")  # where values came from; the values themselves count
        d.pop("export")
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (["train", "epochs"], 3); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc.problem}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; unknown keys are caught later by validation."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _first_error(exc: ValidationError) -> str:
    """One line that names the key: `train.epochs: must be > 0 (got -1)`."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and ": " in msg:
        # Our cross-field validators name the sub-key in the message itself.
        sub, msg = msg.split(": ", 1)
        loc.append(sub)
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif not isinstance(err.get("input"), dict) and err["type"] != "value_error":
        msg += f" (got {err['input']!r})"
    return f"{'.'.join(loc) or 'config'}: {msg}"


def from_dict(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then dotted overrides; validated and frozen."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
        data = loaded or {}
    return from_dict(apply_overrides(data, overrides or []))


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
