"""The tf.distribute strategy named in the config, and the multi-worker chief rule."""

from __future__ import annotations

import json
import logging
import os

import keras
import tensorflow as tf

from pipeline.config import DistributeConfig

log = logging.getLogger(__name__)


def make_strategy(cfg: DistributeConfig) -> tf.distribute.Strategy:
    """`auto`: MirroredStrategy over the GPUs when any are visible, else the default strategy."""
    gpus = tf.config.list_logical_devices("GPU")
    name = cfg.strategy
    if name == "auto":
        name = "mirrored" if gpus else "default"
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "one_device":
        device = (cfg.devices or ["/gpu:0" if gpus else "/cpu:0"])[0]
        strategy = tf.distribute.OneDeviceStrategy(device)
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(cfg.devices)
    else:
        if "TF_CONFIG" not in os.environ:
            raise RuntimeError("distribute.strategy=multi_worker needs TF_CONFIG in the environment")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    log.info("strategy %s with %d replica(s)%s", type(strategy).__name__,
             strategy.num_replicas_in_sync, ", mixed_float16" if cfg.mixed_precision else "")
    return strategy


def is_chief() -> bool:
    """True unless TF_CONFIG names this process as a non-chief worker."""
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    kind, index = task.get("type"), task.get("index", 0)
    has_chief = "chief" in json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if kind is None or kind == "chief":
        return True
    return kind == "worker" and index == 0 and not has_chief
