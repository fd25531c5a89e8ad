"""A finished run read back from its folder: its config, vectorizer, trained model and n-gram
branch, for what builds on a run without training it again (a re-export, a teacher, a probe).

`pipeline.runs` names the files and keeps the run's record; this module turns the files back
into the objects training made.
"""

from __future__ import annotations

from pathlib import Path

import keras

from pipeline import ngrams
from pipeline.config import Config, load_config
from pipeline.model import build_model, float32_policy, load_weights, model_kwargs
from pipeline.ngrams import NgramModel
from pipeline.runs import CONFIG_FILE, NGRAMS_FILE, VOCAB_FILE, WEIGHTS_FILE
from pipeline.vectorize import load_vocabulary, make_vectorizer


def load_run(run_dir: Path) -> tuple[Config, keras.layers.TextVectorization, keras.Model,
                                      NgramModel | None]:
    """Rebuild a finished run's config, vectorizer, trained model and n-gram branch (if any)."""
    cfg = load_config(run_dir / CONFIG_FILE)
    vectorizer = make_vectorizer(cfg.vectorize, load_vocabulary(run_dir / VOCAB_FILE))
    with float32_policy():  # scored as served, also in a process training in mixed precision
        model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))
    load_weights(model, run_dir / WEIGHTS_FILE)
    ngram = ngrams.load(run_dir / NGRAMS_FILE) if cfg.ngrams.enabled else None
    return cfg, vectorizer, model, ngram
