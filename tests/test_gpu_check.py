"""The GPU path, proven on a CPU: Keras is made to believe a GPU is present while graphs are traced.

Keras picks the cuDNN LSTM kernel while tracing when `cudnn_ok()` holds: tanh and sigmoid
activations, no unroll, a bias (model.py keeps those defaults) and `_is_gpu_available()`.
Only the last is false here, so the simulation replaces it. A graph traced that way cannot
run on a CPU (there is no CudnnRNN kernel), but its ops show what a GPU would run.
"""

from __future__ import annotations

import importlib
import itertools
import json
import typing
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline.export
import pipeline.model
from pipeline.cli import main
from pipeline.config import ModelConfig, load_config
from pipeline.export import export_model, serving_archive
from pipeline.gpu_check import (
    cudnn_forward_count,
    cudnn_ops,
    graph_op_types,
    half_precision_ops,
    lstm_directions,
    markdown_table,
    passed,
    saved_model_op_types,
    train_step_graph,
    write_results,
)
from pipeline.model import build_model, model_kwargs
from pipeline.scoring import in_memory_predict
from pipeline.vectorize import make_vectorizer
from tests.helpers import NEGATIVE, NEUTRAL, POSITIVE

_rnn = importlib.import_module("keras.src.backend.tensorflow.rnn")

ROOT = Path(__file__).resolve().parent.parent
VOCAB = POSITIVE + NEGATIVE + NEUTRAL
TEXTS = ["A wonderful, moving film. Loved it!", "Awful and boring: a waste.",
         "the plot was dull but the actor was brilliant " * 5, "", "   ", "unknown words only"]

# Every model shape the config can build: a pooling added to ModelConfig's Literal is picked up here.
# The stacked BiLSTM (the shape with the most cuDNN layers) meets every pooling in both precisions;
# a single unidirectional layer meets every pooling once, precisions alternating. Every value of
# every dimension is covered, in half the cases of the full product (CI time).
POOLINGS = typing.get_args(ModelConfig.model_fields["pooling"].annotation)
SHAPES = ([(True, 2, p, m) for p, m in itertools.product(POOLINGS, (False, True))]
          + [(False, 1, p, i % 2 == 1) for i, p in enumerate(POOLINGS)])


@contextmanager
def simulated_gpu():
    """Keras believes a GPU is present; fails loudly if Keras no longer asks where it did."""
    original = getattr(_rnn, "_is_gpu_available", None)
    assert callable(original), "keras.src.backend.tensorflow.rnn._is_gpu_available is gone: " \
                               "find where Keras now decides on cuDNN and update this simulation"
    _rnn._is_gpu_available = lambda: True
    try:
        yield
    finally:
        _rnn._is_gpu_available = original


@pytest.fixture
def policy():
    """Set the global dtype policy for one test; float32 again afterwards."""
    yield lambda mixed: keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    keras.mixed_precision.set_global_policy("float32")


MIXED_TOLERANCE = pipeline.export.MIXED_PRECISION_TOLERANCE


def tiny_cfg(tmp_path: Path, bidirectional: bool, num_layers: int, pooling: str, mixed: bool,
             config: str | None = None):
    return load_config(config, [
        "name=gpu_sim", f"export.dir={tmp_path / 'saved_models'}", "export.verify_tolerance=0.00001",
        "vectorize.max_tokens=100", "vectorize.max_length=32", "model.embedding_dim=8",
        "model.lstm_units=8", "model.embedding_init=random", f"model.bidirectional={bidirectional}",
        f"model.num_layers={num_layers}", f"model.pooling={pooling}",
        f"distribute.mixed_precision={mixed}"])


def test_shapes_cover_every_value_of_every_dimension():
    assert {"last", "mean", "max", "concat"} <= set(POOLINGS)
    for i, values in enumerate(((False, True), (1, 2), POOLINGS, (False, True))):
        assert {shape[i] for shape in SHAPES} == set(values)
    for pooling, mixed in itertools.product(POOLINGS, (False, True)):  # each pooling in both precisions
        assert any(s[2:] == (pooling, mixed) for s in SHAPES)


def test_only_the_simulated_gpu_traces_into_cudnn():
    model = build_model(50, embedding_dim=8, lstm_units=8, bidirectional=True)
    assert cudnn_ops(graph_op_types(train_step_graph(model))) == []  # a CPU: the generic kernel
    with simulated_gpu():
        ops = graph_op_types(train_step_graph(model))
    assert cudnn_forward_count(ops) == 2 and any(t.startswith("CudnnRNNBackprop") for t in ops)


def test_adversarial_training_runs_both_of_its_passes_on_cudnn():
    model = build_model(50, embedding_dim=8, lstm_units=8, bidirectional=True, adversarial_epsilon=0.02)
    with simulated_gpu():
        ops = graph_op_types(train_step_graph(model))
    # The clean and the perturbed pass, each in both directions; no generic LSTM kernel.
    assert cudnn_forward_count(ops) == 4 and any(t.startswith("CudnnRNNBackprop") for t in ops)
    assert not any(t.endswith("While") for t in ops)  # the generic kernel loops in a While


@pytest.mark.slow
@pytest.mark.parametrize("bidirectional,num_layers,pooling,mixed", SHAPES,
                         ids=[f"{'bi' if b else 'uni'}-{n}x-{p}-{'mixed' if m else 'fp32'}"
                              for b, n, p, m in SHAPES])
def test_gpu_training_runs_cudnn_and_its_export_has_none(bidirectional, num_layers, pooling, mixed,
                                                        tmp_path, policy):
    cfg = tiny_cfg(tmp_path, bidirectional, num_layers, pooling, mixed)
    policy(mixed)
    vectorizer = make_vectorizer(cfg.vectorize, VOCAB)
    model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))
    export_path = tmp_path / "export"
    with simulated_gpu():
        ops = graph_op_types(train_step_graph(model))
        serving_archive(vectorizer, model, cfg).write_out(str(export_path), verbose=False)

    # Every LSTM direction trains on cuDNN, gradients included.
    assert cudnn_forward_count(ops) == lstm_directions(model) == num_layers * (1 + bidirectional)
    assert any(t.startswith("CudnnRNNBackprop") for t in ops)
    # The export holds no cuDNN op and no float16 compute in any function, and serves what
    # the model predicts (within float16 rounding for a mixed-precision model).
    assert cudnn_ops(saved_model_op_types(export_path)) == []
    assert half_precision_ops(export_path) == []
    serve = tf.saved_model.load(str(export_path)).signatures["serving_default"]
    got = serve(text=tf.constant(TEXTS))["probability"].numpy()
    expected = in_memory_predict(vectorizer, model, TEXTS, cfg.vectorize.max_length)
    assert np.ptp(expected) > 0  # distinct outputs, so a mix-up of reviews would show
    np.testing.assert_allclose(got, expected, atol=MIXED_TOLERANCE if mixed else 1e-5, rtol=0)


@pytest.mark.slow
def test_gpu_profile_export_after_simulated_gpu_training_passes_its_reload_check(tmp_path, policy):
    """The full export path (TensorFlow-only reload in a child process) for the GPU profile's shape."""
    cfg = tiny_cfg(tmp_path, True, 1, "max", True, config=ROOT / "configs" / "gpu.yaml")
    policy(True)
    vectorizer = make_vectorizer(cfg.vectorize, VOCAB)
    model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))
    x = np.array([[2, 3, 4, 0], [5, 6, 0, 0]])
    model.train_on_batch(x, np.array([1, 0]))  # weights and optimizer state that moved
    with simulated_gpu():
        assert cudnn_forward_count(graph_op_types(train_step_graph(model))) == 2
        result = export_model(vectorizer, model, cfg, TEXTS)
    assert result.max_abs_diff <= MIXED_TOLERANCE and result.version == 1
    assert cudnn_ops(saved_model_op_types(result.path)) == []
    assert half_precision_ops(result.path) == []  # a CPU server computes in float32


def test_the_check_sees_cudnn_in_an_export_that_kept_it(tmp_path, monkeypatch):
    """The detector is not blind: an export made from the cuDNN graph is caught."""
    cfg = tiny_cfg(tmp_path, True, 2, "last", False)
    vectorizer = make_vectorizer(cfg.vectorize, VOCAB)
    model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))

    def keeps_cudnn(*args, use_cudnn="auto", **kwargs):
        return build_model(*args, **kwargs)  # the regression: use_cudnn=False dropped

    monkeypatch.setattr(pipeline.model, "build_model", keeps_cudnn)
    with simulated_gpu():
        serving_archive(vectorizer, model, cfg).write_out(str(tmp_path / "export"), verbose=False)
    assert "CudnnRNNV3" in cudnn_ops(saved_model_op_types(tmp_path / "export"))


def test_the_check_sees_float16_in_an_export_built_under_mixed_precision(tmp_path, monkeypatch, policy):
    """The float16 detector is not blind: a serving copy left under mixed_float16 is caught."""
    cfg = tiny_cfg(tmp_path, True, 1, "max", True)
    policy(True)
    vectorizer = make_vectorizer(cfg.vectorize, VOCAB)
    model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))
    monkeypatch.setattr(pipeline.export.keras.config, "set_dtype_policy", lambda _: None)  # the regression
    serving_archive(vectorizer, model, cfg).write_out(str(tmp_path / "export"), verbose=False)
    assert half_precision_ops(tmp_path / "export")


def test_gpu_profile_loads_and_asks_for_a_gpu_setup():
    cfg = load_config(ROOT / "configs" / "gpu.yaml")
    assert cfg.distribute.mixed_precision and cfg.train.deterministic == "auto"
    assert cfg.train.batch_size >= 256 and cfg.train.bucket_by_length
    default = load_config(ROOT / "configs" / "default.yaml")
    # the same model but a larger BiLSTM, which cuDNN makes cheap, trained faster
    assert cfg.model.lstm_units > default.model.lstm_units
    same = {"learning_rate": 0, "lstm_units": 0}
    assert cfg.model.model_copy(update=same) == default.model.model_copy(update=same)
    assert cfg.distill == default.distill and cfg.ngrams == default.ngrams
    assert cfg.vectorize == default.vectorize and cfg.data == default.data


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path, capsys):
    out_json = tmp_path / "gpu_check.json"
    assert main(["gpu-check", "--config", str(ROOT / "configs" / "gpu.yaml"), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no GPU" in out and "CPU:0" in out
    assert not out_json.exists()
    assert main(["gpu-check", "--epochs", "0"]) == 2  # bad flags fail in one line, GPU or not
    assert "--epochs: must be at least 1" in capsys.readouterr().err


def test_gpu_check_table_and_files_from_canned_figures(tmp_path):
    leg = {"lstm_directions": 2, "seconds_per_epoch": [9.5, 1.41, 1.38], "steady_seconds_per_epoch": 1.38,
           "reviews_per_s": 7246.4}
    result = {"devices": ["CPU:0", "GPU:0"], "replicas": 1, "train_examples": 10000,
              "batch_size_per_replica": 512, "epochs": 3, "cudnn": True,
              "legs": [leg | {"mixed_precision": False, "cudnn_lstm_directions": 2},
                       leg | {"mixed_precision": True, "cudnn_lstm_directions": 2,
                              "steady_seconds_per_epoch": 0.69, "reviews_per_s": 14492.8}],
              "export": {"ok": True, "max_abs_diff": 0.00031, "tolerance": 0.002,
                         "cudnn_ops_in_export": [], "checked_texts": 37}}
    table = markdown_table(result)
    assert "| devices | CPU:0, GPU:0 |" in table
    assert "| LSTM on cuDNN (mixed_float16) | yes (2 of 2 direction(s)) |" in table
    assert "| seconds per epoch (float32) | 1.38 (7,246 reviews/s; first epoch 9.50) |" in table
    assert "| seconds per epoch (mixed_float16) | 0.69 (14,493 reviews/s" in table
    assert "yes, within 0.00031 (tolerance 0.002)" in table and passed(result)

    md = write_results(result, tmp_path / "bench_results" / "gpu_check.json")
    assert json.loads((tmp_path / "bench_results" / "gpu_check.json").read_text()) == result
    assert md.read_text() == table
    assert sorted(p.name for p in md.parent.iterdir()) == ["gpu_check.json", "gpu_check.md"]

    failed = result | {"cudnn": False, "export": {"ok": False, "error": "export check failed: 0.1"},
                       "legs": [leg | {"mixed_precision": False, "cudnn_lstm_directions": 0}]}
    table = markdown_table(failed)
    assert "| LSTM on cuDNN (float32) | NO (0 of 2 direction(s)) |" in table
    assert "NO: export check failed" in table and not passed(failed)


@pytest.mark.slow
def test_gpu_check_runs_its_gpu_path_end_to_end_on_tiny_data(imdb_dir, tmp_path, monkeypatch, capsys):
    """The GPU branch, driven on the CPU: figures and files come out, and no cuDNN means exit 1."""
    import pipeline.gpu_check

    monkeypatch.setattr(pipeline.gpu_check, "visible_devices", lambda: ["CPU:0", "GPU:0"])
    out_json = tmp_path / "bench_results" / "gpu_check.json"
    args = ["gpu-check", "--train-examples", "60", "--epochs", "2", "--json", str(out_json),
            "--set", "data.source=directory", "--set", f"data.directory={imdb_dir}",
            "--set", "data.validation_fraction=0.25", "--set", "vectorize.max_tokens=100",
            "--set", "vectorize.max_length=32", "--set", "model.embedding_dim=8",
            "--set", "model.lstm_units=8", "--set", "train.batch_size=16",
            "--set", "distribute.mixed_precision=true"]
    assert main(args) == 1  # a CPU: the LSTM is not on cuDNN, and the check says so
    result = json.loads(out_json.read_text())
    assert result["train_examples"] == 60
    assert [leg["mixed_precision"] for leg in result["legs"]] == [False, True]
    for leg in result["legs"]:
        assert leg["cudnn_lstm_directions"] == 0 and leg["lstm_directions"] == 2
        assert len(leg["seconds_per_epoch"]) == 2 and leg["reviews_per_s"] > 0
    assert result["export"]["ok"] and result["export"]["max_abs_diff"] <= 1e-5
    assert keras.mixed_precision.global_policy().name == "float32"  # left as it was found
    out = capsys.readouterr().out
    assert "| LSTM on cuDNN (float32) | NO (0 of 2 direction(s)) |" in out
    assert "| export reloads and matches with GPUs hidden | yes" in out
    assert out_json.with_suffix(".md").read_text() in out
