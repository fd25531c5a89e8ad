import json

import pytest
import tensorflow as tf

from pipeline.config import DistributeConfig, load_config
from pipeline.distribute import is_chief, make_strategy
from pipeline.train import train
from tests.conftest import tiny_overrides


def test_auto_on_cpu_is_the_default_strategy():
    strategy = make_strategy(DistributeConfig(strategy="auto"))
    assert strategy.num_replicas_in_sync == 1
    assert not isinstance(strategy, tf.distribute.MirroredStrategy)


def test_mirrored_over_two_logical_cpus():
    strategy = make_strategy(DistributeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]))
    assert strategy.num_replicas_in_sync == 2


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="TF_CONFIG"):
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


def test_training_under_mirrored_strategy_with_two_cpus(imdb_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path) + [
        "distribute.strategy=mirrored", "distribute.devices=['/cpu:0', '/cpu:1']",
        "train.epochs=2"])
    result = train(cfg)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["replicas"] == 2 and info["global_batch"] == 2 * cfg.train.batch_size
    assert result.export is not None and result.export.version == 1
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
