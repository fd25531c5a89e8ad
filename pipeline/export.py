"""Export raw strings -> probability as a versioned TF SavedModel that TF Serving loads.

Only the export lives here: build the serving graph, verify it against the in-memory
model (whose probabilities `pipeline.scoring` computes), publish it as the next version,
and re-export a finished run (`export_run`).

The version is written to a temporary folder `<dir>/<name>/.tmp-export-<host>-<pid>-*/`,
reloaded and checked in a separate process that imports only TensorFlow, and only then
renamed to `<dir>/<name>/<N>/`; TF Serving ignores non-numeric folders, so it never sees
a half-written version, and earlier versions are never touched. A failure removes the
temporary folder; one left by a killed exporter is removed by the next export.

Before the rename, the release gate (`pipeline.gate`, on with `export.gate`) compares the
new model with the newest published version on the run's test split and refuses to publish
one that is worse beyond noise; `force` publishes it anyway. Either way the comparison is
returned, for the run's export.json.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import atomic, predict
from pipeline import data as data_mod
from pipeline.config import Config
from pipeline.constants import INPUT_NAME, LABEL_NAME, LABELS, OUTPUT_NAME, SIGNATURE, THRESHOLD
from pipeline.errors import ExportError
from pipeline.gate import GateRefused, GateRows, gate, refusal
from pipeline.model import float32_model, logit_fn
from pipeline.ngrams import NgramModel
from pipeline.run_files import load_run
from pipeline.runs import EXPORT_FILE, RUN_FILE, read_json
from pipeline.scoring import evaluate_rows, in_memory_predict, served_probability

log = logging.getLogger(__name__)

WARMUP_FILE = "tf_serving_warmup_requests"
TEMP_PREFIX = ".tmp-export-"  # + <host>-<pid>-<random>: whose it is, to clear it once its owner is gone

# First lines of the reload child (argv: export path, texts JSON, parent pid): it must not
# outlive the exporter. Linux kills it when the parent dies (PR_SET_PDEATHSIG = 1); elsewhere
# a thread watches the parent pid.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys, threading, time
try:
    if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL)) != 0:
        raise OSError("prctl")
except (OSError, AttributeError):
    def _watch():
        while os.getppid() == int(sys.argv[3]):
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=_watch, daemon=True).start()
if os.getppid() != int(sys.argv[3]):  # the exporter died before the watch began
    sys.exit(1)
"""
# Run in a fresh interpreter: proves the export needs nothing but TensorFlow.
_RELOAD_BODY = f"""
import json
import tensorflow as tf
texts = json.load(open(sys.argv[2]))
fn = tf.saved_model.load(sys.argv[1]).signatures["{SIGNATURE}"]
out = fn({INPUT_NAME}=tf.constant(texts, dtype=tf.string))["{OUTPUT_NAME}"]
json.dump(out.numpy().astype(float).tolist(), sys.stdout)
"""
_RELOAD_SCRIPT = _DIE_WITH_PARENT + _RELOAD_BODY


@dataclass(frozen=True)
class ExportResult:
    path: str
    version: int
    max_abs_diff: float
    checked_texts: int
    gate: dict | None = None  # the release gate's comparison and decision; None when it was off


def check_texts(raw_test: tf.data.Dataset, n: int = 32) -> list[str]:
    """Real test reviews plus edge cases: what the export check compares on."""
    reviews = [t.decode("utf-8", "replace") for t, _ in raw_test.take(n).as_numpy_iterator()]
    return reviews + ["", "   ", "!!!", "A wonderful, moving film.", "Dull and far too long."]


def serving_archive(vectorizer: keras.layers.TextVectorization, model: keras.Model,
                    cfg: Config, ngram: NgramModel | None = None,
                    labels: tuple[str, str] = LABELS) -> keras.export.ExportArchive:
    # A cuDNN-free, float32 copy: a graph traced on a GPU would otherwise hold CudnnRNN ops
    # that a CPU-only server cannot run, and a mixed-precision model would compute in 16 bits,
    # which most CPUs run slowly.
    serve_model = float32_model(model, cfg.model, use_cudnn=False)
    max_length = cfg.vectorize.max_length
    lstm_logit = logit_fn(serve_model)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    def serve(text):
        probability = served_probability(vectorizer, lstm_logit, ngram, text, max_length)
        # The user's class names beside the probability, so a client needs no threshold or mapping.
        label = tf.where(probability >= THRESHOLD, tf.constant(labels[1]), tf.constant(labels[0]))
        return {OUTPUT_NAME: probability, LABEL_NAME: label}

    archive = keras.export.ExportArchive()
    archive.track(serve_model)
    if ngram is not None:
        archive.track(ngram.layer)
    if not vectorizer.built:  # one rebuilt from a vocabulary file has not been called yet
        vectorizer(tf.constant([""]))
    archive.track(vectorizer)
    archive.add_endpoint(SIGNATURE, serve)
    return archive


def write_label_names(export_path: Path, labels: tuple[str, str]) -> None:
    """The names the version serves, negative then positive, for readers that have no run record
    (`imdb-pipeline evaluate`); TF Serving ignores files in assets.extra other than its warm-up."""
    target = export_path / predict.LABELS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(f"{name}\n" for name in labels), encoding="utf-8")


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
    """Probabilities from the SavedModel, computed in a process that imports only TensorFlow.

    The texts go in a file beside `export_path` (inside the export's temporary folder, so a
    kill leaves nothing in the system temp folder); the child dies with this process.
    """
    texts_file = export_path.parent / f"{export_path.name}.check-texts.json"
    texts_file.write_text(json.dumps(texts))
    try:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, "-I", "-c", _RELOAD_SCRIPT, str(export_path),
                               str(texts_file), str(os.getpid())],
                              capture_output=True, text=True, env=env, timeout=600)
    finally:
        texts_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"reloading the export failed: {tail[0]}")
    return np.asarray(json.loads(proc.stdout), dtype=np.float64)


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clear_stale_temps(model_dir: Path) -> list[Path]:
    """Remove temporary export folders whose exporter (on this host) is gone, e.g. after kill -9."""
    host, removed = socket.gethostname(), []
    for folder in model_dir.glob(f"{TEMP_PREFIX}*"):
        owner_host, _, rest = folder.name[len(TEMP_PREFIX):].rpartition("-")[0].rpartition("-")
        pid = rest if rest.isdigit() else ""
        # Another host's folder (a shared disk) or an unparseable name: its owner cannot be checked.
        if owner_host == host and pid and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d temporary export folder(s) left by exporters that are gone", len(removed))
    return removed


# The operating system's own words for a failed write ("No space left on device", ...),
# longest first, so that one containing another is found whole.
_OS_CAUSES = sorted({os.strerror(n) for n in errno.errorcode}, key=len, reverse=True)


def _write_cause(exc: BaseException) -> str:
    """Why a write failed, in a few words: TensorFlow's message also names the op, the
    device and a temporary file (`{{function_node __wrapped__SaveV2...}} /path...; No space
    left on device [Op:SaveV2]`), none of which helps the user."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = exc.message if isinstance(exc, tf.errors.OpError) else str(exc)
    text = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:[^\]]*\].*", "", text or "")
    lines = text.strip().splitlines()
    found = next((cause for cause in _OS_CAUSES if cause in text), None)
    return found or (lines[0][:200] if lines else type(exc).__name__)


def _cannot_write(model_dir: Path, exc: BaseException) -> ExportError:
    why = _write_cause(exc)
    return ExportError(f"cannot write the export to {model_dir}: {why}; nothing was published "
                       "(free space or fix permissions, then run `make export`)")


def check_writable(cfg: Config) -> None:
    """Fail now, not after training, if `<export.dir>/<name>/` cannot be created and written.

    Probes with a temporary folder in the nearest existing folder on that path and removes
    it again: nothing is left behind.
    """
    target = Path(cfg.export.dir) / cfg.name
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"cannot export to {target}: {existing} is not a folder "
                          "(set export.dir to a folder you can write)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_temp_prefix(), dir=existing))
    except OSError as exc:
        raise ExportError(f"cannot export to {target}: {existing} is not writable ({exc.strerror}); "
                          "set export.dir to a folder you can write") from None


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


# float16 keeps ~3 significant digits: a mixed-precision model and its float32 export
# round apart by about this much; a wrong export (other weights, vocabulary) is off by far more.
MIXED_PRECISION_TOLERANCE = 2e-3


def check_tolerance(model: keras.Model, tolerance: float) -> float:
    """The export check's tolerance: at least float16's rounding for a mixed-precision model."""
    if model.compute_dtype == "float16" and tolerance < MIXED_PRECISION_TOLERANCE:
        log.info("export check: the model computes in float16 and its export in float32; "
                 "tolerance %g instead of export.verify_tolerance %g", MIXED_PRECISION_TOLERANCE, tolerance)
        return MIXED_PRECISION_TOLERANCE
    return tolerance


def export_model(vectorizer: keras.layers.TextVectorization, model: keras.Model, cfg: Config,
                 check_texts: list[str], ngram: NgramModel | None = None,
                 labels: tuple[str, str] = LABELS, test: GateRows | None = None,
                 force: bool = False) -> ExportResult:
    """Write, verify and publish one SavedModel version; raise (leaving nothing) on failure.

    `labels`: the names of label 0 and 1, served as the `label` output beside `probability`.
    `test`: the run's test rows for the release gate (`gate`), which runs when given and
    `export.gate` is on; `force` publishes a model the gate would refuse.
    """
    model_dir = Path(cfg.export.dir) / cfg.name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        clear_stale_temps(model_dir)
        work = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=model_dir))
    except OSError as exc:
        raise _cannot_write(model_dir, exc) from None
    staged = work / "model"  # what gets published; created with the usual permissions
    try:
        try:
            serving_archive(vectorizer, model, cfg, ngram, labels).write_out(str(staged), verbose=False)
            write_warmup_requests(staged, check_texts[:8], cfg.name)
            write_label_names(staged, labels)
        except (OSError, tf.errors.OpError) as exc:  # disk full, permissions, quota
            raise _cannot_write(model_dir, exc) from None
        expected = in_memory_predict(vectorizer, model, check_texts, cfg.vectorize.max_length, ngram)
        got = reload_predict(staged, check_texts)
        diff = float(np.max(np.abs(expected - got)))
        tolerance = check_tolerance(model, cfg.export.verify_tolerance)
        if not np.all(np.isfinite(got)) or diff > tolerance:
            raise ExportError(f"export check failed: reloaded predictions differ by {diff:.3g} "
                               f"(tolerance {tolerance:g})")
        decision = gate(model_dir, test, force) if test is not None and cfg.export.gate else None
        if decision is not None and decision["decision"] == "refused":
            raise GateRefused(refusal(decision, (existing_versions(model_dir) or [0])[-1] + 1),
                              {"path": None, "version": None, "max_abs_diff": diff,
                               "checked_texts": len(check_texts), "gate": decision})
        try:
            path, version = publish(staged, model_dir)
        except OSError as exc:
            raise _cannot_write(model_dir, exc) from None
    finally:  # after a publish only the emptied work folder is left; after a failure, all of it
        shutil.rmtree(work, ignore_errors=True)
    log.info("exported %s (version %d); reloaded predictions match within %.2g",
             path, version, diff)
    return ExportResult(str(path), version, diff, len(check_texts), decision)


def save_result(result: ExportResult | dict, path: Path) -> None:
    """The run's export.json: the published version, or a refused export's record (`GateRefused`)."""
    record = asdict(result) if isinstance(result, ExportResult) else result
    atomic.write_text(path, json.dumps(record, indent=2) + "\n")


def export_run(run_dir: Path, export_dir: str | None = None, force: bool = False,
               gate_on: bool | None = None) -> ExportResult:
    """Export a finished run again (a new version) without retraining.

    `gate_on` (None: the run's export.gate) switches the release gate; `force` publishes a
    model it refuses.
    """
    cfg, vectorizer, model, ngram = load_run(run_dir)
    update = {k: v for k, v in (("dir", export_dir), ("gate", gate_on)) if v is not None}
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update=update)})
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    # The names the run recorded: the data may have changed since, the model has not.
    labels = tuple(read_json(run_dir / RUN_FILE).get("labels") or raw.labels)
    test = None
    if cfg.export.gate:
        texts, y = data_mod.decoded(raw.test)
        _, served = evaluate_rows(vectorizer, model, texts, y, cfg.vectorize.max_length, ngram)
        test = GateRows(texts, y, served, labels)
    try:
        result = export_model(vectorizer, model, cfg, check_texts(raw.test), ngram, labels, test, force)
    except GateRefused as exc:
        save_result(exc.record, run_dir / EXPORT_FILE)
        raise
    save_result(result, run_dir / EXPORT_FILE)
    return result
