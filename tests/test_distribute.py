import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest
import tensorflow as tf

import pipeline.distribute

from pipeline.cli import main
from pipeline.config import DistributeConfig, load_config
from pipeline.data import data_identity
from pipeline.distribute import (
    free_ports,
    is_chief,
    make_strategy,
    native_bfloat16,
    run_local_workers,
    task_name,
    tf_config,
    wait_all,
)
from pipeline.errors import ConfigError, PipelineError
from pipeline.fingerprint import run_fingerprint
from pipeline.model import build_model
from pipeline.runs import latest_finished_run, open_run, open_worker_run
from pipeline.train import train
from tests.helpers import tiny_overrides


def test_auto_on_cpu_is_the_default_strategy():
    strategy = make_strategy(DistributeConfig(strategy="auto"))
    assert strategy.num_replicas_in_sync == 1
    assert not isinstance(strategy, tf.distribute.MirroredStrategy)


def test_mirrored_over_two_logical_cpus():
    strategy = make_strategy(DistributeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]))
    assert strategy.num_replicas_in_sync == 2


@pytest.mark.parametrize("tf_config", [
    None,
    "{not json",
    '{"cluster": {"worker": ["a:1"]}}',
    '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}',
])
def test_multi_worker_without_a_usable_tf_config_is_a_clear_error(monkeypatch, tf_config):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        make_strategy(DistributeConfig(strategy="multi_worker"))


@pytest.mark.parametrize("task,chief", [
    (None, True),
    ({"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["a"], "worker": ["b"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {"chief": ["a"], "worker": ["b"]}, "task": {"type": "chief", "index": 0}}, True),
])
def test_is_chief(monkeypatch, task, chief):
    if task is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(task))
    assert is_chief() is chief


@pytest.mark.slow
def test_training_under_mirrored_strategy_with_two_cpus(imdb_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path) + [
        "distribute.strategy=mirrored", "distribute.devices=['/cpu:0', '/cpu:1']",
        "train.epochs=2"])
    result = train(cfg)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["replicas"] == 2 and info["global_batch"] == 2 * cfg.train.batch_size
    assert result.export is not None and result.export.version == 1
    (tn, fp), (fn, tp) = result.metrics["confusion_matrix"]["rows_true_cols_pred"]
    assert tn + fp + fn + tp == 40  # both replicas' predictions counted once
    assert result.metrics["accuracy"] == pytest.approx((tp + tn) / 40)


def test_mixed_precision_warns_on_cpu_and_keeps_a_float32_output(caplog):
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.distribute"):
            make_strategy(DistributeConfig(strategy="default", mixed_precision=True))
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        assert "without a GPU" in caplog.text
        model = build_model(20, embedding_dim=8, lstm_units=4)
        assert model.get_layer("embedding").compute_dtype == "float16"
        out = model(tf.constant([[3, 4, 5], [6, 0, 0]], tf.int64))
        assert out.dtype == tf.float32 and model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")  # the policy is global: never leak it


def test_bfloat16_counts_as_native_only_where_the_cpu_lists_it(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert native_bfloat16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f amx_bf16x\n")  # a longer name is not it
    assert not native_bfloat16(cpuinfo)
    assert not native_bfloat16(tmp_path / "absent")  # not Linux


def test_bfloat16_mixed_precision_warns_without_the_instructions(monkeypatch, caplog):
    monkeypatch.setattr(pipeline.distribute, "native_bfloat16", lambda: False)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.distribute"):
            make_strategy(DistributeConfig(strategy="default", mixed_precision="bfloat16"))
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert "without bfloat16 instructions" in caplog.text
        model = build_model(20, embedding_dim=8, lstm_units=4)
        assert model.get_layer("embedding").compute_dtype == "bfloat16"
        assert model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["distribute.mixed_precision=float16"])  # true is float16


@pytest.mark.parametrize("native,policy", [(True, "mixed_bfloat16"), (False, "float32")])
def test_auto_precision_is_bfloat16_only_on_a_cpu_that_has_it(monkeypatch, native, policy):
    monkeypatch.setattr(pipeline.distribute, "native_bfloat16", lambda: native)
    try:
        make_strategy(DistributeConfig(strategy="default", mixed_precision="auto"))
        assert keras.mixed_precision.global_policy().name == policy
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_worker_scratch_dirs_are_neither_resumed_nor_finished_runs(tiny_cfg, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}))
    fp = run_fingerprint(tiny_cfg, data_identity(tiny_cfg.data))
    with open_worker_run(tiny_cfg, fp, task_name(), fresh=False) as scratch:
        assert scratch.dir.name.startswith(".workertemp-worker1-") and not scratch.resumed
    with open_worker_run(tiny_cfg, fp, task_name(), fresh=False) as again:
        assert (again.dir, again.resumed) == (scratch.dir, True)
    with open_run(tiny_cfg, fp, fresh=False) as run:
        assert run.dir != scratch.dir and not run.resumed
    (scratch.dir / "run.json").write_text(json.dumps({"status": "finished"}))
    (run.dir / "run.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(PipelineError, match="no finished run"):
        latest_finished_run(tiny_cfg)
    with open_worker_run(tiny_cfg, fp, task_name(), fresh=True) as fresh:
        assert not fresh.resumed


def test_local_workers_get_their_own_tf_config_and_prefixed_output(capsys):
    assert run_local_workers(2, ["check-config", "--set", "train.epochs=2"], timeout=120) == 0
    out = capsys.readouterr().out
    assert "[worker0] {" in out and "[worker1] {" in out
    cluster = ["127.0.0.1:1", "127.0.0.1:2"]
    assert json.loads(tf_config(cluster, 1)) == {"cluster": {"worker": cluster},
                                                 "task": {"type": "worker", "index": 1}}
    assert main(["train-workers", "--workers", "0"]) == 2


def test_one_failed_worker_stops_the_others():
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        assert wait_all([waiting, failing], timeout=100) == 3
        assert waiting.returncode is not None  # stopped, not left waiting for its peer
    finally:
        for proc in (waiting, failing):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _start_worker(index: int, cluster: list[str], argv: list[str], log: Path) -> subprocess.Popen:
    # What docs/distributed.md tells each machine to run: its own TF_CONFIG, the same command.
    tf_config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
    env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), TF_CPP_MIN_LOG_LEVEL="3")
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "train", *argv], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])


def _wait(procs: list[subprocess.Popen], logs: list[Path], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    for proc, log in zip(procs, logs, strict=True):
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running after {seconds:.0f}s; its log ends:\n"
                        f"{log.read_text()[-3000:]}")
    return [proc.returncode for proc in procs]


def _backup_epoch(metadata_files: list[Path]) -> int:
    for meta in metadata_files:
        try:
            return json.loads(meta.read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            pass  # being written
    return 0


@pytest.mark.slow
def test_two_workers_train_together_survive_a_crash_and_leave_one_run(imdb_dir, tmp_path):
    out, logs_dir = tmp_path / "out", tmp_path / "logs"
    logs_dir.mkdir()
    config = tmp_path / "multi_worker.yaml"
    config.write_text("distribute:\n  strategy: multi_worker\n")  # the config switch alone
    sets = tiny_overrides(imdb_dir, out) + ["train.epochs=3"]
    argv = ["--config", str(config)] + [f"--set={kv}" for kv in sets]
    cluster = [f"127.0.0.1:{port}" for port in free_ports(2)]
    logs = [logs_dir / f"worker{i}.log" for i in range(2)]
    root = out / "runs" / "tiny"
    procs: list[subprocess.Popen] = []
    try:
        procs = [_start_worker(i, cluster, argv, logs[i]) for i in range(2)]
        # Kill worker 1 once both have a backup of a finished epoch: the chief fails too...
        deadline = time.monotonic() + 150
        while min(_backup_epoch(list(root.glob(pattern)))
                  for pattern in ("2*/backup/training_metadata.json",
                                  ".workertemp-*/backup/training_metadata.json")) < 1:
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch finished in 150 s"
            time.sleep(0.02)
        procs[1].kill()
        assert _wait(procs, logs, 60)[0] != 0, "the chief went on without its worker"
        # ... and the same two commands again resume from the backups instead of starting over.
        procs = [_start_worker(i, cluster, argv, logs[i]) for i in range(2)]
        codes = _wait(procs, logs, 240)  # a bound for a loaded shared machine
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert codes == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]

    runs = list(root.iterdir())
    assert len(runs) == 1 and not runs[0].name.startswith("."), runs  # worker scratch is gone
    run = runs[0]
    assert sorted(p.name for p in out.iterdir()) == ["runs", "saved_models"]
    assert [p.name for p in (out / "saved_models" / "tiny").iterdir()] == ["1"]
    assert not (run / "backup").exists()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["strategy"] == "MultiWorkerMirroredStrategy"
    assert info["workers"] == 2 and info["replicas"] == 2 and info["global_batch"] == 2 * 16
    assert info["started_at_epoch"] >= 2  # resumed, not retrained from the start
    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(len(rows)))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert json.loads((run / "export.json").read_text())["version"] == 1


def test_backup_is_written_atomically_and_a_truncated_one_falls_back(tmp_path):
    import numpy as np

    from pipeline.distribute import WorkerBackupAndRestore
    from pipeline.model import build_model

    x, y = np.array([[2, 3, 4], [5, 6, 0]]), np.array([1.0, 0.0])
    model = build_model(10, embedding_dim=4, lstm_units=2)
    backup = WorkerBackupAndRestore(str(tmp_path / "backup"), double_checkpoint=True,
                                    delete_checkpoint=False)  # keep it, as a kill would
    model.fit(x, y, epochs=2, verbose=0, callbacks=[backup])
    files = sorted(p.name for p in (tmp_path / "backup").iterdir())
    assert not [f for f in files if f.startswith(".")]  # temporary names are renamed into place
    # Simulate a kill mid-write of the latest copy: the epoch-1 copy must be used instead.
    latest = tmp_path / "backup" / "latest.weights.h5"
    latest.write_bytes(latest.read_bytes()[:200])
    fresh = build_model(10, embedding_dim=4, lstm_units=2)
    restore = WorkerBackupAndRestore(str(tmp_path / "backup"), double_checkpoint=True)
    restore.set_model(fresh)
    restore.on_train_begin()
    assert fresh._initial_epoch == 1


@pytest.fixture
def fresh_determinism_log(monkeypatch):
    from pipeline import distribute

    monkeypatch.setattr(distribute, "_DETERMINISM_LOGGED", set())


def _fake_gpus(monkeypatch, n: int) -> None:
    real = tf.config.list_logical_devices

    def listed(kind=None):
        if kind == "GPU":
            return [tf.config.LogicalDevice(f"/device:GPU:{i}", "GPU") for i in range(n)]
        return real(kind)

    monkeypatch.setattr(tf.config, "list_logical_devices", listed)


def test_deterministic_auto_is_on_for_cpu_and_off_for_gpu(monkeypatch, caplog, fresh_determinism_log):
    from pipeline.distribute import resolve_deterministic

    caplog.set_level(logging.INFO, logger="pipeline.distribute")
    assert resolve_deterministic("auto") is True  # this machine: CPUs only
    assert not caplog.records
    _fake_gpus(monkeypatch, 2)
    assert resolve_deterministic("auto") is False
    assert resolve_deterministic("auto") is False
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == 1 and "#59281" in reasons[0] and "2 GPU(s)" in reasons[0]  # once, why
    assert resolve_deterministic(False) is False


def test_deterministic_true_on_gpu_is_kept_with_a_warning(monkeypatch, caplog, fresh_determinism_log):
    from pipeline.distribute import resolve_deterministic

    caplog.set_level(logging.INFO, logger="pipeline.distribute")
    assert resolve_deterministic(True) is True
    assert not caplog.records  # true on a CPU costs nothing worth a warning
    _fake_gpus(monkeypatch, 1)
    assert resolve_deterministic(True) is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "slows" in warnings[0].getMessage()


def test_deterministic_setting_is_validated():
    assert load_config(None, []).train.deterministic == "auto"
    assert load_config(None, ["train.deterministic=false"]).train.deterministic is False
    with pytest.raises(ConfigError, match="train.deterministic"):
        load_config(None, ["train.deterministic=sometimes"])
