"""Training reviews per second of the default model at several batch sizes (one epoch each).

    TFDS_DATA_DIR=<prepared tfds folder> .venv/bin/python benchmarks/batch_speed.py 64 128 256

Trains the model of configs/default.yaml (random start) for one epoch over the first 4,096
training reviews at each batch size, after a few warm-up steps, and prints reviews/s. The
rate is the model's throughput only: the data are vectorized, cached and bucketed as in a run.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline import data as data_mod  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.model import build_model, model_kwargs  # noqa: E402
from pipeline.vectorize import adapt_vectorizer, vectorize_split  # noqa: E402

REVIEWS = 4096


def main(batch_sizes: list[int]) -> None:
    cfg = load_config("configs/default.yaml", [f"data.max_train_examples={REVIEWS}",
                                               "data.max_eval_examples=256"])
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    vectorizer = adapt_vectorizer(cfg.vectorize, raw.train)
    for batch in batch_sizes:
        ds = vectorize_split(raw.train, vectorizer, cfg.vectorize, cfg.train, batch, shuffle_seed=1)
        model = build_model(len(vectorizer.get_vocabulary()), **model_kwargs(cfg.model))
        model.fit(ds.take(4), epochs=1, verbose=0)  # tracing and the cache's first pass
        t0 = time.time()
        model.fit(ds, epochs=1, verbose=0)
        print(f"batch {batch}: {REVIEWS / (time.time() - t0):.1f} reviews/s", flush=True)


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [64, 256])
