"""What a trained embedding learned: nearest neighbours of probe words, and the Projector files.

`write_projector` lays out a run's embedding for TensorBoard's Embedding Projector
(`tensorboard --logdir runs/<name>` -> Projector tab): vectors and words as TSV plus
the `projector_config.pbtxt` that points at them, so no checkpoint is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import atomic

PROBE_WORDS = ("excellent", "awful", "boring", "funny", "plot")
VECTORS_FILE = "embedding_vectors.tsv"
METADATA_FILE = "embedding_words.tsv"


def _label(word: str) -> str:
    return {"": "<pad>", "[UNK]": "<unk>"}.get(word, word)


def write_projector(embedding: np.ndarray, vocabulary: list[str], log_dir: Path) -> Path:
    """Vectors, words and projector config under `log_dir`; returns the config file."""
    from tensorboard.plugins import projector

    if embedding.shape[0] != len(vocabulary):
        raise ValueError(f"{embedding.shape[0]} embedding rows for {len(vocabulary)} words")
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in ((VECTORS_FILE, ("\t".join(f"{v:.5g}" for v in row) for row in embedding)),
                        (METADATA_FILE, (_label(w) for w in vocabulary))):
        atomic.write_text(log_dir / name, "".join(f"{line}\n" for line in lines))
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = f"embedding ({embedding.shape[1]}d)"
    entry.tensor_path = VECTORS_FILE
    entry.metadata_path = METADATA_FILE
    projector.visualize_embeddings(str(log_dir), config)
    # TensorBoard lists a folder as a run only once it holds an event file.
    import tensorflow as tf

    with tf.summary.create_file_writer(str(log_dir)).as_default():
        tf.summary.scalar("embedding/dimensions", embedding.shape[1], step=0)
    return log_dir / "projector_config.pbtxt"


def nearest_neighbours(embedding: np.ndarray, vocabulary: list[str], probes=PROBE_WORDS,
                       k: int = 5) -> dict[str, list[tuple[str, float]]]:
    """The `k` nearest words (cosine) to each probe word found in the vocabulary."""
    index = {w: i for i, w in enumerate(vocabulary)}
    norms = np.linalg.norm(embedding, axis=1)
    unit = embedding / np.maximum(norms, 1e-12)[:, None]
    out: dict[str, list[tuple[str, float]]] = {}
    for word in probes:
        if word not in index:
            continue
        sims = unit @ unit[index[word]]
        sims[[index[word], 0, 1][: min(3, len(sims))]] = -np.inf  # itself, padding, OOV
        best = np.argsort(-sims)[:k]
        out[word] = [(vocabulary[i], round(float(sims[i]), 3)) for i in best if np.isfinite(sims[i])]
    return out


def reduce_dim(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The `dim` leading principal components of `vectors`, rescaled to their spread.

    Lets one set of pretrained vectors start every smaller embedding size in a search.
    """
    if dim > vectors.shape[1]:
        raise ValueError(f"cannot reduce {vectors.shape[1]}-d vectors to {dim} dimensions")
    if dim == vectors.shape[1]:
        return vectors.astype(np.float32)
    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reduced = centred @ vt[:dim].T
    return (reduced * (vectors.std() / max(reduced.std(), 1e-12))).astype(np.float32)


def neighbours_markdown(columns: dict[str, dict[str, list]], probes=PROBE_WORDS, k: int = 5) -> str:
    """A table with one column per embedding (e.g. "16-d", "256-d") and one row per probe word."""
    names = list(columns)
    lines = ["| word | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for word in probes:
        cells = [", ".join(w for w, _ in columns[n].get(word, [])[:k]) or "-" for n in names]
        lines.append(f"| **{word}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)
