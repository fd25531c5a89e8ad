"""Peak memory of training steps on the longest batches: what sets a run's peak RSS.

    .venv/bin/python benchmarks/step_memory.py BATCH LENGTH [key=value ...]

Builds the model of configs/default.yaml (with the overrides) and trains a few steps on
random token ids shaped [BATCH, LENGTH], then prints the process's peak RSS. No data are
read: a run's longest bucket (vectorize.max_length tokens) is the shape that sets its peak.
Run it once per setting: the peak of a process only grows.
"""

from __future__ import annotations

import os
import resource
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.model import build_model, model_kwargs  # noqa: E402

STEPS = 4


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(batch: int, length: int, overrides: list[str]) -> None:
    cfg = load_config("configs/default.yaml", overrides)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vectorize.max_tokens, size=(batch, length), dtype=np.int64)
    labels = rng.integers(0, 2, size=(batch,)).astype(np.float32)
    model = build_model(cfg.vectorize.max_tokens, **model_kwargs(cfg.model))
    before = peak_gib()
    model.fit(ids, labels, batch_size=batch, epochs=STEPS, verbose=0)
    print(f"batch {batch} x {length} tokens, {' '.join(overrides) or 'defaults'}: "
          f"peak {peak_gib():.2f} GiB (model built: {before:.2f} GiB)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
