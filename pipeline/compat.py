"""Every patch of Keras internals, in one place, each guarded.

The pipeline leans on a few private names of its libraries (a multi-worker fix for
Keras' `fit`, the backup files of `BackupAndRestore`, the loss bookkeeping of Keras' own
`train_step` that the adversarial step repeats). The tuning uses KerasTuner's public API only.
A private name can vanish in any release, and a patch that assigns to a vanished name
silently does nothing, so the original failure comes back unannounced. Each patch here
first checks the library version it was written for and that every name it touches is
still there, and otherwise stops with a `CompatError` that names the version or the
attribute: an upgrade fails loudly, at once, instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import types
from collections.abc import Callable, Iterable

import keras
import tensorflow as tf
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipeline.errors import PipelineError

# The ranges the patches below were written and tested for; widen one only after checking
# every guard of that library against the new version (tests/test_compat.py).
KERAS_VERSIONS = ">=3.12,<4"


class CompatError(PipelineError):
    """An installed library no longer matches a patch of its internals; the message says which."""


def installed_version(dist: str) -> Version:
    return Version(importlib.metadata.version(dist))


def require_version(dist: str, spec: str, patch: str) -> None:
    """Refuse a version of `dist` outside `spec`, the range `patch` was written for."""
    version = installed_version(dist)
    if not SpecifierSet(spec).contains(version, prereleases=True):
        raise CompatError(f"{patch} was written for {dist} {spec}, but {dist} {version} is installed: "
                          "check the patch against it in pipeline/compat.py, or install a version "
                          "in that range")


def require_attrs(owner: object, names: Iterable[str], patch: str) -> None:
    """Refuse an `owner` (module, class or object) that lacks one of the `names` the patch touches."""
    for name in names:
        if not hasattr(owner, name):
            raise CompatError(f"{patch}: {_name(owner)}.{name} no longer exists (keras "
                              f"{installed_version('keras')}, keras-tuner "
                              f"{installed_version('keras-tuner')}): the patch in pipeline/compat.py "
                              "needs updating")


def require_params(func: Callable, params: Iterable[str], patch: str) -> None:
    """Refuse a function whose signature no longer takes the `params` the patch passes or mimics."""
    have = inspect.signature(func).parameters
    for param in params:
        if param not in have:
            raise CompatError(f"{patch}: {_name(func)}() no longer takes `{param}` "
                              f"(its parameters: {', '.join(have)}): the patch in pipeline/compat.py "
                              "needs updating")


def require_uses(owner: object, method: str, name: str, patch: str) -> None:
    """Refuse an `owner.method` whose code no longer refers to `name`: a replacement would go unused."""
    if not _code_uses(inspect.unwrap(getattr(owner, method)).__code__, name):
        raise CompatError(f"{patch}: {_name(owner)}.{method}() no longer uses `{name}`, so replacing "
                          "it would change nothing: the patch in pipeline/compat.py needs updating")


def _code_uses(code: types.CodeType, name: str) -> bool:
    return name in code.co_names or any(
        _code_uses(c, name) for c in code.co_consts if isinstance(c, types.CodeType))


def _name(obj: object) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__


def _import(module: str, patch: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CompatError(f"{patch}: module {module} no longer exists (keras "
                          f"{installed_version('keras')}): the patch in pipeline/compat.py "
                          "needs updating") from None


# --- Keras: `fit` under MultiWorkerMirroredStrategy ---------------------------------------------

MULTI_WORKER_PATCH = "fix_keras_multi_worker"


def check_multi_worker_internals() -> types.ModuleType:
    """The Keras names `fix_keras_multi_worker` replaces; returns Keras' TensorFlow trainer module."""
    require_version("keras", KERAS_VERSIONS, MULTI_WORKER_PATCH)
    tf_trainer = _import("keras.src.backend.tensorflow.trainer", MULTI_WORKER_PATCH)
    require_attrs(tf_trainer, ("reduce_per_replica", "_collective_all_reduce_multi_worker"),
                  MULTI_WORKER_PATCH)
    require_params(tf_trainer.reduce_per_replica, ("values", "strategy", "reduction"), MULTI_WORKER_PATCH)
    require_attrs(keras.Model, ("_maybe_symbolic_build", "_symbolic_build"), MULTI_WORKER_PATCH)
    require_params(keras.Model._maybe_symbolic_build, ("iterator", "data_batch"), MULTI_WORKER_PATCH)
    require_uses(keras.Model, "fit", "_maybe_symbolic_build", MULTI_WORKER_PATCH)
    return tf_trainer


def fix_keras_multi_worker(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Let Keras 3 `fit` run under MultiWorkerMirroredStrategy (keras-team/keras#20585).

    Keras 3.15 trips in two places once more than one worker takes part:
    - before training, `fit` all-reduces one whole distributed batch just to learn
      its shapes, which fails on an (ids, label) tuple ("Attempt to convert a value
      (PerReplica...)"); this worker's own part of the batch has the same shapes,
      so the model is built from that instead;
    - each step averages the per-replica logs with `reduce(..., axis=0)`, which is
      invalid for scalar metrics; they are averaged over all replicas instead.
    The epoch metrics (history, early stopping, checkpoints) come from the metric
    variables, which the strategy keeps in sync. Other strategies are left as they are.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    tf_trainer = check_multi_worker_internals()

    def build_from_local_batch(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0], next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = build_from_local_batch
    keras_reduce = tf_trainer.reduce_per_replica
    if getattr(keras_reduce, "fixed_for_multi_worker", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    reduce_per_replica.fixed_for_multi_worker = True
    tf_trainer.reduce_per_replica = reduce_per_replica


# --- Keras: the backup files of BackupAndRestore ------------------------------------------------

BACKUP_PATCH = "WorkerBackupAndRestore"
# What pipeline.distribute.WorkerBackupAndRestore reads or replaces in Keras' callback: its
# file paths and saved position (set in __init__), and the methods it overrides or calls.
BACKUP_ATTRS = ("backup_dir", "double_checkpoint", "_weights_path", "_prev_weights_path",
                "_training_metadata_path", "_prev_training_metadata_path", "_current_epoch",
                "_last_batch_seen", "_load_model", "_save_model")


def check_backup_internals() -> None:
    """The private names of `keras.callbacks.BackupAndRestore` that WorkerBackupAndRestore relies on.

    Its `_save_model` override only takes effect while Keras' `on_epoch_end` calls
    `_save_model`, and its fallback only while `on_train_begin` calls `_load_model`.
    """
    require_version("keras", KERAS_VERSIONS, BACKUP_PATCH)
    callback = keras.callbacks.BackupAndRestore(backup_dir="unused")  # touches no file
    require_attrs(callback, BACKUP_ATTRS, BACKUP_PATCH)
    require_uses(keras.callbacks.BackupAndRestore, "on_epoch_end", "_save_model", BACKUP_PATCH)
    require_uses(keras.callbacks.BackupAndRestore, "on_train_begin", "_load_model", BACKUP_PATCH)


# --- Keras: the adversarial training step --------------------------------------------------------

ADVERSARIAL_PATCH = "SentimentModel.train_step"


def check_train_step_internals() -> None:
    """The private names of Keras' `train_step` that the adversarial step uses as Keras does:
    the compiled loss, the loss tracker, the unscaling of a distributed loss, and a layer's
    extra call argument."""
    require_version("keras", KERAS_VERSIONS, ADVERSARIAL_PATCH)
    loss_module = _import("keras.src.losses.loss", ADVERSARIAL_PATCH)
    require_attrs(loss_module, ("unscale_loss_for_distribution",), ADVERSARIAL_PATCH)
    require_attrs(keras.Model, ("_compute_loss",), ADVERSARIAL_PATCH)
    require_params(keras.Model._compute_loss, ("x", "y", "y_pred", "sample_weight", "training"),
                   ADVERSARIAL_PATCH)
    trainer = _import("keras.src.trainers.trainer", ADVERSARIAL_PATCH)
    require_uses(trainer.Trainer, "__init__", "_loss_tracker", ADVERSARIAL_PATCH)
    require_attrs(keras.layers.Layer, ("_register_call_context_args",), ADVERSARIAL_PATCH)


def compute_loss(model: keras.Model, x, y, y_pred, sample_weight) -> tf.Tensor:
    """The compiled loss of a training step, as Keras' `train_step` computes it."""
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def track_loss(model: keras.Model, loss: tf.Tensor, batch_size: tf.Tensor) -> None:
    """Count a step's loss in the model's `loss` metric, unscaled as Keras' `train_step` does."""
    from keras.src.losses.loss import unscale_loss_for_distribution

    model._loss_tracker.update_state(unscale_loss_for_distribution(loss), sample_weight=batch_size)


def add_call_argument(layer: keras.layers.Layer, name: str) -> None:
    """Let a model's call hand the keyword `name` down to `layer` (as Keras does for `training`)."""
    layer._register_call_context_args(name)
