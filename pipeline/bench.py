"""`make bench`: this pipeline against a baseline built the way the TensorFlow RNN tutorial does it.

Both sides train the same model size on the same reviews, on the same machine, in one run:
(a) baseline: TextVectorization inside the model, every review padded to `max_length`,
    no cache; (b) this pipeline: ids vectorized once and cached, length-bucketed batches.
Reported: training examples/s (the fastest epoch after the first, and over all epochs)
and seconds per epoch, test accuracy after the same epochs, the exported SavedModel's batch
throughput against the in-memory model, single-review latency, and peak memory.
Beside them, (c) the linear peer a user would try first (TF-IDF unigrams + bigrams,
logistic regression) on the same training and test reviews: the accuracy bar to beat; and,
when `ngrams.enabled`, (b) with its n-gram branch blended in, the model `make train` serves
(the blend fitted on as many validation reviews as test reviews). Serving is measured on
that served model.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import atomic
from pipeline import data as data_mod
from pipeline.config import Config
from pipeline.constants import INPUT_NAME, OUTPUT_NAME, SIGNATURE
from pipeline.distribute import seed_everything
from pipeline.export import export_model
from pipeline.model import EpochTimer, build_model, logit_fn, model_kwargs
from pipeline.runs import code_commit
from pipeline.scoring import (
    metrics_of,
    score_texts,
    served_probabilities,
    served_probability,
    sigmoid,
)
from pipeline.stacking import fit_ngram_branch
from pipeline.vectorize import adapt_vectorizer, standardize, vectorize_split

log = logging.getLogger(__name__)

MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
SERVING_TEXTS = 2000  # test reviews timed through each serving path: enough for a steady rate


def baseline_model(raw_train: tf.data.Dataset, cfg: Config) -> keras.Model:
    """The tutorial's shape: strings in, TextVectorization as the first layer, fixed-length padding."""
    encoder = keras.layers.TextVectorization(max_tokens=cfg.vectorize.max_tokens, standardize=standardize,
                                             output_sequence_length=cfg.vectorize.max_length)
    encoder.adapt(raw_train.map(lambda t, _: t).batch(1024))
    inner = build_model(encoder.vocabulary_size(), **model_kwargs(cfg.model))
    text = keras.Input(shape=(), dtype="string")
    model = keras.Model(text, inner(encoder(text)))
    model.compile(optimizer=keras.optimizers.Adam(cfg.model.learning_rate), loss="binary_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy")], jit_compile=False)
    return model


def _fit(model: keras.Model, train_ds, epochs: int, n_examples: int) -> dict:
    timer = EpochTimer()
    model.fit(train_ds, epochs=epochs, callbacks=[timer], verbose=0)
    # Epoch times on a busy machine swing widely from one epoch to the next (docs/experiments/speed.md),
    # so the headline is the fastest epoch after the first (as timeit takes the best of repeats).
    steady = timer.seconds[1:] or timer.seconds
    return {
        "seconds_per_epoch": [round(s, 2) for s in timer.seconds],
        "best_steady_seconds_per_epoch": round(float(np.min(steady)), 2),
        "train_examples_per_s": round(n_examples / float(np.min(steady)), 1),
        # Every epoch, first included: (b)'s one-off tokenizing and caching count against it.
        "all_epochs_examples_per_s": round(n_examples * epochs / float(np.sum(timer.seconds)), 1),
    }


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Test accuracy and AUC, computed as `make train`'s metrics.json computes them."""
    m = metrics_of(probs, labels)
    return {"test_accuracy": m["accuracy"], "test_auc": round(m["auc"], 4)}


def throughput(fn, texts: list[str], batch: int) -> float:
    fn(texts[:batch])  # warm-up: tracing is not throughput
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        fn(texts[i:i + batch])
    return len(texts) / (time.perf_counter() - t0)


def latency_ms(fn, text: str, repeats: int) -> dict:
    """p50 and p95 of one-review calls, after one warm-up call."""
    fn([text])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn([text])
        times.append((time.perf_counter() - t0) * 1000)
    p50, p95 = np.percentile(times, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2)}


def fit_linear_peer(train_texts: list[str], train_labels: np.ndarray
                    ) -> Callable[[list[str]], np.ndarray]:
    """TF-IDF unigrams + bigrams and logistic regression, fitted; returns texts -> P(positive)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    classifier = LogisticRegression(C=8, max_iter=1000)
    classifier.fit(tfidf.fit_transform(train_texts), train_labels)
    return lambda texts: classifier.predict_proba(tfidf.transform(texts))[:, 1]


def linear_peer(train_texts: list[str], train_labels: np.ndarray, test_texts: list[str],
                test_labels: np.ndarray) -> dict:
    """The linear peer (`fit_linear_peer`): test accuracy, AUC, training seconds."""
    t0 = time.time()
    predict = fit_linear_peer(train_texts, train_labels)
    seconds = time.time() - t0
    return _scores(predict(test_texts), test_labels) | {"train_seconds": round(seconds, 1)}


def run_peer(cfg: Config, train_examples: int | None, test_examples: int | None) -> dict:
    """The linear peer alone (seconds, not minutes), e.g. on the full splits; with the code's
    commit and the command, so `make results` can show it beside the runs (`write_peer`)."""
    t0 = time.time()
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    train = raw.train.take(train_examples) if train_examples else raw.train
    test = raw.test.take(test_examples) if test_examples else raw.test
    (train_texts, train_labels), (texts, labels) = data_mod.decoded(train), data_mod.decoded(test)
    return {"train_examples": len(train_texts), "test_examples": len(texts),
            "peer": linear_peer(train_texts, train_labels, texts, labels),
            "total_seconds": round(time.time() - t0, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "commit": code_commit(), "command": sys.argv[1:],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_peer(result: dict, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(json_path, json.dumps(result, indent=2) + "\n")


def run_bench(cfg: Config, train_examples: int, test_examples: int, epochs: int) -> dict:
    seed_everything(cfg)
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    raw_train = raw.train.take(train_examples).cache()
    texts, labels = data_mod.decoded(raw.test.take(test_examples))
    n = data_mod.count(raw_train)
    batch = cfg.train.batch_size
    result: dict = {"train_examples": n, "test_examples": len(texts), "epochs": epochs, "batch_size": batch}
    log.info("bench: %d training and %d test reviews, %d epochs per side; (c) the linear peer",
             n, len(texts), epochs)
    result["peer"] = linear_peer(*data_mod.decoded(raw_train), texts, labels)

    # (a) the tutorial's way.
    log.info("bench: (a) the tutorial baseline")
    base = baseline_model(raw_train, cfg)
    base_train = raw_train.shuffle(n, seed=cfg.seed).batch(batch).prefetch(tf.data.AUTOTUNE)
    result["baseline"] = _fit(base, base_train, epochs, n)
    base_probs = base.predict(tf.constant(texts), batch_size=256, verbose=0)
    result["baseline"] |= _scores(base_probs, labels)
    del base

    # (b) this pipeline.
    log.info("bench: (b) this pipeline")
    seed_everything(cfg)
    vectorizer = adapt_vectorizer(cfg.vectorize, raw_train)
    train_ds = vectorize_split(raw_train, vectorizer, cfg.vectorize, cfg.train, batch, shuffle_seed=cfg.seed)
    model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))
    result["pipeline"] = _fit(model, train_ds, epochs, n)
    z_lstm, _ = score_texts(vectorizer, model, texts, cfg.vectorize.max_length)
    probs = sigmoid(z_lstm)
    result["pipeline"] |= _scores(probs, labels)
    ngram = None
    if cfg.ngrams.enabled:
        t0 = time.time()
        ngram = fit_ngram_branch(cfg, vectorizer, model, data_mod.decoded(raw_train),
                                 data_mod.decoded(raw.validation.take(test_examples)))
        branch_seconds = time.time() - t0
        probs = served_probabilities(*score_texts(vectorizer, model, texts, cfg.vectorize.max_length,
                                                  ngram), ngram)
        result["served"] = _scores(probs, labels) | {
            "train_seconds": round(sum(result["pipeline"]["seconds_per_epoch"]) + branch_seconds, 1)}
    a, b = result["baseline"], result["pipeline"]
    result["train_speedup"] = round(b["train_examples_per_s"] / a["train_examples_per_s"], 2)
    result["all_epochs_speedup"] = round(b["all_epochs_examples_per_s"] / a["all_epochs_examples_per_s"], 2)

    # Serving: the exported SavedModel against the in-memory model, same texts and batches.
    log.info("bench: export and serving")
    out = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        export_cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"dir": str(out)})})
        exported = export_model(vectorizer, model, export_cfg, texts[:32], ngram)
        serve = tf.saved_model.load(exported.path).signatures[SIGNATURE]
        saved_fn = lambda xs: serve(**{INPUT_NAME: tf.constant(xs)})[OUTPUT_NAME].numpy()  # noqa: E731
        # The in-memory side gets the same advantage as the export: one traced graph, not eager calls.
        lstm_logit = logit_fn(model)
        in_memory = tf.function(
            lambda t: served_probability(vectorizer, lstm_logit, ngram, t, cfg.vectorize.max_length),
            input_signature=[tf.TensorSpec([None], tf.string)])
        keras_fn = lambda xs: in_memory(tf.constant(xs)).numpy()  # noqa: E731
        timed = texts[:SERVING_TEXTS]
        saved_rate, keras_rate = throughput(saved_fn, timed, 256), throughput(keras_fn, timed, 256)
        short_ms = latency_ms(saved_fn, "A wonderful film.", 200)
        long_review = max(texts, key=len)
        long_ms = latency_ms(saved_fn, long_review, 50)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result["serving"] = {
        "savedmodel_examples_per_s": round(saved_rate, 1),
        "keras_examples_per_s": round(keras_rate, 1),
        "savedmodel_vs_keras": round(saved_rate / keras_rate, 2),
        "short_review_latency_ms": short_ms,
        "longest_review_latency_ms": long_ms | {"chars": len(long_review)},
    }
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpus": len(tf.config.list_physical_devices("CPU")),
                         "gpus": len(tf.config.list_physical_devices("GPU")),
                         "python": platform.python_version(), "tensorflow": tf.__version__,
                         "keras": keras.__version__}
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return result


def markdown_table(r: dict) -> str:
    a, b, s = r["baseline"], r["pipeline"], r["serving"]
    m = r["machine"]
    rows = [
        "| measure | (a) tutorial baseline | (b) this pipeline |",
        "| --- | --- | --- |",
        f"| training examples/s (fastest epoch after the first) | {a['train_examples_per_s']} | "
        f"{b['train_examples_per_s']} |",
        f"| training examples/s (all epochs, first included) | {a['all_epochs_examples_per_s']} | "
        f"{b['all_epochs_examples_per_s']} |",
        f"| seconds per epoch (each) | {a['seconds_per_epoch']} | {b['seconds_per_epoch']} |",
        f"| test accuracy after {r['epochs']} epochs | {a['test_accuracy']:.4f} | {b['test_accuracy']:.4f} |",
        "",
        peer_table(r, f"{r['epochs']} epochs"),
        "",
        f"Training throughput ratio (b)/(a): **{r['train_speedup']}x** (fastest epochs after the first); "
        f"{r['all_epochs_speedup']}x over all epochs.",
        "",
        f"| serving (exported model of (b){' with its n-gram branch' if 'served' in r else ''}) | value |",
        "| --- | --- |",
        f"| SavedModel batch throughput (batch 256, the first {min(r['test_examples'], SERVING_TEXTS)} "
        f"test reviews) | {s['savedmodel_examples_per_s']} examples/s |",
        f"| in-memory Keras model (vectorizer + model in one tf.function), same batches | "
        f"{s['keras_examples_per_s']} examples/s |",
        f"| SavedModel / Keras | {s['savedmodel_vs_keras']}x |",
        f"| one short review, latency p50 / p95 | {s['short_review_latency_ms']['p50']} / "
        f"{s['short_review_latency_ms']['p95']} ms |",
        f"| the longest test review ({s['longest_review_latency_ms']['chars']} chars), p50 / p95 | "
        f"{s['longest_review_latency_ms']['p50']} / {s['longest_review_latency_ms']['p95']} ms |",
        f"| peak memory of the bench process | {r['peak_rss_mib']} MiB |",
        "",
        f"{r['train_examples']} training reviews, {r['test_examples']} test reviews, "
        f"batch {r['batch_size']}, "
        f"{r['date']}; {m['platform']}, {m['cpus']} CPU device(s), {m['gpus']} GPU(s), "
        f"Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}.",
    ]
    return "\n".join(rows)


def peer_table(r: dict, epochs: str) -> str:
    """Accuracy beside the linear peer, on the same training and test reviews."""
    rows = [f"| model ({r['train_examples']} training / {r['test_examples']} test reviews) | "
            "test accuracy | AUC | training seconds |", "| --- | --- | --- | --- |"]
    for key, name in (("baseline", f"(a) tutorial baseline, {epochs}"),
                      ("pipeline", f"(b) this pipeline, {epochs}"),
                      ("served", f"(b) with its n-gram branch blended in (served), {epochs}"),
                      ("peer", "(c) linear peer: TF-IDF uni+bigrams, logistic regression (C=8)")):
        if key in r:
            m = r[key]
            seconds = m.get("train_seconds", round(sum(m.get("seconds_per_epoch", [])), 1))
            rows.append(f"| {name} | {m['test_accuracy']:.4f} | {m['test_auc']:.4f} | {seconds} |")
    return "\n".join(rows)


def write_report(result: dict, json_path: Path, markdown_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(json_path, json.dumps(result, indent=2) + "\n")
    table = f"{MARK_START}\n{markdown_table(result)}\n{MARK_END}"
    text = markdown_path.read_text() if markdown_path.is_file() else "# Speed\n\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + table + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    atomic.write_text(markdown_path, text)
