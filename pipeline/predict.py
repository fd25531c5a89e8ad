"""Score reviews with an exported SavedModel: TensorFlow only, no training code.

`saved_models/<name>` means its newest version; `saved_models/<name>/<N>` that version.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.constants import INPUT_NAME, LABEL_NAME, LABELS, OUTPUT_NAME, SIGNATURE, THRESHOLD
from pipeline.errors import PipelineError

CHUNK = 1024  # reviews per call, so a long stdin stream never sits in memory at once
BATCH = 256  # reviews per call when scoring a labelled set: the batch docs/experiments/serving.md times
LABELS_FILE = "assets.extra/labels.txt"  # in a version: its label names, negative then positive


class ModelError(PipelineError):
    """No exported model where one was asked for, or one that cannot be loaded."""


def resolve_version(model: Path) -> Path:
    """The version folder to load: `model` itself if it is one, else its newest version."""
    if (model / "saved_model.pb").is_file():
        return model
    versions = sorted((int(p.name), p) for p in model.glob("*")
                      if p.name.isdigit() and (p / "saved_model.pb").is_file()) if model.is_dir() else []
    if not versions:
        raise ModelError(f"no exported model under {model}: run `make train` (or `make export`) "
                                "first, or pass --model saved_models/<name>[/<N>]")
    return versions[-1][1]


def load(model: Path):
    """The `serving_default` function of the newest (or given) version."""
    path = resolve_version(model)
    try:
        signatures = tf.saved_model.load(str(path)).signatures
    except Exception as exc:  # a damaged file fails in protobuf, TF or Python: all mean the same
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the exported model {path}: {why}; export it again "
                         "(`make export`) or pass another version with --model") from None
    if SIGNATURE not in signatures:
        raise ModelError(f"the model {path} has no {SIGNATURE!r} signature: not an export of "
                         "this pipeline")
    return path, signatures[SIGNATURE]


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
    """One `{"text", "probability", "label"}` per input, in order; bytes need not be UTF-8.

    The label is the export's own `label` output (the class names it was trained with);
    an export from before that output existed gets pos/neg.
    """
    raw = (t.encode("utf-8", "surrogateescape") if isinstance(t, str) else t for t in texts)
    for chunk in _chunks(raw, CHUNK):
        out = serve(**{INPUT_NAME: tf.constant(chunk, dtype=tf.string)})
        probs = out[OUTPUT_NAME].numpy().tolist()
        names = ([n.decode("utf-8", "replace") for n in out[LABEL_NAME].numpy()] if LABEL_NAME in out
                 else [LABELS[p >= THRESHOLD] for p in probs])
        for text, p, name in zip(chunk, probs, names, strict=True):
            yield {"text": text.decode("utf-8", "replace"), "probability": p, "label": name}


def label_names(path: Path) -> tuple[str, str] | None:
    """The (negative, positive) names a version serves, from its labels file; None for a version
    exported before it was written (its `label` output still names them, row by row)."""
    file = path / LABELS_FILE
    if not file.is_file():
        return None
    names = file.read_text(encoding="utf-8").splitlines()
    return (names[0], names[1]) if len(names) >= 2 else None


def score(serve, texts: list[str | bytes], batch_size: int = BATCH) -> tuple[np.ndarray, list[str]]:
    """Probabilities and label names of `texts`, in input order, `batch_size` at a time.

    Reviews of similar length share a call: the serving graph pads each call to its own
    longest review, so sorting first spends less time on padding.
    """
    raw = [t.encode("utf-8", "surrogateescape") if isinstance(t, str) else t for t in texts]
    order = np.argsort([len(t) for t in raw], kind="stable")
    probabilities = np.zeros(len(raw), dtype=np.float64)
    names: list[str] = [""] * len(raw)
    for start in range(0, len(raw), batch_size):
        index = order[start:start + batch_size]
        out = serve(**{INPUT_NAME: tf.constant([raw[i] for i in index], dtype=tf.string)})
        p = out[OUTPUT_NAME].numpy()
        probabilities[index] = p
        batch_names = ([n.decode("utf-8", "replace") for n in out[LABEL_NAME].numpy()]
                       if LABEL_NAME in out else [LABELS[v >= THRESHOLD] for v in p])
        for i, name in zip(index, batch_names, strict=True):
            names[i] = name
    return probabilities, names
