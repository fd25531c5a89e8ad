import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.export import WARMUP_FILE, existing_versions, publish
from pipeline.train import export_run

RELOAD = """
import json, sys
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
sig = m.signatures["serving_default"]
out = sig(text=tf.constant(["A wonderful superb film!", "Awful boring waste."]))
print(json.dumps({
    "mods": sorted(k for k in sys.modules if k.split('.')[0] in ('pipeline', 'keras')),
    "inputs": {k: v.dtype.name for k, v in sig.structured_input_signature[1].items()},
    "outputs": sorted(out),
    "p": out["probability"].numpy().tolist(),
}))
"""


def test_export_round_trip_in_a_tensorflow_only_process(trained_run):
    cfg, result = trained_run
    path = result.export.path
    proc = subprocess.run([sys.executable, "-I", "-c", RELOAD, path], capture_output=True,
                          text=True, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [m for m in got["mods"] if m.startswith("pipeline")]
    assert got["inputs"] == {"text": "string"}
    assert got["outputs"] == ["probability"]
    pos, neg = got["p"]
    assert 0.0 <= neg < 0.5 < pos <= 1.0  # the tiny data is easy: the model must have learnt it
    record = json.loads((result.run_dir / "export.json").read_text())
    assert record["max_abs_diff"] <= 1e-5 and record["checked_texts"] > 0


def test_signature_shapes(trained_run):
    _, result = trained_run
    sig = tf.saved_model.load(result.export.path).signatures["serving_default"]
    spec = sig.structured_input_signature[1]["text"]
    assert spec.shape.as_list() == [None] and spec.dtype == tf.string
    out = sig(text=tf.constant(["", "x", "great " * 1000]))["probability"]
    assert out.shape == (3,) and out.dtype == tf.float32
    assert np.all(np.isfinite(out)) and np.all((out.numpy() >= 0) & (out.numpy() <= 1))


def test_second_export_is_version_2_and_leaves_version_1(trained_run):
    cfg, result = trained_run
    v1 = Path(result.export.path)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in v1.rglob("*")}
    again = export_run(result.run_dir)
    assert again.version == result.export.version + 1
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in v1.rglob("*")} == before
    model_dir = Path(cfg.export.dir) / cfg.name
    assert existing_versions(model_dir)[-2:] == [result.export.version, again.version]
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".tmp")]


def test_publish_never_replaces_a_taken_version(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_text("v1")
    staged = tmp_path / ".tmp-x"
    staged.mkdir()
    (staged / "saved_model.pb").write_text("v2")
    path, version = publish(staged, tmp_path)
    assert version == 2 and (tmp_path / "1" / "saved_model.pb").read_text() == "v1"


def test_warmup_requests_parse_back(trained_run):
    from tensorflow_serving.apis import prediction_log_pb2

    _, result = trained_run
    path = f"{result.export.path}/assets.extra/{WARMUP_FILE}"
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    assert records
    for raw in records:
        entry = prediction_log_pb2.PredictionLog.FromString(raw)
        request = entry.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        texts = tf.make_ndarray(request.inputs["text"])
        assert texts.dtype == object and len(texts) >= 1
