"""Score reviews with an exported SavedModel: TensorFlow only, no training code.

`saved_models/<name>` means its newest version; `saved_models/<name>/<N>` that version.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import tensorflow as tf

SIGNATURE = "serving_default"  # the names pipeline/export.py writes
INPUT_NAME = "text"
OUTPUT_NAME = "probability"
THRESHOLD = 0.5  # as in the evaluation: probability >= 0.5 is "pos"
CHUNK = 1024  # reviews per call, so a long stdin stream never sits in memory at once


def resolve_version(model: Path) -> Path:
    """The version folder to load: `model` itself if it is one, else its newest version."""
    if (model / "saved_model.pb").is_file():
        return model
    versions = sorted((int(p.name), p) for p in model.glob("*")
                      if p.name.isdigit() and (p / "saved_model.pb").is_file()) if model.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"no exported model under {model}: run `make train` (or `make export`) "
                                "first, or pass --model saved_models/<name>[/<N>]")
    return versions[-1][1]


def load(model: Path):
    """The `serving_default` function of the newest (or given) version."""
    path = resolve_version(model)
    return path, tf.saved_model.load(str(path)).signatures[SIGNATURE]


def _chunks(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict(serve, texts: Iterable[str | bytes]) -> Iterator[dict]:
    """One `{"text", "probability", "label"}` per input, in order; bytes need not be UTF-8."""
    raw = (t.encode("utf-8", "surrogateescape") if isinstance(t, str) else t for t in texts)
    for chunk in _chunks(raw, CHUNK):
        probs = serve(**{INPUT_NAME: tf.constant(chunk, dtype=tf.string)})[OUTPUT_NAME].numpy()
        for text, p in zip(chunk, probs.tolist(), strict=True):
            yield {"text": text.decode("utf-8", "replace"), "probability": p,
                   "label": "pos" if p >= THRESHOLD else "neg"}
