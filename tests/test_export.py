import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import pipeline.export
from pipeline.config import load_config
from pipeline.export import (
    WARMUP_FILE,
    ExportError,
    check_writable,
    clear_stale_temps,
    existing_versions,
    export_run,
    publish,
)
from pipeline.train import train
from tests.helpers import tiny_overrides

# One fresh interpreter (-I: not even this project on its path) that imports only TensorFlow and
# loads the export once, for both tests below: the round trip, and texts of every odd kind.
TF_ONLY = r"""
import json, sys
import tensorflow as tf
sig = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = sig(text=tf.constant(["A wonderful superb film!", "Awful boring waste."]))
round_trip = {
    "inputs": {k: v.dtype.name for k, v in sig.structured_input_signature[1].items()},
    "outputs": sorted(out),
    "p": out["probability"].numpy().tolist(),
    "label": [name.decode() for name in out["label"].numpy()],
}
odd = {
    "empty": [b""],
    "whitespace": [b" \t\n \r  "],
    "punctuation": [b"!?.,;:'\"()[]{}-_/\\... !!!"],
    "megabyte": [b"a great film, " * (1024 * 1024 // 14 + 1)],
    "invalid_utf8": [b"\xff\xfe great \xc3\x28 film \x80\xbf", b"\xed\xa0\x80"],
    "emoji_cjk": ["Loved it \U0001F600\U0001F3AC\U0001F44D".encode(), "非常好看的电影".encode(),
                  "とても良い映画でした".encode(), "정말 좋은 영화".encode()],
    "html": [b"<html><body><p>A <b>great</b> film</p><br /><br/><script>alert(1)</script>"
             b"<a href='x'>&amp; &lt;</a></body></html>"],
    "batch_of_one": [b"A wonderful film."],
}
small = [t for name, texts in odd.items() if name != "megabyte" for t in texts]
odd["batch_of_10000"] = [small[i % len(small)] + b" %d" % i for i in range(10000)]
any_text = {}
for name, texts in odd.items():
    p = sig(text=tf.constant(texts, dtype=tf.string))["probability"].numpy()
    any_text[name] = {"n": len(texts), "shape": list(p.shape), "dtype": p.dtype.name,
                      "finite": bool(tf.reduce_all(tf.math.is_finite(p))),
                      "min": float(p.min()), "max": float(p.max())}
print(json.dumps({"round_trip": round_trip, "any_text": any_text,
                  "mods": sorted(k for k in sys.modules if k.split(".")[0] in ("pipeline", "keras"))}))
"""


@pytest.fixture(scope="module")
def tf_only_report(trained_run):
    """What the TF_ONLY process saw of trained_run's export (one TensorFlow start for two tests)."""
    _, result = trained_run
    proc = subprocess.run([sys.executable, "-I", "-c", TF_ONLY, result.export.path],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_export_round_trip_in_a_tensorflow_only_process(trained_run, tf_only_report):
    from pipeline.export import load_run
    from pipeline.scoring import in_memory_predict

    _, result = trained_run
    got = tf_only_report["round_trip"]
    assert not [m for m in tf_only_report["mods"] if m.startswith("pipeline")]
    assert got["inputs"] == {"text": "string"}
    assert got["outputs"] == ["label", "probability"]
    assert got["label"] == ["pos", "neg"]  # imdb's own names when the data names none
    pos, neg = got["p"]
    assert neg < 0.5 < pos  # the tiny data is easy: the model must have learnt it
    # TensorFlow alone serves what the run's own model and branch predict
    cfg, vectorizer, model, branch = load_run(result.run_dir)
    texts = ["A wonderful superb film!", "Awful boring waste."]  # the two TF_ONLY scores
    expected = in_memory_predict(vectorizer, model, texts, cfg.vectorize.max_length, branch)
    assert got["p"] == pytest.approx(expected.tolist(), abs=1e-5)
    record = json.loads((result.run_dir / "export.json").read_text())
    assert record["max_abs_diff"] <= 1e-5
    assert record["checked_texts"] == 32 + 5  # the first 32 test reviews and the edge cases
    assert record == dataclasses.asdict(result.export)


def test_signature_shapes(trained_run):
    _, result = trained_run
    sig = tf.saved_model.load(result.export.path).signatures["serving_default"]
    spec = sig.structured_input_signature[1]["text"]
    assert spec.shape.as_list() == [None] and spec.dtype == tf.string
    out = sig(text=tf.constant(["", "x", "great " * 1000]))["probability"]
    assert out.shape == (3,) and out.dtype == tf.float32
    assert np.all(np.isfinite(out))
    assert out[2] > 0.5  # "great" over and over: the model has learnt that word


@pytest.mark.slow
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


def _publish_together(staged: Path, model_dir: Path, start: threading.Barrier, results: list) -> None:
    start.wait()  # all racers rename at once
    results.append(publish(staged, model_dir))


def test_concurrent_publishes_get_different_versions(tmp_path):
    model_dir = tmp_path / "saved"
    model_dir.mkdir()
    racers = 8
    for round_ in range(3):
        staged = []
        for i in range(racers):
            s = model_dir / f".tmp-{round_}-{i}"
            s.mkdir()
            (s / "saved_model.pb").write_text(f"{round_}-{i}")
            staged.append(s)
        start, results = threading.Barrier(racers), []
        threads = [threading.Thread(target=_publish_together, args=(s, model_dir, start, results))
                   for s in staged]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        versions = sorted(v for _, v in results)
        assert versions == list(range(round_ * racers + 1, (round_ + 1) * racers + 1))
    # Every staged export landed whole in its own version; none replaced another.
    contents = sorted((p / "saved_model.pb").read_text() for p in model_dir.iterdir())
    assert contents == sorted(f"{r}-{i}" for r in range(3) for i in range(racers))
    assert existing_versions(model_dir) == list(range(1, 3 * racers + 1))


@pytest.mark.slow
def test_failed_export_check_leaves_no_version_and_no_temp_folder(trained_run, monkeypatch):
    cfg, result = trained_run
    model_dir = Path(cfg.export.dir) / cfg.name
    before = sorted(p.name for p in model_dir.iterdir())
    # The reloaded SavedModel disagrees with the in-memory model: it must not be published.
    monkeypatch.setattr(pipeline.export, "reload_predict",
                        lambda path, texts: np.full(len(texts), 0.5))
    with pytest.raises(RuntimeError, match="export check failed"):
        export_run(result.run_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == before


@pytest.mark.slow
def test_failed_run_adds_no_version(imdb_dir, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path) + ["train.epochs=1"])

    def broken_reload(path, texts):
        raise RuntimeError("reloading the export failed: simulated")

    monkeypatch.setattr(pipeline.export, "reload_predict", broken_reload)
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg)
    model_dir = tmp_path / "saved_models" / "tiny"
    assert not existing_versions(model_dir)
    assert not list(model_dir.iterdir())  # no temp folder either
    run = next((tmp_path / "runs" / "tiny").iterdir())
    assert json.loads((run / "run.json").read_text())["status"] != "finished"


@pytest.mark.slow
def test_serving_signature_takes_any_text(tf_only_report):
    report = dict(tf_only_report["any_text"])
    assert [m for m in tf_only_report["mods"] if m.split(".")[0] == "pipeline"] == []
    assert set(report) == {"empty", "whitespace", "punctuation", "megabyte", "invalid_utf8",
                           "emoji_cjk", "html", "batch_of_one", "batch_of_10000"}
    for name, r in report.items():
        assert r["shape"] == [r["n"]] and r["dtype"] == "float32", name
        assert r["finite"], (name, r)
    assert report["megabyte"]["min"] > 0.5, report["megabyte"]  # "a great film, " over and over
    varied = report["batch_of_10000"]  # different texts, different scores: the text reaches the model
    assert varied["min"] < varied["max"], varied
    assert report["batch_of_10000"]["n"] == 10000 and report["batch_of_one"]["n"] == 1


@pytest.mark.slow
def test_cli_reports_a_failed_export_check_in_one_line(imdb_dir, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setattr(pipeline.export, "reload_predict", lambda path, texts: np.full(len(texts), 2.0))
    args = [a for item in tiny_overrides(imdb_dir, tmp_path) + ["train.epochs=1"] for a in ("--set", item)]
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export check failed" in err
    assert not existing_versions(tmp_path / "saved_models" / "tiny")


def test_unwritable_export_folder_fails_before_training(imdb_dir, tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "a_file").write_text("not a folder")
    args = [a for item in tiny_overrides(imdb_dir, tmp_path) + [f"export.dir={tmp_path / 'a_file' / 'sub'}"]
            for a in ("--set", item)]
    assert main(["train", *args]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0] and "a_file" in err[0]
    assert "Epoch" not in captured.out
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder


def test_check_writable_leaves_nothing_behind(tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(update={"export": tiny_cfg.export.model_copy(
        update={"dir": str(tmp_path / "new" / "saved")})})
    before = sorted(tmp_path.rglob("*"))
    check_writable(cfg)
    assert sorted(tmp_path.rglob("*")) == before


def test_check_writable_refuses_a_folder_it_cannot_write(tiny_cfg, monkeypatch):
    # (chmod cannot make a folder unwritable for root, who runs these tests in CI containers.)
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pipeline.export.tempfile, "mkdtemp", denied)
    with pytest.raises(ExportError, match=r"is not writable \(Permission denied\)"):
        check_writable(tiny_cfg)


# What TensorFlow raises when the variables cannot be written on a full disk: op, device and
# temporary file before the cause.
DISK_FULL = ("{{function_node __wrapped__SaveV2_dtypes_27_device_/job:localhost/replica:0/task:0/"
             "device:CPU:0}} /exports/tiny/.tmp-export-host-1-abc/model/variables/variables_temp/"
             "part-00000-of-00001.data-00000-of-00001.tempstate8154632468; No space left on device "
             "[Op:SaveV2] name: ")


@pytest.mark.parametrize("failure", [
    tf.errors.ResourceExhaustedError(None, None, DISK_FULL),
    tf.errors.UnknownError(None, None, "{{function_node __wrapped__X}} something odd [Op:X]"),
    PermissionError(13, "Permission denied"),
])
def test_failed_write_is_one_line_and_publishes_nothing(trained_run, monkeypatch, capsys, failure):
    from pipeline.cli import main

    cfg, result = trained_run
    model_dir = Path(cfg.export.dir) / cfg.name
    before = sorted(p.name for p in model_dir.iterdir())

    class FailingArchive:  # stands in for the Keras export archive: writes half, then fails
        def write_out(self, filepath, **kwargs):
            Path(filepath).mkdir(parents=True)
            (Path(filepath) / "saved_model.pb").write_bytes(b"half")
            raise failure

    monkeypatch.setattr(pipeline.export, "serving_archive", lambda *args: FailingArchive())
    assert main(["export", "--run", str(result.run_dir), "--set", f"export.dir={cfg.export.dir}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write the export to {model_dir}: " in err[0]
    assert "nothing was published" in err[0]
    cause = {tf.errors.ResourceExhaustedError: "No space left on device",
             tf.errors.UnknownError: "something odd"}.get(type(failure), "Permission denied")
    assert f"{model_dir}: {cause}; nothing was published" in err[0]
    assert "function_node" not in err[0] and "[Op:" not in err[0] and ".tmp-export" not in err[0]
    assert len(err[0]) < len(str(model_dir)) + 150
    assert sorted(p.name for p in model_dir.iterdir()) == before  # no version, no temp folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_gone_exporters_are_cleared(tmp_path):
    host, dead = socket.gethostname(), _dead_pid()
    names = {f".tmp-export-{host}-{dead}-abc": False,  # its exporter is gone: removed
             f".tmp-export-{host}-{os.getpid()}-def": True,  # a live exporter's: kept
             f".tmp-export-other-host-{dead}-ghi": True,  # another machine's: cannot tell, kept
             ".tmp-export-abc123": True}  # no owner in the name: kept
    for name in names:
        (tmp_path / name / "model").mkdir(parents=True)
    removed = clear_stale_temps(tmp_path)
    assert [p.name for p in removed] == [f".tmp-export-{host}-{dead}-abc"]
    assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}


# An exporter, killed while its reload child runs: the child is a stand-in that only waits.
KILLED_EXPORTER = """
import os, sys, tempfile
from pathlib import Path
import pipeline.export as ex
ex._RELOAD_SCRIPT = ex._DIE_WITH_PARENT + (
    "open(sys.argv[2] + '.pid', 'w').write(str(os.getpid())); import time; time.sleep(300)")
work = Path(tempfile.mkdtemp(prefix=ex._temp_prefix(), dir=sys.argv[1]))
ex.reload_predict(work / "model", ["a review"])
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return True
    return state == "Z"  # dead, waiting for a reaper


def test_kill_during_export_leaves_only_a_temp_folder_the_next_export_clears(tmp_path):
    import signal
    import time

    parent = subprocess.Popen([sys.executable, "-c", KILLED_EXPORTER, str(tmp_path)],
                              cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".tmp-export-*/*.pid")) and time.monotonic() < deadline:
            assert parent.poll() is None
            time.sleep(0.1)
        [pid_file] = list(tmp_path.glob(".tmp-export-*/*.pid"))
        texts_file = pid_file.with_suffix("")
        assert texts_file.name == "model.check-texts.json"  # inside the temp folder, not /tmp
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child)  # the reload child died with its parent
    finally:
        parent.kill()
    assert clear_stale_temps(tmp_path) == [pid_file.parent]
    assert not list(tmp_path.iterdir())


def test_the_export_serves_the_users_label_names(files_run):
    _, result = files_run
    sig = tf.saved_model.load(result.export.path).signatures["serving_default"]
    out = sig(text=tf.constant(["A wonderful superb film!", "Awful boring waste.", ""]))
    assert out["label"].dtype == tf.string and out["probability"].dtype == tf.float32
    names = [n.decode() for n in out["label"].numpy()]
    assert names[:2] == ["good", "bad"]  # separable tiny data
    assert names == ["good" if p >= 0.5 else "bad" for p in out["probability"].numpy()]
