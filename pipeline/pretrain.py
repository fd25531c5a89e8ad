"""Pretrained embeddings: word2vec on the unlabelled reviews, or a user's vectors file.

word2vec (gensim, skip-gram with negative sampling) trains on the tfds `unsupervised`
split plus the training reviews; it never sees validation or test text. Vectors are
cached under `pretrain.directory`, keyed by everything that shapes them.
"""

from __future__ import annotations

import glob
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline import data as data_mod
from pipeline.atomic import atomic_path
from pipeline.config import Config
from pipeline.embeddings import reduce_dim
from pipeline.errors import ConfigError
from pipeline.fingerprint import data_key, fingerprint
from pipeline.vectorize import standardize

log = logging.getLogger(__name__)


def _vector_size(cfg: Config) -> int:
    return cfg.pretrain.vector_size or cfg.model.embedding_dim


def word2vec_seed(cfg: Config) -> int:
    """The seed word2vec trains with: pretrain.seed, else the run's."""
    return cfg.seed if cfg.pretrain.seed is None else cfg.pretrain.seed


def cache_path(cfg: Config) -> Path:
    """Where the word2vec vectors for this config live (same settings -> same file)."""
    key = {"data": data_key(cfg.data.model_dump(exclude={"max_eval_examples", "download"})),
           "size": _vector_size(cfg),
           "pretrain": {k: v for k, v in cfg.pretrain.model_dump().items()
                        if k not in ("directory", "vector_size", "seed")},
           "seed": word2vec_seed(cfg), "tokenizer": 1}
    if cfg.data.source == "files":  # files are edited in place: their contents name the vectors
        key["data_identity"] = data_mod.data_identity(cfg.data)
    digest = fingerprint(key)
    return Path(cfg.pretrain.directory) / f"word2vec-{_vector_size(cfg)}d-{digest}.kv"


def tokenized(texts: tf.data.Dataset, batch_size: int = 1024) -> Iterator[list[str]]:
    """Reviews as token lists, standardized exactly as the vectorizer does."""
    for batch in texts.batch(batch_size).map(lambda t: tf.strings.split(standardize(t))):
        for row in batch.to_list():
            yield [token.decode("utf-8") for token in row]


class Corpus:
    """Unlabelled reviews plus the training split (validation and test excluded).

    Re-iterable and streamed, so gensim's passes never hold ~17M tokens in memory.
    """

    def __init__(self, cfg: Config):
        raw = data_mod.load_raw(cfg.data, cfg.seed)
        unlabelled = data_mod.unsupervised_texts(cfg.data)
        if data_mod.count(unlabelled) == 0:  # most of the corpus: say so rather than train on less
            missing = (f"no unlabelled reviews in {Path(cfg.data.directory or '') / 'train' / 'unsup'}"
                       if cfg.data.source == "directory" else "no data.unlabelled_files"
                       if cfg.data.source == "files"
                       else f"the unsupervised split of {cfg.data.tfds_name!r} is empty or absent")
            log.warning("word2vec: %s; training on the labelled training reviews only", missing)
        self.texts = unlabelled.concatenate(raw.train.map(lambda t, _: t))

    def __iter__(self) -> Iterator[list[str]]:
        return tokenized(self.texts)


def _epoch_logger(epochs: int):
    """A gensim callback that logs each finished pass: word2vec runs for minutes, and gensim's
    own progress lines are library INFO, hidden unless --verbose."""
    from gensim.models.callbacks import CallbackAny2Vec

    class EpochLogger(CallbackAny2Vec):
        def __init__(self) -> None:
            self.epoch, self.t0 = 0, time.time()

        def on_epoch_end(self, model) -> None:
            self.epoch += 1
            log.info("word2vec: pass %d of %d done (%.0fs)", self.epoch, epochs, time.time() - self.t0)

    return EpochLogger()


def train_word2vec(cfg: Config) -> Path:
    """Train (or reuse) word2vec vectors; returns the cached KeyedVectors file."""
    from gensim.models import Word2Vec

    path = cache_path(cfg)
    if path.is_file():
        log.info("word2vec vectors cached at %s", path)
        return path
    t0 = time.time()
    p = cfg.pretrain
    model = Word2Vec(vector_size=_vector_size(cfg), window=p.window, min_count=p.min_count, sg=1,
                     negative=5, seed=word2vec_seed(cfg), workers=p.workers)
    sentences = Corpus(cfg)
    model.build_vocab(sentences)
    log.info("word2vec: %d reviews, %d tokens, %d words kept; training %d epochs",
             model.corpus_count, model.corpus_total_words, len(model.wv), p.epochs)
    model.train(sentences, total_examples=model.corpus_count, total_words=model.corpus_total_words,
                epochs=p.epochs, report_delay=30, callbacks=[_epoch_logger(p.epochs)])
    _save_vectors(model.wv, path)
    log.info("word2vec: %d words x %d dims in %.0fs -> %s", len(model.wv), model.wv.vector_size,
             time.time() - t0, path)
    return path


def _save_vectors(kv, path: Path) -> None:
    """Save KeyedVectors all or nothing: a kill never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        kv.save(str(tmp))
        # Large arrays may go to side files named after the main one; they are in place
        # before the main file appears, which is what a later run looks for.
        for extra in tmp.parent.glob(glob.escape(tmp.name) + ".*"):
            extra.rename(path.with_name(path.name + extra.name[len(tmp.name):]))


def word2vec_for_size(cfg: Config, dim: int) -> Path:
    """word2vec vectors of `dim` dimensions: the trained ones, or their leading principal components.

    One word2vec run at `pretrain.vector_size` starts every smaller embedding size (the
    candidates of a tuning search); each reduction is cached beside it.
    """
    from gensim.models import KeyedVectors

    size = _vector_size(cfg)
    if dim > size:
        raise ConfigError(f"pretrain.vector_size: {size}-d word2vec vectors cannot start a {dim}-d "
                          f"embedding (set it to at least {dim})")
    base = train_word2vec(cfg)
    if dim == size:
        return base
    path = base.with_name(f"{base.stem}-pca{dim}d.kv")
    if not path.is_file():
        kv = KeyedVectors.load(str(base))
        reduced = KeyedVectors(vector_size=dim)
        reduced.add_vectors(kv.index_to_key, reduce_dim(kv.vectors, dim))
        _save_vectors(reduced, path)
        log.info("word2vec: %d-d vectors reduced to %d-d -> %s", size, dim, path)
    return path


def read_vectors_file(path: Path) -> dict[str, np.ndarray]:
    """A GloVe or word2vec text file: `word f1 f2 ...` per line (a `count dim` header is skipped)."""
    if not path.is_file():
        raise data_mod.DataError(f"model.embedding_file {str(path)!r} does not exist")
    vectors: dict[str, np.ndarray] = {}
    dim = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            if len(parts) < 2:
                continue
            dim = dim or len(parts) - 1
            if len(parts) - 1 != dim:
                raise data_mod.DataError(f"{path}:{lineno}: {len(parts) - 1} values, expected {dim}")
            vectors[parts[0]] = np.asarray(parts[1:], dtype=np.float32)
    if not vectors:
        raise data_mod.DataError(f"{path}: no vectors found")
    return vectors


def initial_weights(cfg: Config, vocabulary: list[str]) -> dict:
    """`build_model`'s pretrained arguments for this config ({} for a random start)."""
    init = cfg.model.embedding_init
    if init == "random":
        return {}
    return {"embedding_matrix": embedding_matrix(cfg, vocabulary)}


def embedding_matrix(cfg: Config, vocabulary: list[str]) -> np.ndarray:
    """Rows for the vocabulary: pretrained where known, small random otherwise, zero for padding."""
    if cfg.model.embedding_init == "word2vec":
        from gensim.models import KeyedVectors

        kv = KeyedVectors.load(str(word2vec_for_size(cfg, cfg.model.embedding_dim)))
        lookup = {w: kv[w] for w in vocabulary if w in kv.key_to_index}
        source = "word2vec"
    else:
        lookup = read_vectors_file(Path(cfg.model.embedding_file or ""))
        source = cfg.model.embedding_file
    dim = cfg.model.embedding_dim
    found = next((lookup[w] for w in vocabulary if w in lookup), None)
    if found is not None and len(found) != dim:
        raise ConfigError(f"model.embedding_dim is {dim} but the {source} vectors have "
                         f"{len(found)} dimensions")
    return vocabulary_matrix(lookup, vocabulary, dim, cfg.seed, source)


def vocabulary_matrix(lookup: Mapping[str, np.ndarray], vocabulary: list[str], dim: int, seed: int,
                      source: str) -> np.ndarray:
    """Row i is the vector of vocabulary[i]: from `lookup` where known, small random otherwise
    (at the spread of the known ones), zero for padding."""
    found = [w for w in vocabulary if w in lookup]
    rng = np.random.default_rng(seed)
    scale = float(np.std([lookup[w] for w in found])) if found else 0.05
    matrix = rng.normal(0.0, scale, size=(len(vocabulary), dim)).astype(np.float32)
    for i, word in enumerate(vocabulary):
        if word in lookup:
            matrix[i] = lookup[word]
    matrix[0] = 0.0  # padding
    log.info("embeddings: %d of %d vocabulary words found in %s", len(found), len(vocabulary), source)
    return matrix
