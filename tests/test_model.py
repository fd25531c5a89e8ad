import warnings

import numpy as np
import pytest
import tensorflow as tf

from pipeline.model import (
    MaskedMaxPooling1D,
    adversarial_perturbation,
    build_model,
    fit_verbosity,
    load_weights,
    trainable_params,
)


@pytest.mark.parametrize("pooling,bidirectional,layers", [("last", True, 1), ("max", False, 2),
                                                          ("mean", True, 2)])
def test_build_and_predict_shapes(pooling, bidirectional, layers):
    model = build_model(50, embedding_dim=4, lstm_units=3, pooling=pooling,
                        bidirectional=bidirectional, num_layers=layers)
    out = model.predict(np.array([[2, 3, 4, 0], [5, 0, 0, 0]]), verbose=0)
    assert out.shape == (2, 1) and np.all(np.isfinite(out))
    # The padding is masked: the same reviews without it score the same.
    np.testing.assert_allclose(out[0], model.predict(np.array([[2, 3, 4]]), verbose=0)[0], atol=1e-6)
    np.testing.assert_allclose(out[1], model.predict(np.array([[5]]), verbose=0)[0], atol=1e-6)


def test_one_training_step_changes_weights_and_lowers_loss():
    rng = np.random.default_rng(0)
    x = rng.integers(2, 50, size=(32, 12))
    y = (x[:, 0] > 25).astype("float32")
    model = build_model(50, embedding_dim=8, lstm_units=8, dropout=0.0, learning_rate=0.02)
    before = [w.copy() for w in model.get_weights()]
    first = model.train_on_batch(x, y, return_dict=True)["loss"]
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=False))
    for _ in range(15):
        last = model.train_on_batch(x, y, return_dict=True)["loss"]
    assert last < first


def test_padding_does_not_change_the_prediction():
    model = build_model(50, embedding_dim=4, lstm_units=3, pooling="max")
    short = model.predict(np.array([[7, 8, 9]]), verbose=0)
    padded = model.predict(np.array([[7, 8, 9, 0, 0, 0]]), verbose=0)
    np.testing.assert_allclose(short, padded, atol=1e-6)


def test_masked_max_ignores_padded_steps():
    x = np.array([[[-1.0], [-2.0], [0.0]]], dtype="float32")
    mask = np.array([[True, True, False]])
    assert float(MaskedMaxPooling1D()(x, mask=mask)[0, 0]) == -1.0


def test_pretrained_matrix_is_used_and_can_be_frozen():
    matrix = np.arange(20, dtype="float32").reshape(5, 4)
    model = build_model(5, embedding_dim=4, embedding_matrix=matrix, embedding_trainable=False)
    np.testing.assert_array_equal(model.get_layer("embedding").get_weights()[0], matrix)
    assert not model.get_layer("embedding").trainable
    with pytest.raises(ValueError, match="shape"):
        build_model(6, embedding_dim=4, embedding_matrix=matrix)


def test_cudnn_free_copy_gives_the_same_outputs():
    model = build_model(30, embedding_dim=4, lstm_units=3)
    portable = build_model(30, embedding_dim=4, lstm_units=3, use_cudnn=False)
    portable.set_weights(model.get_weights())
    x = np.array([[3, 4, 5, 0]])
    np.testing.assert_allclose(model.predict(x, verbose=0), portable.predict(x, verbose=0), atol=1e-6)


def test_a_cosine_rate_falls_to_five_percent_over_its_steps_and_stays():
    model = build_model(50, embedding_dim=4, lstm_units=4, learning_rate=0.01, decay_steps=10)
    schedule = model.optimizer._learning_rate  # the schedule itself; .learning_rate is its value now
    rates = [float(schedule(step)) for step in (0, 5, 10, 20)]
    np.testing.assert_allclose(rates, [0.01, 0.01 * (0.05 + 0.95 * 0.5), 0.0005, 0.0005], rtol=1e-5)
    constant = build_model(50, embedding_dim=4, lstm_units=4, learning_rate=0.01)
    assert float(constant.optimizer.learning_rate) == pytest.approx(0.01)


def test_weights_load_for_evaluation_without_the_optimizer_warning(tmp_path):
    trained = build_model(10, embedding_dim=4, lstm_units=2)
    trained.fit(np.array([[2, 3, 4], [5, 6, 0]]), np.array([1.0, 0.0]), epochs=1, verbose=0)
    path = tmp_path / "model.weights.h5"
    trained.save_weights(str(path))
    # Keras' own load warns: the file holds optimizer state a fresh model has no slots for ...
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        build_model(10, embedding_dim=4, lstm_units=2).load_weights(str(path))
    fresh = build_model(10, embedding_dim=4, lstm_units=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... this one does not, and loads every model weight
        load_weights(fresh, path)
    for got, want in zip(fresh.get_weights(), trained.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_trainable_params_and_fit_verbosity():
    model = build_model(10, embedding_dim=4, lstm_units=2, bidirectional=False)
    # embedding 10x4; LSTM 4 gates x (4 inputs + 2 units + 1 bias) x 2 units; dense 2 + 1
    assert trainable_params(model) == 40 + 4 * (4 + 2 + 1) * 2 + 3
    assert fit_verbosity(0) == 0 and fit_verbosity(1) == 1
    assert fit_verbosity(None) == 2  # pytest captures stdout: not a terminal, one line per epoch


def test_the_adversarial_perturbation_has_the_configured_norm_and_no_gradient():
    rng = np.random.default_rng(0)
    embedded = tf.Variable(rng.normal(size=(3, 5, 4)).astype("float32"))
    gradient = rng.normal(size=(3, 5, 4)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    with tf.GradientTape() as tape:
        r = adversarial_perturbation(gradient, embedded, mask, 0.1)
        total = tf.reduce_sum(r)
    r = r.numpy()
    keep = mask[..., None]
    np.testing.assert_allclose(np.linalg.norm(r, axis=(1, 2)),
                               0.1 * np.linalg.norm(embedded.numpy() * keep, axis=(1, 2)), rtol=1e-5)
    assert np.all(r[~mask] == 0)  # padded steps are not moved
    for i in range(3):  # along the gradient
        g = (gradient * keep)[i].ravel()
        cosine = r[i].ravel() @ g / (np.linalg.norm(r[i]) * np.linalg.norm(g))
        assert cosine == pytest.approx(1.0, abs=1e-5)
    assert tape.gradient(total, embedded) is None  # a constant of the step


def test_an_adversarial_step_learns_from_the_clean_and_the_perturbed_review():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.integers(2, 40, size=(8, 6)), np.zeros((8, 2), int)], axis=1)
    y = rng.integers(0, 2, size=8).astype("float32")
    model = build_model(40, embedding_dim=6, lstm_units=4, pooling="max", dropout=0.0,
                        adversarial_epsilon=0.5)
    plain = build_model(40, embedding_dim=6, lstm_units=4, pooling="max", dropout=0.0)
    plain.set_weights(model.get_weights())
    # Serving is unchanged: the perturbation exists only inside a training step.
    np.testing.assert_allclose(model.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-6)

    bce = tf.keras.losses.BinaryCrossentropy()
    zero = tf.zeros((8, 8, 6))
    with tf.GradientTape() as tape:
        tape.watch(zero)
        clean = bce(y[:, None], model(x, perturbation=zero))
    r = adversarial_perturbation(tape.gradient(clean, zero), model.get_layer("embedding")(x),
                                 x != 0, 0.5)
    perturbed = bce(y[:, None], model(x, perturbation=r))
    assert float(perturbed) > float(clean)  # r points uphill
    loss = model.train_on_batch(x, y, return_dict=True)["loss"]  # from before the update
    assert loss == pytest.approx(float(clean) + float(perturbed), rel=1e-4)


def test_a_float32_copy_of_a_bfloat16_model_computes_what_float32_serving_does():
    import keras

    from pipeline.config import ModelConfig
    from pipeline.model import float32_model

    cfg = ModelConfig(embedding_dim=8, lstm_units=4, pooling="max", embedding_init="random")
    kwargs = dict(embedding_dim=8, lstm_units=4, pooling="max", bidirectional=cfg.bidirectional)
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        mixed = build_model(30, **kwargs)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0], [12, 13, 0, 0, 0, 0]])
    mixed.train_on_batch(x, np.array([1, 0, 1]))
    copy = float32_model(mixed, cfg)
    assert copy.get_layer("embedding").compute_dtype == "float32"
    reference = build_model(30, **kwargs)  # float32 from the start, the same weights
    reference.set_weights(mixed.get_weights())
    np.testing.assert_allclose(copy.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-6)
    # bfloat16 keeps about three digits: the copy is not the mixed model in disguise
    assert np.abs(copy.predict(x, verbose=0) - mixed.predict(x, verbose=0)).max() > 1e-6
