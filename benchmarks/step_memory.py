"""Peak memory and time of training steps on the longest batches: what sets a run's peak RSS.

    .venv/bin/python benchmarks/step_memory.py [--bf16] BATCH LENGTH [key=value ...]

Builds the model of configs/default.yaml (with the overrides) and trains a few steps on
random token ids shaped [BATCH, LENGTH], then prints the process's peak RSS and the seconds
of a step after the first (which traces the graph). No data are read: a run's longest
bucket (vectorize.max_length tokens) is the shape that sets its peak. The rate in GFLOP/s
counts the LSTM's matrix products only (forward and backward, every direction), so it says
how close a step comes to what the cores can do. `--bf16` computes in bfloat16 (Keras'
`mixed_bfloat16` policy, float32 weights), which some CPUs run faster. Run it once per
setting: the peak of a process only grows.
"""

from __future__ import annotations

import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.model import build_model, model_kwargs  # noqa: E402

STEPS = 4


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def lstm_gflop(batch: int, length: int, embedding_dim: int, units: int, directions: int,
               layers: int) -> float:
    """The LSTM's multiply-adds of one training step, in GFLOP: per token, direction and layer
    [inputs, state] x [4 gates], the backward pass twice that again. A layer above the first
    reads the one below it (units x directions wide)."""
    widths = [embedding_dim] + [units * directions] * (layers - 1)
    forward = sum(2 * batch * length * (width + units) * 4 * units * directions for width in widths)
    return 3 * forward / 1e9


def main(batch: int, length: int, overrides: list[str]) -> None:
    cfg = load_config("configs/default.yaml", overrides)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vectorize.max_tokens, size=(batch, length), dtype=np.int64)
    labels = rng.integers(0, 2, size=(batch,)).astype(np.float32)
    model = build_model(cfg.vectorize.max_tokens, **model_kwargs(cfg.model))
    before = peak_gib()
    model.fit(ids, labels, batch_size=batch, epochs=1, verbose=0)  # traces the step
    start = time.perf_counter()
    model.fit(ids, labels, batch_size=batch, epochs=STEPS, verbose=0)
    step = (time.perf_counter() - start) / STEPS
    m = cfg.model
    rate = lstm_gflop(batch, length, m.embedding_dim, m.lstm_units, 1 + m.bidirectional,
                      m.num_layers) / step
    print(f"batch {batch} x {length} tokens, {' '.join(overrides) or 'defaults'}: "
          f"peak {peak_gib():.2f} GiB (model built: {before:.2f} GiB), {step:.2f} s a step "
          f"(LSTM {rate:.0f} GFLOP/s, {keras.mixed_precision.global_policy().name})", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--bf16" in args:
        args.remove("--bf16")
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    main(int(args[0]), int(args[1]), args[2:])
