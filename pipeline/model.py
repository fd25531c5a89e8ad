"""The classifier: Embedding (mask_zero) -> LSTM (optionally bidirectional, stacked) -> Dense(1).

LSTM arguments stay at the defaults the cuDNN kernel needs (tanh/sigmoid,
recurrent_dropout=0, unroll=False); inputs are right-padded with masks. Beside the
builder: what every caller of `fit` shares (the progress setting, the parameter count,
an epoch clock) and loading trained weights for evaluation or export.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import compat
from pipeline.config import ExperimentalConfig, ModelConfig
from pipeline.vectorize import PAD

log = logging.getLogger(__name__)


def build_model(
    vocab_size: int,
    embedding_dim: int = 128,
    lstm_units: int = 64,
    bidirectional: bool = True,
    num_layers: int = 1,
    pooling: str = "last",
    embedding_dropout: float = 0.0,
    dropout: float = 0.3,
    learning_rate: float = 1e-3,
    embedding_matrix: np.ndarray | None = None,
    embedding_trainable: bool = True,
    decay_steps: int | None = None,
    adversarial_epsilon: float = 0.0,
    use_cudnn: bool | str = "auto",
) -> keras.Model:
    """Build and compile the model on right-padded int64 token ids of any length.

    `decay_steps` set: the rate follows a cosine from `learning_rate` down to 5% of it over that
    many steps (then stays there), counted by the optimizer, so a resumed run continues it.
    `adversarial_epsilon` > 0 adds adversarial training (`SentimentModel.train_step`).
    `use_cudnn=False` gives a graph that runs anywhere; the export uses it so a
    model trained on a GPU still serves on a CPU-only host.
    """
    initializer = "uniform"
    if embedding_matrix is not None:
        if embedding_matrix.shape != (vocab_size, embedding_dim):
            raise ValueError(f"embedding matrix shape {embedding_matrix.shape} != "
                             f"({vocab_size}, {embedding_dim})")
        initializer = keras.initializers.Constant(embedding_matrix)

    token_ids = keras.Input(shape=(None,), dtype="int64", name="token_ids")
    x = keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True,
                               embeddings_initializer=initializer,
                               trainable=embedding_trainable, name="embedding")(token_ids)
    if embedding_dropout:
        x = keras.layers.SpatialDropout1D(embedding_dropout, name="embedding_dropout")(x)
    if adversarial_epsilon:
        compat.check_train_step_internals()
        x = Perturbation(name="perturbation")(x)
    for i in range(num_layers):
        sequences = i < num_layers - 1 or pooling != "last"
        lstm = keras.layers.LSTM(lstm_units, return_sequences=sequences, use_cudnn=use_cudnn,
                                 name=f"lstm_{i}")
        x = keras.layers.Bidirectional(lstm, name=f"bilstm_{i}")(x) if bidirectional else lstm(x)
    if pooling == "mean":
        x = keras.layers.GlobalAveragePooling1D(name="mean_pool")(x)  # mask-aware
    elif pooling == "max":
        x = MaskedMaxPooling1D(name="max_pool")(x)
    elif pooling == "concat":  # ULMFiT's concat pooling, less the last state (both ends for a BiLSTM)
        x = keras.layers.Concatenate(name="concat_pool")([
            MaskedMaxPooling1D(name="max_pool")(x),
            keras.layers.GlobalAveragePooling1D(name="mean_pool")(x)])
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    # float32 output keeps the sigmoid stable under mixed precision.
    probability = keras.layers.Dense(1, activation="sigmoid", dtype="float32",
                                     name="probability")(x)
    model = SentimentModel(token_ids, probability, adversarial_epsilon=adversarial_epsilon,
                           name="sentiment_lstm")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate if decay_steps is None else
                                        keras.optimizers.schedules.CosineDecay(
                                            learning_rate, decay_steps, alpha=0.05)),
        loss="binary_crossentropy",
        # Against rounded targets: a distilled training split's soft targets count as the
        # teacher's label (a 0/1 target is unchanged), so the training curves stay readable.
        metrics=[
            HardTargets(keras.metrics.BinaryAccuracy(name="accuracy")),
            HardTargets(keras.metrics.Precision(name="precision")),
            HardTargets(keras.metrics.Recall(name="recall")),
            HardTargets(keras.metrics.AUC(name="auc")),
        ],
        jit_compile=False,  # variable-length batches would recompile; XLA skips cuDNN anyway
    )
    return model


@keras.saving.register_keras_serializable(package="pipeline")
class SentimentModel(keras.Model):
    """The functional classifier; with `adversarial_epsilon` > 0 each training step adds
    adversarial training (Goodfellow et al. 2015; on text, Miyato et al. 2017).

    The step's loss is L(x) + L(x + r): r moves the embedded review (after embedding
    dropout, as the LSTM reads it) along the gradient of the loss, its norm a fraction
    `adversarial_epsilon` of the review's own embedded norm, so the model learns to hold
    its answer when each word's vector shifts a little the wrong way. Sizing r relative
    to the embeddings keeps epsilon meaningful while fine-tuning changes their scale.
    r is a constant of the step: no gradient flows into it.
    """

    def __init__(self, *args, adversarial_epsilon: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.adversarial_epsilon = adversarial_epsilon

    def train_step(self, data):
        if not self.adversarial_epsilon:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        embedding = self.get_layer("embedding")
        # dL/d(embedded review) is the gradient at a zero perturbation.
        zero = tf.zeros(tf.concat([tf.shape(x), [embedding.output_dim]], axis=0))
        with tf.GradientTape() as tape:
            with tf.GradientTape() as probe:
                probe.watch(zero)
                y_pred = self(x, training=True, perturbation=zero)
                loss = compat.compute_loss(self, x, y, y_pred, sample_weight)
            r = adversarial_perturbation(probe.gradient(loss, zero), embedding(x),
                                         tf.not_equal(x, PAD), self.adversarial_epsilon)
            y_adv = self(x, training=True, perturbation=r)
            loss += compat.compute_loss(self, x, y, y_adv, sample_weight)
            compat.track_loss(self, loss, tf.shape(x)[0])
            loss = self.optimizer.scale_loss(loss)
        weights = self.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights, strict=True))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_config(self):
        return super().get_config() | {"adversarial_epsilon": self.adversarial_epsilon}


def adversarial_perturbation(gradient: tf.Tensor, embedded: tf.Tensor, mask: tf.Tensor,
                             epsilon: float) -> tf.Tensor:
    """r = epsilon * ||e|| * g / ||g|| per review, over its real (unmasked) tokens, held constant.

    `gradient` and `embedded` are [batch, time, dim], `mask` [batch, time]; padded steps get
    no perturbation.
    """
    keep = tf.cast(mask, tf.float32)[..., None]
    g = tf.cast(gradient, tf.float32) * keep
    e = tf.cast(embedded, tf.float32) * keep
    e_norm = tf.norm(e, axis=[1, 2], keepdims=True)
    g_norm = tf.norm(g, axis=[1, 2], keepdims=True)
    return tf.stop_gradient(epsilon * e_norm * g / tf.maximum(g_norm, 1e-12))


@keras.saving.register_keras_serializable(package="pipeline")
class Perturbation(keras.layers.Layer):
    """Adds the `perturbation` call argument to the embedded review, when one is given.

    Only adversarial training passes it (`SentimentModel.train_step`); everywhere else,
    serving included, the layer passes its input through unchanged.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        # The model's call hands `perturbation=` down to this layer.
        compat.add_call_argument(self, "perturbation")

    def call(self, inputs, perturbation=None):
        if perturbation is None:
            return inputs
        return inputs + keras.ops.cast(perturbation, inputs.dtype)


class HardTargets(keras.metrics.Metric):
    """A metric of the target rounded to 0 or 1; the wrapped metric keeps its name and result."""

    def __init__(self, metric: keras.metrics.Metric, **kwargs):
        super().__init__(name=metric.name, **kwargs)
        self.metric = metric

    def update_state(self, y_true, y_pred, sample_weight=None):
        return self.metric.update_state(keras.ops.round(keras.ops.cast(y_true, "float32")), y_pred,
                                        sample_weight)

    def result(self):
        return self.metric.result()

    def reset_state(self):
        self.metric.reset_state()


@keras.saving.register_keras_serializable(package="pipeline")
class MaskedMaxPooling1D(keras.layers.Layer):
    """Max over time that ignores padded steps (Keras' GlobalMaxPooling1D does not)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is not None:
            very_negative = keras.ops.cast(-1e9, inputs.dtype)
            mask = keras.ops.expand_dims(keras.ops.cast(mask, "bool"), -1)
            inputs = keras.ops.where(mask, inputs, very_negative)
        return keras.ops.max(inputs, axis=1)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def logit_fn(model: keras.Model) -> Callable:
    """Token ids -> the output layer's logit, before the sigmoid: what a blend adds to.

    Shares the model's layers and weights; the logit is recomputed exactly, not recovered
    from a probability that float32 rounds to 1 beyond a logit of about 17.
    """
    head = model.get_layer("probability")
    features = keras.Model(model.inputs, head.input)

    def logit(ids, training: bool = False):
        x = keras.ops.cast(features(ids, training=training), head.kernel.dtype)
        return keras.ops.reshape(keras.ops.matmul(x, head.kernel) + head.bias, (-1,))

    return logit


def model_kwargs(cfg: ModelConfig, experimental: ExperimentalConfig | None = None) -> dict:
    """The builder's keyword arguments taken from the model (and experimental) config sections."""
    return dict(
        embedding_dim=cfg.embedding_dim,
        lstm_units=cfg.lstm_units,
        bidirectional=cfg.bidirectional,
        num_layers=cfg.num_layers,
        pooling=cfg.pooling,
        embedding_dropout=cfg.embedding_dropout,
        dropout=cfg.dropout,
        learning_rate=cfg.learning_rate,
        embedding_trainable=cfg.embedding_trainable,
        adversarial_epsilon=experimental.adversarial_epsilon if experimental else 0.0,
    )


def trainable_params(model: keras.Model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def fit_verbosity(verbose: int | None) -> int:
    """Keras' `verbose` for `train.verbose`: None is a progress bar on a terminal, one line
    per epoch otherwise (a bar's redraws fill a log file)."""
    if verbose is not None:
        return verbose
    return 1 if sys.stdout.isatty() else 2


@contextmanager
def float32_policy() -> Iterator[None]:
    """Build layers in float32 whatever the global (mixed-precision) policy is."""
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)


def float32_model(model: keras.Model, cfg: ModelConfig, use_cudnn: bool | str = "auto") -> keras.Model:
    """A float32 copy of a trained model: what is scored and served after mixed precision
    (16-bit compute differs from float32 in the third digit; the variables are float32)."""
    with float32_policy():
        copy = build_model(model.get_layer("embedding").input_dim, **model_kwargs(cfg),
                           use_cudnn=use_cudnn)
    copy.set_weights(model.get_weights())
    return copy


def load_weights(model: keras.Model, path: Path) -> None:
    """Load trained weights into a model that will be evaluated or exported, not trained.

    The weights file also holds the optimizer's state. A model that has not trained in
    this process has an unbuilt optimizer, which Keras then skips with a two-line warning;
    evaluation and export need no optimizer state, so that one warning is not shown.
    """
    with warnings.catch_warnings():
        if not model.optimizer or not model.optimizer.built:
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer",
                                    category=UserWarning)
        model.load_weights(str(path))


class EpochTimer(keras.callbacks.Callback):
    """Seconds of each epoch, for the bench and the GPU check."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._t)
        log.info("epoch %d: %.0f s", epoch + 1, self.seconds[-1])
