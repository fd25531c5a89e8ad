"""`make gpu-check`: on a GPU, is the LSTM on cuDNN, how fast is an epoch, does the export serve on CPUs.

Without a GPU it says so in one line. The graph helpers here (op types of a traced
training step or of a SavedModel) are also what `tests/test_gpu_check.py` uses to prove
the GPU path on a CPU, by making Keras believe a GPU is present while tracing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

from pipeline import atomic
from pipeline import data as data_mod
from pipeline.config import Config
from pipeline.distribute import make_strategy, seed_everything
from pipeline.errors import PipelineError
from pipeline.export import check_texts, export_model
from pipeline.model import EpochTimer, build_model, model_kwargs
from pipeline.vectorize import adapt_vectorizer, vectorize_split

CUDNN_OP_PREFIX = "CudnnRNN"
_CUDNN_FORWARD = re.compile(r"^CudnnRNN(V\d+)?$")  # forward kernels; backprop ops are extra


def graph_nodes(graph_def: tf.compat.v1.GraphDef) -> Iterator:
    """Every NodeDef in a GraphDef, its function library (loop bodies, branches, calls) included."""
    yield from graph_def.node
    for function in graph_def.library.function:
        yield from function.node_def


def graph_op_types(graph_def: tf.compat.v1.GraphDef) -> list[str]:
    """Every op type in a GraphDef, its function library included."""
    return [node.op for node in graph_nodes(graph_def)]


def cudnn_ops(op_types: Iterable[str]) -> list[str]:
    """The cuDNN RNN ops among `op_types` (forward and backprop), in order."""
    return [t for t in op_types if t.startswith(CUDNN_OP_PREFIX)]


def cudnn_forward_count(op_types: Iterable[str]) -> int:
    """How many LSTM directions a graph runs on the cuDNN kernel."""
    return sum(1 for t in op_types if _CUDNN_FORWARD.match(t))


def _saved_model(export_path: str | Path):
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(export_path) / "saved_model.pb").read_bytes())
    return saved


def saved_model_op_types(export_path: str | Path) -> list[str]:
    """Every op type in a SavedModel's saved_model.pb, all meta graphs and functions included."""
    return [t for meta in _saved_model(export_path).meta_graphs for t in graph_op_types(meta.graph_def)]


def half_precision_ops(export_path: str | Path) -> list[str]:
    """Op types in a SavedModel that compute in float16 (a `T` or `DstT` attribute of DT_HALF)."""
    return [node.op for meta in _saved_model(export_path).meta_graphs
            for node in graph_nodes(meta.graph_def)
            if any(node.attr[k].type == types_pb2.DT_HALF for k in ("T", "DstT") if k in node.attr)]


def lstm_directions(model: keras.Model) -> int:
    """LSTM layers in the model, a bidirectional one counted twice: the cuDNN kernels expected."""
    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Bidirectional):
            count += 2 * isinstance(layer.forward_layer, keras.layers.LSTM)
        elif isinstance(layer, keras.layers.LSTM):
            count += 1
    return count


def train_step_graph(model: keras.Model) -> tf.compat.v1.GraphDef:
    """Trace (without running) one training step of a compiled model: forward, gradients, update.

    Keras decides between the cuDNN and the generic LSTM kernel while tracing, so this
    graph shows which one `fit` runs on this machine.
    """
    strategy = model.distribute_strategy
    step = tf.function(lambda data: strategy.run(model.train_step, args=(data,)))
    spec = (tf.TensorSpec([None, None], tf.int64), tf.TensorSpec([None], tf.int64))
    with strategy.scope():  # where Keras builds the optimizer too
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        return step.get_concrete_function(spec).graph.as_graph_def()


def visible_devices() -> list[str]:
    """Physical devices TensorFlow sees, e.g. ['CPU:0', 'GPU:0']."""
    return [d.name.removeprefix("/physical_device:") for d in tf.config.list_physical_devices()]


def no_gpu_line(devices: list[str]) -> str:
    return (f"gpu-check: no GPU visible to TensorFlow (devices: {', '.join(devices) or 'none'}); "
            f"nothing to check on this machine, run `make gpu-check` on a GPU machine")


@contextmanager
def _gpus_hidden() -> Iterator[None]:
    """Child processes started inside see no GPU (this process keeps the ones it has)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _time_training(cfg: Config, strategy, vectorizer, train_ds, mixed: bool, epochs: int,
                   n: int) -> tuple[keras.Model, dict]:
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    with strategy.scope():
        model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))
    timer = EpochTimer()
    model.fit(train_ds, epochs=epochs, callbacks=[timer], verbose=0)
    ops = graph_op_types(train_step_graph(model))  # after fit: everything is built as fit builds it
    steady = min(timer.seconds[1:] or timer.seconds)  # the first epoch also traces and tokenizes
    return model, {
        "mixed_precision": mixed,
        "cudnn_lstm_directions": cudnn_forward_count(ops),
        "lstm_directions": lstm_directions(model),
        "seconds_per_epoch": [round(s, 3) for s in timer.seconds],
        "steady_seconds_per_epoch": round(steady, 3),
        "reviews_per_s": round(n / steady, 1),
    }


def _check_export(cfg: Config, vectorizer, model: keras.Model, texts: list[str]) -> dict:
    """Export to a temporary folder and reload it in a child process that sees no GPU."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-export-") as tmp:
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"dir": tmp})})
        try:
            with _gpus_hidden():
                result = export_model(vectorizer, model, cfg, texts)
        except PipelineError as exc:
            return {"ok": False, "error": str(exc)}
        leftover = sorted(set(cudnn_ops(saved_model_op_types(result.path))))
    return {"ok": not leftover, "max_abs_diff": result.max_abs_diff,
            "tolerance": cfg.export.verify_tolerance, "cudnn_ops_in_export": leftover,
            "checked_texts": result.checked_texts}


def run_gpu_check(cfg: Config, train_examples: int, epochs: int) -> dict:
    """Devices, cuDNN use, seconds per epoch without and with mixed precision, the export check."""
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_train_examples": train_examples})})
    # Mixed precision is set per leg below, so the strategy is made without it.
    strategy = make_strategy(cfg.distribute.model_copy(update={"mixed_precision": False}))
    seed_everything(cfg)
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    raw_train = raw.train.cache()
    n = data_mod.count(raw_train)
    vectorizer = adapt_vectorizer(cfg.vectorize, raw_train)
    replicas = strategy.num_replicas_in_sync
    train_ds = vectorize_split(raw_train, vectorizer, cfg.vectorize, cfg.train,
                               cfg.train.batch_size * replicas, shuffle_seed=cfg.seed, replicas=replicas)
    result: dict = {"devices": visible_devices(), "replicas": replicas, "train_examples": n,
                    "batch_size_per_replica": cfg.train.batch_size, "epochs": epochs, "legs": []}
    models = {}
    try:
        for mixed in (False, True):
            models[mixed], leg = _time_training(cfg, strategy, vectorizer, train_ds, mixed, epochs, n)
            result["legs"].append(leg)
        # The export of the precision the config trains with; its serving copy must match it.
        mixed = cfg.distribute.mixed_precision
        keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
        result["export"] = _check_export(cfg, vectorizer, models[mixed], check_texts(raw.test))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    result["cudnn"] = all(leg["cudnn_lstm_directions"] == leg["lstm_directions"]
                          for leg in result["legs"])
    return result


def markdown_table(result: dict) -> str:
    """The self-check as a small markdown table."""
    rows = ["| check | result |", "|---|---|",
            f"| devices | {', '.join(result['devices'])} |",
            f"| slice | {result['train_examples']} training reviews, batch "
            f"{result['batch_size_per_replica']} x {result['replicas']} replica(s) |"]
    for leg in result["legs"]:
        name = "mixed_float16" if leg["mixed_precision"] else "float32"
        on, of = leg["cudnn_lstm_directions"], leg["lstm_directions"]
        rows.append(f"| LSTM on cuDNN ({name}) | {'yes' if on == of else 'NO'} "
                    f"({on} of {of} direction(s)) |")
        rows.append(f"| seconds per epoch ({name}) | {leg['steady_seconds_per_epoch']:.2f} "
                    f"({leg['reviews_per_s']:,.0f} reviews/s; first epoch "
                    f"{leg['seconds_per_epoch'][0]:.2f}) |")
    export = result["export"]
    if export["ok"]:
        verdict = (f"yes, within {export['max_abs_diff']:.2g} (tolerance {export['tolerance']:g}), "
                   f"no cuDNN op")
    elif "error" in export:
        verdict = f"NO: {export['error']}"
    else:
        verdict = f"NO: cuDNN ops in the export: {', '.join(export['cudnn_ops_in_export'])}"
    rows.append(f"| export reloads and matches with GPUs hidden | {verdict} |")
    return "\n".join(rows) + "\n"


def passed(result: dict) -> bool:
    return bool(result["cudnn"] and result["export"]["ok"])


def write_results(result: dict, json_path: Path) -> Path:
    """`<json>` and the table beside it as `.md`, each all or nothing."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path = json_path.with_suffix(".md")
    atomic.write_text(json_path, json.dumps(result, indent=2) + "\n")
    atomic.write_text(md_path, markdown_table(result))
    return md_path

