import importlib.metadata

import keras
import pytest
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.losses import loss as loss_module
from keras.src.trainers.trainer import Trainer
from packaging.version import Version

from pipeline import compat
from pipeline.errors import PipelineError

GUARDS = [compat.check_multi_worker_internals, compat.check_backup_internals,
          compat.check_train_step_internals]


@pytest.mark.parametrize("guard", GUARDS)
def test_guards_pass_on_the_installed_versions(guard):
    guard()


def _pretend_installed(monkeypatch, dist: str, version: str) -> None:
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version",
                        lambda d: Version(version) if d == dist else real(d))


@pytest.mark.parametrize(("guard", "dist", "version"), [
    (compat.check_multi_worker_internals, "keras", "4.0.0"),
    (compat.check_multi_worker_internals, "keras", "3.11.3"),
    (compat.check_backup_internals, "keras", "4.1.0"),
    (compat.check_train_step_internals, "keras", "4.0.0"),
])
def test_a_version_outside_the_range_is_refused_by_name(monkeypatch, guard, dist, version):
    _pretend_installed(monkeypatch, dist, version)
    with pytest.raises(compat.CompatError, match=rf"for {dist} .*but {dist} {version} is installed"):
        guard()


def test_the_installed_versions_are_the_real_ones():
    assert compat.installed_version("keras") == Version(importlib.metadata.version("keras"))


@pytest.mark.parametrize(("guard", "owner", "name"), [
    (compat.check_multi_worker_internals, tf_trainer, "reduce_per_replica"),
    (compat.check_multi_worker_internals, tf_trainer, "_collective_all_reduce_multi_worker"),
    (compat.check_multi_worker_internals, tf_trainer.TensorFlowTrainer, "_maybe_symbolic_build"),
    (compat.check_backup_internals, keras.callbacks.BackupAndRestore, "_save_model"),
    (compat.check_backup_internals, keras.callbacks.BackupAndRestore, "_load_model"),
    (compat.check_train_step_internals, Trainer, "_compute_loss"),
    (compat.check_train_step_internals, keras.layers.Layer, "_register_call_context_args"),
    (compat.check_train_step_internals, loss_module, "unscale_loss_for_distribution"),
])
def test_a_missing_attribute_is_refused_by_name(monkeypatch, guard, owner, name):
    monkeypatch.delattr(owner, name)
    with pytest.raises(compat.CompatError, match=rf"\.{name} no longer exists"):
        guard()


def test_a_missing_instance_attribute_of_the_backup_callback_is_refused(monkeypatch):
    init = keras.callbacks.BackupAndRestore.__init__

    def without_prev_weights(self, *args, **kwargs):
        init(self, *args, **kwargs)
        del self._prev_weights_path

    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "__init__", without_prev_weights)
    with pytest.raises(compat.CompatError, match="BackupAndRestore._prev_weights_path no longer exists"):
        compat.check_backup_internals()


def test_a_changed_signature_is_refused(monkeypatch):
    monkeypatch.setattr(keras.Model, "_maybe_symbolic_build", lambda self, data=None: None)
    with pytest.raises(compat.CompatError, match="no longer takes `iterator`"):
        compat.check_multi_worker_internals()


def test_an_override_keras_no_longer_calls_is_refused(monkeypatch):
    # on_epoch_end that no longer saves through _save_model: the atomic-save override would go unused.
    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", lambda self, epoch, logs=None: None)
    unused = r"BackupAndRestore.on_epoch_end\(\) no longer uses `_save_model`"
    with pytest.raises(compat.CompatError, match=unused):
        compat.check_backup_internals()


def test_a_compat_error_is_a_one_line_pipeline_error(monkeypatch):
    _pretend_installed(monkeypatch, "keras", "4.0.0")
    with pytest.raises(PipelineError) as info:
        compat.check_backup_internals()
    assert "\n" not in str(info.value)


def test_the_multi_worker_fix_checks_before_patching_and_only_under_multi_worker(monkeypatch):
    import tensorflow as tf

    _pretend_installed(monkeypatch, "keras", "4.0.0")
    model = keras.Sequential([keras.layers.Dense(1)])
    compat.fix_keras_multi_worker(model, tf.distribute.get_strategy())  # not multi-worker: untouched
    assert "_maybe_symbolic_build" not in vars(model)
    # An instance without __init__: enough for the isinstance test, no collectives configured.
    multi_worker = object.__new__(tf.distribute.MultiWorkerMirroredStrategy)
    reduce = tf_trainer.reduce_per_replica
    with pytest.raises(compat.CompatError, match="keras 4.0.0 is installed"):
        compat.fix_keras_multi_worker(model, multi_worker)
    assert "_maybe_symbolic_build" not in vars(model)
    assert tf_trainer.reduce_per_replica is reduce


def test_an_adversarial_model_is_refused_at_build_when_keras_lost_a_name_its_step_uses(monkeypatch):
    from keras.src.trainers import trainer

    from pipeline.model import build_model

    build_model(20, embedding_dim=4, lstm_units=2, adversarial_epsilon=0.1)  # the guard passes today
    init = trainer.Trainer.__init__
    monkeypatch.setattr(trainer.Trainer, "__init__", lambda self, *a, **k: init(self, *a, **k))
    # a Trainer that no longer sets _loss_tracker (here: an __init__ whose code never names it)
    with pytest.raises(compat.CompatError, match="no longer uses `_loss_tracker`"):
        build_model(20, embedding_dim=4, lstm_units=2, adversarial_epsilon=0.1)
    build_model(20, embedding_dim=4, lstm_units=2)  # a model without the step needs no guard
