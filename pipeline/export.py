"""Export raw strings -> probability as a versioned TF SavedModel that TF Serving loads.

The version is written to a temporary folder, reloaded and checked in a separate
process that imports only TensorFlow, and only then renamed to
`<dir>/<name>/<N>/`; TF Serving ignores non-numeric folders, so it never sees a
half-written version, and earlier versions are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.config import Config, PipelineError
from pipeline.model import build_model, model_kwargs
from pipeline.vectorize import texts_to_padded_ids

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INPUT_NAME = "text"
OUTPUT_NAME = "probability"
WARMUP_FILE = "tf_serving_warmup_requests"

# Run in a fresh interpreter: proves the export needs nothing but TensorFlow.
_RELOAD_SCRIPT = """
import json, sys
import tensorflow as tf
texts = json.load(open(sys.argv[2]))
fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = fn(text=tf.constant(texts, dtype=tf.string))["probability"]
json.dump(out.numpy().astype(float).tolist(), sys.stdout)
"""


class ExportError(PipelineError):
    """The export could not be written or did not pass its reload check; nothing was published."""


@dataclass(frozen=True)
class ExportResult:
    path: str
    version: int
    max_abs_diff: float
    checked_texts: int


def in_memory_predict(vectorizer: keras.layers.TextVectorization, model: keras.Model,
                      texts: list[str], max_length: int) -> np.ndarray:
    """Probabilities from the in-memory vectorizer and model: the reference for the export."""
    ids = texts_to_padded_ids(vectorizer, tf.constant(texts, dtype=tf.string), max_length)
    return np.asarray(model(ids, training=False), dtype=np.float64).reshape(-1)


def _serving_archive(vectorizer: keras.layers.TextVectorization, model: keras.Model,
                     cfg: Config) -> keras.export.ExportArchive:
    # A cuDNN-free copy: a graph traced on a GPU would otherwise hold CudnnRNN ops
    # that a CPU-only server cannot run.
    serve_model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model),
                              use_cudnn=False)
    serve_model.set_weights(model.get_weights())
    max_length = cfg.vectorize.max_length

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    def serve(text):
        ids = texts_to_padded_ids(vectorizer, text, max_length)
        probability = serve_model(ids, training=False)
        return {OUTPUT_NAME: tf.reshape(tf.cast(probability, tf.float32), [-1])}

    archive = keras.export.ExportArchive()
    archive.track(serve_model)
    if not vectorizer.built:  # one rebuilt from a vocabulary file has not been called yet
        vectorizer(tf.constant([""]))
    archive.track(vectorizer)
    archive.add_endpoint(SIGNATURE, serve)
    return archive


def write_warmup_requests(export_path: Path, texts: list[str], model_name: str) -> Path:
    """TF Serving replays these PredictRequests at load, so the first real request is fast."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    target = export_path / "assets.extra" / WARMUP_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target)) as writer:
        for batch in (texts[:1], texts):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE))
            request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
            log_record = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log_record.SerializeToString())
    return target


def reload_predict(export_path: Path, texts: list[str]) -> np.ndarray:
    """Probabilities from the SavedModel, computed in a process that imports only TensorFlow."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    try:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, "-I", "-c", _RELOAD_SCRIPT, str(export_path), f.name],
                              capture_output=True, text=True, env=env, timeout=600)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"reloading the export failed: {tail[0]}")
    return np.asarray(json.loads(proc.stdout), dtype=np.float64)


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())


def publish(tmp_path: Path, model_dir: Path) -> tuple[Path, int]:
    """Rename a finished export to the next free version; concurrent exporters never collide."""
    while True:
        version = (existing_versions(model_dir) or [0])[-1] + 1
        target = model_dir / str(version)
        try:
            # rename() refuses a non-empty target, so a version taken meanwhile is never replaced.
            os.rename(tmp_path, target)
            return target, version
        except OSError:
            if not target.exists():
                raise


def export_model(vectorizer: keras.layers.TextVectorization, model: keras.Model, cfg: Config,
                 check_texts: list[str]) -> ExportResult:
    """Write, verify and publish one SavedModel version; raise (leaving nothing) on failure."""
    model_dir = Path(cfg.export.dir) / cfg.name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=model_dir))
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o777 & ~umask)  # mkdtemp makes it private; a serving user must read it
    try:
        _serving_archive(vectorizer, model, cfg).write_out(str(tmp_path), verbose=False)
        write_warmup_requests(tmp_path, check_texts[:8], cfg.name)
        expected = in_memory_predict(vectorizer, model, check_texts, cfg.vectorize.max_length)
        got = reload_predict(tmp_path, check_texts)
        diff = float(np.max(np.abs(expected - got)))
        if not np.all(np.isfinite(got)) or diff > cfg.export.verify_tolerance:
            raise ExportError(f"export check failed: reloaded predictions differ by {diff:.3g} "
                               f"(tolerance {cfg.export.verify_tolerance:g})")
        path, version = publish(tmp_path, model_dir)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    log.info("exported %s (version %d); reloaded predictions match within %.2g",
             path, version, diff)
    return ExportResult(str(path), version, diff, len(check_texts))


def save_result(result: ExportResult, path: Path) -> None:
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")
