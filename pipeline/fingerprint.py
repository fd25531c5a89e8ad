"""Fingerprints: short stable hashes that name a run, a cache or a search by what shaped it.

A run's fingerprint (`run_fingerprint`) covers every config key that shapes the trained
weights and the data's identity, not where files lie; caches and searches key their own
subsets with `fingerprint` and `data_key`. Every hash carries FINGERPRINT_VERSION.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.config import Config

# Config keys that do not change the trained weights: where files go (paths can move),
# how much is printed, how tuning searches and word2vec caches, and where tuned values
# came from (the values themselves count). The data's identity replaces its paths.
NOT_IN_FINGERPRINT = ("runs_dir", "export", "tune", "train.verbose", "pretrain.workers",
                      "pretrain.directory", "model.tuned_hparams", "data.data_dir", "data.directory",
                      "data.download", "data.train_files", "data.test_files", "data.unlabelled_files")
# Bumped when what a fingerprint means changes, so that no run, cache or search of the old
# meaning is resumed or reused as if it were of the new one.
FINGERPRINT_VERSION = 2


def fingerprint(obj: dict) -> str:
    """Short stable hash of a JSON-able dict (key order does not matter) and FINGERPRINT_VERSION."""
    versioned = {"fingerprint_version": FINGERPRINT_VERSION, "key": obj}
    return hashlib.sha256(json.dumps(versioned, sort_keys=True).encode()).hexdigest()[:10]


FILES_KEYS = ("train_files", "test_files", "unlabelled_files")  # paths: their data identity counts


def data_key(data: dict) -> dict:
    """A dumped DataConfig as fingerprints and cache names key it: without the files' paths."""
    return {k: v for k, v in data.items() if k not in FILES_KEYS}


def run_fingerprint(cfg: Config, data_identity: dict) -> str:
    """The run's identity: every config key that shapes the trained weights, and the data's."""
    d = cfg.to_dict()
    for key in NOT_IN_FINGERPRINT:
        section, _, name = key.rpartition(".")
        (d[section] if section else d).pop(name)
    d["data"] = data_key(d["data"])
    return fingerprint(d | {"data_identity": data_identity})
