"""The hand-off from `make tune` to `make train TUNED=...`: the picked values, applied to a config.

No TensorFlow here: `make train` resolves its config before its teacher's round, which trains
in a process of its own while the first one waits without TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pipeline.config import Config, from_dict
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

BEST_FILE = "best_hparams.json"  # written last by a finished search: its presence means finished
SEARCH_FILE = "search.json"
TUNED_KEYS = ("embedding_dim",)  # the model.* keys a search hands over


class TuneError(PipelineError):
    """A search that produced nothing usable, or a tuning result that cannot be found."""


def output_dir(cfg: Config) -> Path:
    return Path(cfg.tune.directory) / cfg.name


def tuned_path(cfg: Config, source: str) -> Path:
    """`latest` -> this config name's best_hparams.json; a folder -> the file in it; else the path."""
    if source == "latest":
        return output_dir(cfg) / BEST_FILE
    path = Path(source)
    return path / BEST_FILE if path.is_dir() else path


def apply_tuned(cfg: Config) -> tuple[Config, dict]:
    """`cfg` with the tuned values of `model.tuned_hparams` applied, and where they came from.

    The word2vec vectors are the search's too (its largest size, reduced per size), so the
    picked size trains from the very start it was picked with.
    """
    path = tuned_path(cfg, cfg.model.tuned_hparams or "latest")
    if not path.is_file():
        raise TuneError(f"model.tuned_hparams: no tuning result at {path}: run `make tune` "
                        "with the same config first, or pass the path of a best_hparams.json")
    try:
        best = json.loads(path.read_text())
        values = {k: v for k, v in best["values"].items() if k in TUNED_KEYS}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"model.tuned_hparams: {path} is not a best_hparams.json: {exc}") from None
    if not values:
        raise ConfigError(f"model.tuned_hparams: {path} holds no tuned model values "
                          f"(found {sorted(best['values'])})")
    d = cfg.to_dict()
    d["model"] |= values | {"tuned_hparams": str(path)}
    if d["model"]["embedding_init"] == "word2vec" and best.get("word2vec_vector_size"):
        d["pretrain"]["vector_size"] = best["word2vec_vector_size"]
        d["pretrain"]["seed"] = best.get("word2vec_seed", d["pretrain"]["seed"])
    provenance = {"source": "tuning", "file": str(path), "values": values,
                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                  "search": {k: best.get(k) for k in ("rule", "finished", "mean", "se", "executions")}}
    log.info("hyperparameters from %s: %s", path, ", ".join(f"{k}={v}" for k, v in values.items()))
    return from_dict(d), provenance
