"""The tf.distribute strategy named in the config, seeding and op determinism, and the
multi-worker rules.

Multi-worker training follows the documented Keras pattern: every worker runs the
same program with its own `TF_CONFIG`; only the chief writes the run, other workers
write to a temporary folder that is deleted once they finish.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import tensorflow as tf

from pipeline import atomic, compat
from pipeline.atomic import atomic_path
from pipeline.config import Config, DistributeConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def make_strategy(cfg: DistributeConfig) -> tf.distribute.Strategy:
    """`auto`: MirroredStrategy over the GPUs when any are visible, else the default strategy.

    Call this before any other TensorFlow op: MultiWorkerMirroredStrategy has to
    configure collectives before the runtime starts (listing devices starts it).
    """
    name = cfg.strategy
    if name == "multi_worker":
        check_tf_config()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if gpus else "default"
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "one_device":
        device = (cfg.devices or ["/gpu:0" if gpus else "/cpu:0"])[0]
        strategy = tf.distribute.OneDeviceStrategy(device)
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(cfg.devices)
    precision = cfg.mixed_precision
    if precision == "auto":  # bfloat16 where the CPU computes it natively; GPUs ask with true
        precision = "bfloat16" if not gpus and native_bfloat16() else False
    if precision == "bfloat16":
        if not native_bfloat16():
            log.warning("distribute.mixed_precision is bfloat16 on a CPU without bfloat16 "
                        "instructions (AMX, AVX512_BF16): slower, not faster")
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    elif precision:
        if not gpus:
            log.warning("distribute.mixed_precision is on without a GPU: float16 on CPU is slow, "
                        "not faster")
        keras.mixed_precision.set_global_policy("mixed_float16")
    return strategy


def native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware, as Linux lists its flags."""
    try:
        return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", cpuinfo.read_text()))
    except OSError:  # not Linux
        return False


def describe(strategy: tf.distribute.Strategy) -> str:
    """The strategy in a user's words: `CPU, 1 replica` or `2 GPUs, MirroredStrategy, 2 replicas`."""
    default = not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()
    # The default strategy runs where TensorFlow places ops: the first GPU if there is one.
    devices = (["GPU"] * bool(tf.config.list_logical_devices("GPU")) if default
               else [d.rsplit("device:", 1)[-1] for d in strategy.extended.worker_devices])
    gpus = sum(d.upper().startswith("GPU") for d in devices)
    where = f"{gpus} GPU{'s' * (gpus > 1)}" if gpus else "CPU"
    replicas = strategy.num_replicas_in_sync
    name = "" if default else f", {strategy_name(strategy)}"
    policy = keras.mixed_precision.global_policy().name
    precision = f", {policy}" if policy.startswith("mixed_") else ""
    return f"{where}{name}, {replicas} replica{'s' * (replicas > 1)}{precision}"


def seed_everything(cfg: Config) -> None:
    """Seed Python, NumPy and TensorFlow; op determinism where it holds (`train.deterministic`)."""
    keras.utils.set_random_seed(cfg.seed)
    if resolve_deterministic(cfg.train.deterministic):
        tf.config.experimental.enable_op_determinism()


_DETERMINISM_LOGGED: set[str] = set()  # each explanation once per process, not once per trial


def resolve_deterministic(setting: bool | str, gpus: list | None = None) -> bool:
    """Whether to enable op determinism for `train.deterministic` on this machine.

    `auto`: yes on CPU (same config and seed, same metrics); no when a GPU is visible,
    because op determinism does not make the cuDNN LSTM reproducible
    (tensorflow/tensorflow#59281) and pushes the embedding's sparse gradient updates onto
    slow deterministic paths: a cost for a promise it cannot keep. `true` on a GPU is
    honoured, with a warning. `gpus` defaults to the visible logical GPUs.
    """
    if gpus is None:
        gpus = tf.config.list_logical_devices("GPU")
    if setting == "auto":
        deterministic = not gpus
        if gpus:
            _log_once(logging.INFO, "train.deterministic=auto: not deterministic on %d GPU(s): "
                      "cuDNN's LSTM is not reproducible under op determinism (tensorflow/tensorflow"
                      "#59281), which would also slow the embedding updates; set it to true to "
                      "pay for that anyway", len(gpus))
        return deterministic
    if setting is True and gpus:
        _log_once(logging.WARNING, "train.deterministic=true on %d GPU(s): op determinism slows the "
                  "embedding's sparse updates and still does not make cuDNN's LSTM reproducible "
                  "(tensorflow/tensorflow#59281); `auto` leaves it off on GPUs", len(gpus))
    return bool(setting)


def _log_once(level: int, msg: str, *args) -> None:
    if msg not in _DETERMINISM_LOGGED:
        _DETERMINISM_LOGGED.add(msg)
        log.log(level, msg, *args)


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The public name: MultiWorkerMirroredStrategy's class is called CollectiveAllReduceStrategy."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def _tf_config() -> dict:
    return json.loads(os.environ.get("TF_CONFIG", "{}"))


def check_tf_config() -> None:
    """Refuse a missing or malformed TF_CONFIG with one line, before TensorFlow reads it."""
    hint = ('e.g. {"cluster": {"worker": ["host-a:12345", "host-b:12345"]}, '
            '"task": {"type": "worker", "index": 0}}')
    if "TF_CONFIG" not in os.environ:
        raise ConfigError(f"distribute.strategy: multi_worker needs TF_CONFIG in the environment, {hint}")
    try:
        tf_config = _tf_config()
    except ValueError:
        raise ConfigError(f"TF_CONFIG: not valid JSON, {hint}") from None
    task = tf_config.get("task", {}) if isinstance(tf_config, dict) else {}
    workers = tf_config.get("cluster", {}).get(task.get("type"), []) if task else []
    if not isinstance(task.get("index"), int) or not 0 <= task["index"] < len(workers):
        raise ConfigError(f"TF_CONFIG: task must name its type and index in the cluster, {hint}")


def is_chief() -> bool:
    """True unless TF_CONFIG names this process as a non-chief worker."""
    tf_config = _tf_config()
    task = tf_config.get("task", {})
    kind, index = task.get("type"), task.get("index", 0)
    has_chief = "chief" in tf_config.get("cluster", {})
    if kind is None or kind == "chief":
        return True
    return kind == "worker" and index == 0 and not has_chief


def task_name() -> str:
    """This process's name in the cluster, e.g. `worker1`; `chief` when there is no TF_CONFIG."""
    task = _tf_config().get("task", {})
    return f"{task['type']}{task.get('index', 0)}" if task.get("type") else "chief"


def shard_by_data(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Shard across workers by element, not by file.

    tfds IMDB has a handful of files (a folder source has one tensor), too few to
    split by file; by data, each worker reads everything and keeps its own share of
    every global batch, so each sees a distinct part of the data each epoch. The
    other strategies ignore this option.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def gather_from_workers(strategy: tf.distribute.Strategy, value: int) -> list[int]:
    """`value` as every replica of every worker has it: a collective step all workers must take."""
    local = strategy.experimental_distribute_values_from_function(
        lambda _: tf.constant([value], tf.int64))
    return [int(v) for v in strategy.gather(local, axis=0).numpy()]


def num_workers() -> int:
    """Processes in the TF_CONFIG cluster (1 without one)."""
    cluster = _tf_config().get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker")) or 1


class WorkerBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that also works with several workers (same arguments as Keras').

    Keras 3's callback knows nothing of workers. Each worker must back up to its
    own folder (the caller picks it), and on a restart all workers must resume
    from the same epoch: a worker killed while saving can be one epoch behind the
    rest, and workers that run different numbers of steps wait on each other
    forever. So before restoring, the workers agree on the oldest epoch any of them
    has; a worker ahead restores its previous backup (`double_checkpoint=True`).
    """

    def __init__(self, *args, **kwargs):
        # It re-implements Keras privates: an upgrade that renames them fails here, loudly.
        compat.check_backup_internals()
        super().__init__(*args, **kwargs)

    def _saved_epoch(self) -> int:
        path = Path(self._training_metadata_path)
        return int(json.loads(path.read_text()).get("epoch", 0)) if path.is_file() else 0

    def on_train_begin(self, logs=None):
        strategy = self.model.distribute_strategy
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            self._agree_on_epoch(strategy)
        try:
            super().on_train_begin(logs)
        except ValueError:
            # A weights file cut short loads as ValueError, which Keras' own fallback (OSError
            # only) misses: resume from the previous copy instead of failing.
            if not Path(self._prev_weights_path).is_file():
                raise
            log.warning("the latest backup is unreadable; resuming from the one before it")
            atomic.copy_file(self._prev_weights_path, self._weights_path)
            if Path(self._prev_training_metadata_path).is_file():
                atomic.copy_file(self._prev_training_metadata_path, self._training_metadata_path)
            self._load_model()

    def _save_model(self):
        """Keras' save, but each file all or nothing (`pipeline.atomic`).

        Keras writes the backup in place, so a Ctrl-C or kill mid-write leaves a file
        that cannot be loaded.
        """
        os.makedirs(self.backup_dir, exist_ok=True)
        if self.double_checkpoint and os.path.exists(self._weights_path):
            atomic.copy_file(self._weights_path, self._prev_weights_path)
            if os.path.exists(self._training_metadata_path):
                atomic.copy_file(self._training_metadata_path, self._prev_training_metadata_path)
        # Keras refuses a weights file name without this ending.
        with atomic_path(self._weights_path, suffix=".weights.h5") as tmp:
            self.model.save_weights(str(tmp), overwrite=True)
        meta = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        atomic.write_text(self._training_metadata_path, json.dumps(meta))

    def _agree_on_epoch(self, strategy: tf.distribute.Strategy) -> None:
        mine = self._saved_epoch()
        agreed = min(gather_from_workers(strategy, mine))
        if agreed == mine:
            return
        log.warning("resuming from epoch %d like the other workers (this one had %d)", agreed, mine)
        if agreed == 0:
            shutil.rmtree(self.backup_dir, ignore_errors=True)
        elif agreed == mine - 1 and Path(self._prev_training_metadata_path).is_file():
            atomic.copy_file(self._prev_weights_path, self._weights_path)
            atomic.copy_file(self._prev_training_metadata_path, self._training_metadata_path)
        else:  # every epoch ends in steps all workers take together: one apart at most
            raise RuntimeError(f"workers disagree on the epoch to resume from ({agreed} vs {mine}) "
                               f"and no backup of epoch {agreed} is left: start over with --fresh")


def free_ports(n: int) -> list[int]:
    """`n` TCP ports free on 127.0.0.1 right now (the OS picks them)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(workers: list[str], index: int) -> str:
    """The TF_CONFIG for worker `index` of a cluster of `host:port` workers; worker 0 is the chief."""
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def _relay(stream, prefix: str) -> None:
    for line in stream:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def run_local_workers(n: int, args: list[str], timeout: float | None = None) -> int:
    """Run `python -m pipeline <args>` as `n` workers on 127.0.0.1 and wait for all.

    Each gets its own TF_CONFIG and `distribute.strategy=multi_worker`; output lines
    are prefixed with the worker's name. If one worker fails, the others are stopped
    (they would wait for it forever). Returns the exit code of the first worker to
    fail, 124 if `timeout` seconds pass first, else 0.
    """
    workers = [f"127.0.0.1:{port}" for port in free_ports(n)]
    procs, relays = [], []
    try:
        for i in range(n):
            env = dict(os.environ, TF_CONFIG=tf_config(workers, i))
            cmd = [sys.executable, "-m", "pipeline", *args, "--set", "distribute.strategy=multi_worker"]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            relay = threading.Thread(target=_relay, args=(proc.stdout, f"[worker{i}] "), daemon=True)
            relay.start()
            procs.append(proc)
            relays.append(relay)
        return wait_all(procs, timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for relay in relays:
            relay.join(timeout=5)


def wait_all(procs: list[subprocess.Popen], timeout: float | None) -> int:
    """Wait for every process; stop the rest as soon as one fails or time runs out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = next((p.returncode for p in procs if p.poll() not in (None, 0)), None)
        timed_out = deadline is not None and time.monotonic() > deadline
        if failed is not None or timed_out:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            return failed if failed is not None else 124
        time.sleep(0.2)
    return next((p.returncode for p in procs if p.returncode != 0), 0)
