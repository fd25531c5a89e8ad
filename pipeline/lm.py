"""Language-model pretraining: a forward and a backward LSTM language model on unlabelled reviews.

The classifier's embedding and LSTM then start from them (forward LM -> forward
direction, backward LM -> backward direction), the recipe of Dai & Le (2015) and ELMo:
what transfers is the recurrent layer itself, not only the word vectors. Both directions
share the embedding and the output layer. Training uses a sampled softmax (cheap on a
CPU); validation perplexity uses the full softmax on held-out unlabelled reviews.

The corpus is the unlabelled reviews plus the training split, tokenized by the same
vectorizer the classifier adapts; validation and test reviews are never read. The
weights are cached under `pretrain.directory`, keyed by everything that shapes them,
and each finished epoch is checkpointed, so a killed pretraining resumes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import data as data_mod
from pipeline.atomic import atomic_path
from pipeline.config import Config
from pipeline.runs import data_key, fingerprint
from pipeline.vectorize import adapt_vectorizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMWeights:
    """What the classifier takes from the language models."""

    vocabulary: list[str]  # row i of `embedding` is the vector of vocabulary[i]
    embedding: np.ndarray  # [vocab, embedding_dim]
    forward: list[np.ndarray]  # LSTM kernel, recurrent kernel, bias
    backward: list[np.ndarray]


def cache_path(cfg: Config) -> Path:
    """Where the language models for this config live (same settings -> same file)."""
    p = cfg.pretrain
    key = {"data": data_key(cfg.data.model_dump(exclude={"max_eval_examples", "data_dir", "download"})),
           "max_tokens": cfg.vectorize.max_tokens, "embedding_dim": cfg.model.embedding_dim,
           "units": cfg.model.lstm_units, "seed": cfg.seed,
           "lm": {k: v for k, v in p.model_dump().items() if k.startswith("lm_")}}
    if cfg.data.source == "files":  # files are edited in place: their contents name the models
        key["data_identity"] = data_mod.data_identity(cfg.data)
    digest = fingerprint(key)
    name = f"bilm-{cfg.model.embedding_dim}e-{cfg.model.lstm_units}u-{digest}.npz"
    return Path(p.directory) / name


def corpus_ids(texts: tf.data.Dataset, vectorizer: keras.layers.TextVectorization,
               batch_size: int = 1024) -> np.ndarray:
    """All reviews' token ids, one review after another, as one int32 stream."""
    parts = []
    for ids in texts.batch(batch_size).map(vectorizer):
        parts.append(ids.flat_values.numpy().astype(np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def chunks(stream: np.ndarray, length: int) -> np.ndarray:
    """[n, length + 1] windows with stride `length`: inputs and next-token targets overlap by one."""
    n = (len(stream) - 1) // length
    if n < 1:
        raise data_mod.DataError(f"the pretraining corpus has {len(stream)} tokens: too few for "
                                 f"pretrain.lm_sequence_length {length}")
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    return stream[idx]


class BiLM:
    """Shared embedding -> forward and backward LSTM -> shared (sampled) softmax."""

    def __init__(self, vocab_size: int, embedding_dim: int, units: int, dropout: float, seed: int):
        self.vocab_size, self.units = vocab_size, units
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")
        # Default activations and no recurrent dropout: the same cuDNN-eligible cell the
        # classifier uses, so the weights drop in as they are.
        self.forward = keras.layers.LSTM(units, return_sequences=True, name="forward")
        self.backward = keras.layers.LSTM(units, return_sequences=True, name="backward")
        self.dropout = keras.layers.Dropout(dropout, seed=seed)
        init = keras.initializers.GlorotUniform(seed=seed)
        self.softmax_w = keras.Variable(init((vocab_size, units)), name="softmax_w")
        self.softmax_b = keras.Variable(np.zeros(vocab_size, np.float32), name="softmax_b")
        dummy = tf.zeros((1, 2), tf.int32)
        x = self.embedding(dummy)
        self.forward(x), self.backward(x)

    @property
    def variables(self) -> list:
        return (self.embedding.trainable_variables + self.forward.trainable_variables
                + self.backward.trainable_variables + [self.softmax_w, self.softmax_b])

    def hidden(self, lstm: keras.layers.LSTM, ids: tf.Tensor, training: bool) -> tf.Tensor:
        x = self.dropout(self.embedding(ids), training=training)
        return self.dropout(lstm(x), training=training)

    def directions(self, window: tf.Tensor):
        """(lstm, inputs, targets) per direction; the backward LM reads the window reversed."""
        rev = tf.reverse(window, axis=[1])
        return ((self.forward, window[:, :-1], window[:, 1:]),
                (self.backward, rev[:, :-1], rev[:, 1:]))

    def sampled_loss(self, window: tf.Tensor, num_sampled: int) -> tf.Tensor:
        losses = []
        for lstm, inputs, targets in self.directions(window):
            h = tf.reshape(self.hidden(lstm, inputs, training=True), [-1, self.units])
            # The log-uniform sampler suits TextVectorization's frequency-ordered ids.
            losses.append(tf.reduce_mean(tf.nn.sampled_softmax_loss(
                weights=self.softmax_w, biases=self.softmax_b,
                labels=tf.reshape(tf.cast(targets, tf.int64), [-1, 1]), inputs=h,
                num_sampled=num_sampled, num_classes=self.vocab_size)))
        return tf.add_n(losses) / 2.0

    def full_nll(self, window: tf.Tensor) -> tf.Tensor:
        """Summed negative log-likelihood per direction (full softmax), for perplexity."""
        out = []
        for lstm, inputs, targets in self.directions(window):
            h = tf.reshape(self.hidden(lstm, inputs, training=False), [-1, self.units])
            logits = tf.matmul(h, self.softmax_w, transpose_b=True) + self.softmax_b
            out.append(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.reshape(targets, [-1]), logits=logits)))
        return tf.stack(out)

    def get_weights(self) -> dict[str, np.ndarray]:
        return {v.path.replace("/", "."): np.asarray(v) for v in self.variables}

    def set_weights(self, arrays: dict[str, np.ndarray]) -> None:
        for v in self.variables:
            v.assign(arrays[v.path.replace("/", ".")])


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez adds .npz to a name without it
        np.savez(tmp, **arrays)


def _lm_corpus(cfg: Config) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(vocabulary, training stream, validation stream): validation is held-out unlabelled text."""
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    n_train = data_mod.count(raw.train)
    log.info("lm: adapting the vocabulary on %d training reviews (as the classifier does)", n_train)
    vectorizer = adapt_vectorizer(cfg.vectorize, raw.train)
    unsup = data_mod.unsupervised_texts(cfg.data)
    n_unsup = data_mod.count(unsup)
    if n_unsup == 0:
        log.warning("lm: no unlabelled reviews found; pretraining on the training reviews alone")
    held_out = min(cfg.pretrain.lm_validation_reviews, n_unsup // 10)
    val = corpus_ids(unsup.take(held_out), vectorizer)
    train = corpus_ids(unsup.skip(held_out).concatenate(raw.train.map(lambda t, _: t)), vectorizer)
    if held_out == 0:  # tiny corpora: hold out the stream's tail instead
        cut = max(len(train) // 10, cfg.pretrain.lm_sequence_length + 1)
        train, val = train[:-cut], train[-cut:]
    return vectorizer.get_vocabulary(), train, val


def perplexity(lm: BiLM, windows: np.ndarray, batch_size: int = 32) -> tuple[float, float]:
    """(forward, backward) perplexity with the full softmax."""
    nll_fn = tf.function(lm.full_nll)
    total = np.zeros(2)
    for i in range(0, len(windows), batch_size):
        total += nll_fn(tf.constant(windows[i:i + batch_size])).numpy()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return tuple(float(np.exp(t / tokens)) for t in total)


def train_lm(cfg: Config) -> Path:
    """Train (or reuse) the forward and backward language models; returns the cached .npz file."""
    path = cache_path(cfg)
    if path.is_file():
        log.info("language models cached at %s", path)
        return path
    p, seed = cfg.pretrain, cfg.seed
    keras.utils.set_random_seed(seed)
    t0 = time.time()
    vocabulary, stream, val_stream = _lm_corpus(cfg)
    windows, val_windows = chunks(stream, p.lm_sequence_length), chunks(val_stream, p.lm_sequence_length)
    log.info("lm: %d training tokens (%d windows of %d), %d held-out tokens, vocabulary %d",
             len(stream), len(windows), p.lm_sequence_length, len(val_stream), len(vocabulary))
    lm = BiLM(len(vocabulary), cfg.model.embedding_dim, cfg.model.lstm_units, p.lm_dropout, seed)
    optimizer = keras.optimizers.Adam(learning_rate=p.lm_learning_rate, global_clipnorm=1.0)

    @tf.function
    def step(window):
        with tf.GradientTape() as tape:
            loss = lm.sampled_loss(window, p.lm_sampled_softmax)
        optimizer.apply_gradients(zip(tape.gradient(loss, lm.variables), lm.variables, strict=True))
        return loss

    # A finished epoch is checkpointed beside the cache file; a rerun continues from it.
    partial = path.with_name(path.name + ".partial.npz")
    history: list[dict] = []
    start = 0
    if partial.is_file():
        saved = dict(np.load(partial, allow_pickle=False))
        history = json.loads(str(saved.pop("history")))
        start = len(history)
        lm.set_weights(saved)
        log.info("lm: resuming after epoch %d from %s", start, partial)
    writer = tf.summary.create_file_writer(str(path.with_suffix("")) + ".tensorboard")
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(windows)) for _ in range(p.lm_epochs)]  # same order on resume
    steps = len(windows) // p.lm_batch_size or 1
    for epoch in range(start, p.lm_epochs):
        t_epoch = time.time()
        bar = keras.utils.Progbar(steps, interval=0.5 if sys.stdout.isatty() else 60,
                                  stateful_metrics=["tokens/s"])
        order = orders[epoch]
        for s in range(steps):
            batch = windows[order[s * p.lm_batch_size:(s + 1) * p.lm_batch_size]]
            loss = float(step(tf.constant(batch)))
            tokens = (s + 1) * len(batch) * p.lm_sequence_length
            bar.update(s + 1, [("loss", loss), ("tokens/s", tokens / (time.time() - t_epoch))])
        fwd, bwd = perplexity(lm, val_windows)
        seconds = time.time() - t_epoch
        history.append({"epoch": epoch + 1, "val_perplexity_forward": round(fwd, 2),
                        "val_perplexity_backward": round(bwd, 2), "seconds": round(seconds, 1)})
        log.info("lm epoch %d/%d: validation perplexity forward %.1f, backward %.1f (%.0fs)",
                 epoch + 1, p.lm_epochs, fwd, bwd, seconds)
        with writer.as_default():
            tf.summary.scalar("val_perplexity/forward", fwd, step=epoch + 1)
            tf.summary.scalar("val_perplexity/backward", bwd, step=epoch + 1)
        _save_npz(partial, lm.get_weights() | {"history": np.array(json.dumps(history))})
    meta = {"history": history, "train_tokens": int(len(stream)), "val_tokens": int(len(val_stream)),
            "seconds_this_session": round(time.time() - t0, 1)}
    _save_npz(path, lm.get_weights() | {"vocabulary": np.array(vocabulary),
                                       "meta": np.array(json.dumps(meta))})
    partial.unlink(missing_ok=True)
    log.info("language models -> %s (%.0fs)", path, time.time() - t0)
    return path


def load_lm(path: Path) -> tuple[LMWeights, dict]:
    """The cached language models as classifier initial weights, and their training record."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    layer = lambda name: [arrays[f"{name}.lstm_cell.{w}"] for w in ("kernel", "recurrent_kernel", "bias")]  # noqa: E731
    weights = LMWeights(vocabulary=[str(w) for w in arrays["vocabulary"]],
                        embedding=arrays["embedding.embeddings"],
                        forward=layer("forward"), backward=layer("backward"))
    return weights, json.loads(str(arrays["meta"]))
