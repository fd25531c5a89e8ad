"""The classifier: Embedding (mask_zero) -> LSTM (optionally bidirectional, stacked) -> Dense(1).

LSTM arguments stay at the defaults the cuDNN kernel needs (tanh/sigmoid,
recurrent_dropout=0, unroll=False); inputs are right-padded with masks.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.config import ModelConfig


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
    use_cudnn: bool | str = "auto",
) -> keras.Model:
    """Build and compile the model on right-padded int64 token ids of any length.

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
    for i in range(num_layers):
        sequences = i < num_layers - 1 or pooling != "last"
        lstm = keras.layers.LSTM(lstm_units, return_sequences=sequences, use_cudnn=use_cudnn,
                                 name=f"lstm_{i}")
        x = keras.layers.Bidirectional(lstm, name=f"bilstm_{i}")(x) if bidirectional else lstm(x)
    if pooling == "mean":
        x = keras.layers.GlobalAveragePooling1D(name="mean_pool")(x)  # mask-aware
    elif pooling == "max":
        x = MaskedMaxPooling1D(name="max_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    # float32 output keeps the sigmoid stable under mixed precision.
    probability = keras.layers.Dense(1, activation="sigmoid", dtype="float32",
                                     name="probability")(x)
    model = keras.Model(token_ids, probability, name="sentiment_lstm")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="binary_crossentropy",
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
        ],
        jit_compile=False,  # variable-length batches would recompile; XLA skips cuDNN anyway
    )
    return model


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


def model_kwargs(cfg: ModelConfig) -> dict:
    """The builder's keyword arguments taken from the model config section."""
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
    )
