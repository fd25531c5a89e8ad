"""The hand-off from `make tune` to `make train TUNED=...`: the picked values, applied to a config.

No TensorFlow here: `make train` resolves its config before its teacher's round, which trains
in a process of its own while the first one waits without TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

from pipeline.config import Config, from_dict
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

BEST_FILE = "best_hparams.json"  # written last by a finished search: its presence means finished
SEARCH_FILE = "search.json"
EXECUTIONS_DIR = "executions"  # beside BEST_FILE: one record per execution, with its run folder
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

    The rest is `cfg`'s, as the search's full executions trained it: the picked size starts
    from the word2vec vectors it was picked with.
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
    provenance = {"source": "tuning", "file": str(path), "values": values,
                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                  "search": {k: best.get(k) for k in ("rule", "finished", "mean", "se", "executions")}}
    log.info("hyperparameters from %s: %s", path, ", ".join(f"{k}={v}" for k, v in values.items()))
    return from_dict(d), provenance


def adopt_search_run(cfg: Config, provenance: dict, teacher_dir: Path | None) -> Path | None:
    """Where the search already trained this very run, a copy of it under `runs/`, marked
    trained: `train(cfg)` then evaluates and exports it instead of training it again.

    "This very run": an execution of the picked size with `cfg.seed` whose fingerprint is the
    one `cfg` has, but for the execution's name (the same config, start and data), taught by
    the same served teacher run `teacher_dir`, if any. None where the search holds none, or
    where a run of `cfg` is already under way (it resumes). Needs TensorFlow loaded (the
    data's identity).
    """
    from pipeline import data as data_mod
    from pipeline.fingerprint import run_fingerprint
    from pipeline.runs import RUN_FILE, adopt_run, code_commit, read_json, resumable_run, taught_by

    identity = data_mod.data_identity(cfg.data)
    fp = run_fingerprint(cfg, identity)
    if resumable_run(cfg, fp) is not None:
        return None
    for path in sorted((Path(provenance["file"]).parent / EXECUTIONS_DIR).glob("*d-full-*.json")):
        record = {} if path.name.endswith(".neighbours.json") else read_json(path)
        if (record.get("embedding_dim"), record.get("seed")) != (cfg.model.embedding_dim, cfg.seed):
            continue
        source = Path(record["run_dir"])
        run = read_json(source / RUN_FILE)
        same = run.get("fingerprint") == run_fingerprint(cfg.model_copy(update={"name": source.parent.name}),
                                                          identity)
        if run.get("status") == "finished" and same and taught_by(run, teacher_dir):
            log.info("the search trained this run already (%s): evaluating and exporting it, "
                     "not training it again (--fresh trains it anew)", source)
            return adopt_run(source, cfg, fp, adopted_from=str(source), commit=code_commit(),
                             command=sys.argv[1:], created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return None
