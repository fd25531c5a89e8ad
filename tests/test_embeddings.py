import numpy as np
import pytest

from pipeline.embeddings import (
    METADATA_FILE,
    VECTORS_FILE,
    nearest_neighbours,
    neighbours_markdown,
    reduce_dim,
    write_projector,
)


def test_a_training_run_leaves_projector_files_tensorboard_reads(trained_run):
    from google.protobuf import text_format
    from tensorboard.plugins.projector import projector_config_pb2

    _, result = trained_run
    folder = result.run_dir / "tensorboard" / "embedding"
    config = text_format.Parse((folder / "projector_config.pbtxt").read_text(),
                               projector_config_pb2.ProjectorConfig())
    (entry,) = config.embeddings
    vocabulary = (result.run_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    vectors = np.loadtxt(folder / entry.tensor_path, delimiter="\t", ndmin=2)
    words = (folder / entry.metadata_path).read_text(encoding="utf-8").splitlines()
    assert len(words) == vectors.shape[0] == len(vocabulary) + 2  # + padding and OOV rows
    assert words[:2] == ["<pad>", "<unk>"] and words[2:] == vocabulary
    assert any(folder.glob("events.out.tfevents*"))  # so TensorBoard lists it as a run


def test_projector_refuses_mismatched_rows(tmp_path):
    with pytest.raises(ValueError, match="3 embedding rows for 2 words"):
        write_projector(np.zeros((3, 2)), ["", "[UNK]"], tmp_path)
    assert not (tmp_path / VECTORS_FILE).exists() and not (tmp_path / METADATA_FILE).exists()


def test_nearest_neighbours_by_cosine():
    vocab = ["", "[UNK]", "good", "great", "bad", "awful", "plot"]
    emb = np.array([[0, 0], [0.1, 0.1], [1, 0.1], [0.9, 0.2], [-1, 0.1], [-0.8, 0.0], [0.0, 1.0]])
    out = nearest_neighbours(emb, vocab, probes=("good", "awful", "missing"), k=2)
    assert set(out) == {"good", "awful"}
    assert [w for w, _ in out["good"]] == ["great", "plot"]
    assert [w for w, _ in out["awful"]] == ["bad", "plot"]
    assert out["good"][0][1] > out["good"][1][1]


def test_reduce_dim_keeps_the_leading_structure():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(200, 1)) * 5
    vectors = np.hstack([signal, signal, rng.normal(size=(200, 6)) * 0.1])
    reduced = reduce_dim(vectors, 2)
    assert reduced.shape == (200, 2) and reduced.dtype == np.float32
    assert abs(np.corrcoef(reduced[:, 0], signal[:, 0])[0, 1]) > 0.99
    np.testing.assert_allclose(reduce_dim(vectors, 8), vectors.astype(np.float32))
    with pytest.raises(ValueError, match="8-d vectors to 9"):
        reduce_dim(vectors, 9)


def test_neighbours_table_puts_sizes_side_by_side():
    table = neighbours_markdown({"16-d": {"awful": [("bad", 0.9), ("dull", 0.8)]},
                                 "256-d": {"awful": [("terrible", 0.7)], "plot": [("story", 0.6)]}},
                                probes=("awful", "plot"))
    lines = table.splitlines()
    assert lines[0] == "| word | 16-d | 256-d |"
    assert lines[2] == "| **awful** | bad, dull | terrible |"
    assert lines[3] == "| **plot** | - | story |"
