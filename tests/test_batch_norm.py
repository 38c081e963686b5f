"""Batch-norm re-estimation: against NumPy, on searchable models, and its errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fliqs_keras

EPSILON = 1e-3


def _plain_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(6, name="dense1")(inputs)
    x = keras.layers.BatchNormalization(epsilon=EPSILON, name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dense(3, name="dense2")(x)
    outputs = keras.layers.BatchNormalization(epsilon=EPSILON, name="bn2")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        size = layer.gamma.shape[0]
        layer.gamma.assign(rng.uniform(0.5, 2.0, size).astype("float32"))
        layer.beta.assign(rng.normal(size=size).astype("float32"))
        layer.moving_mean.assign(rng.normal(size=size).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.1, 5.0, size).astype("float32"))
    return model


def _data(n=300, seed=1):
    return np.random.default_rng(seed).normal(2.0, 3.0, size=(n, 5)).astype("float32")


def _numpy_statistics(model, x):
    """Each batch norm's input mean and variance, computed in float64 from the weights alone."""
    def dense(h, name):
        layer = model.get_layer(name)
        return h @ layer.kernel.numpy().astype(np.float64) + layer.bias.numpy()

    def normalise(h, name, mean, variance):
        layer = model.get_layer(name)
        return layer.gamma.numpy() * (h - mean) / np.sqrt(variance + EPSILON) + layer.beta.numpy()

    h1 = dense(x.astype(np.float64), "dense1")
    m1, v1 = h1.mean(0), h1.var(0)
    h2 = dense(np.maximum(normalise(h1, "bn1", m1, v1), 0), "dense2")
    return {"bn1": (m1, v1), "bn2": (h2.mean(0), h2.var(0))}


def test_statistics_match_numpy_layer_after_layer():
    model, x = _plain_model(), _data()
    assert fliqs_keras.reestimate_batch_norm(model, x, batch_size=64, max_examples=None) == 2
    for name, (mean, variance) in _numpy_statistics(model, x).items():
        layer = model.get_layer(name)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-4, atol=1e-4)


def test_a_dataset_of_pairs_and_max_examples_give_the_statistics_of_that_slice():
    x = _data(500)
    from_array = _plain_model()
    fliqs_keras.reestimate_batch_norm(from_array, x[:130], batch_size=1000)
    from_dataset = _plain_model()
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x), "int32"))).batch(48)
    fliqs_keras.reestimate_batch_norm(from_dataset, dataset, max_examples=130)
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(from_dataset.get_layer(name).moving_mean.numpy(),
                                   from_array.get_layer(name).moving_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(from_dataset.get_layer(name).moving_variance.numpy(),
                                   from_array.get_layer(name).moving_variance.numpy(), rtol=1e-5, atol=1e-6)


def test_searchable_model_is_normalised_in_its_chosen_formats():
    searchable = fliqs_keras.apply(fliqs_keras.models.digits_resnet((8, 8, 1), width=0.5), ["int2", "int8"])
    x = np.random.default_rng(0).uniform(0, 1, size=(128, 8, 8, 1)).astype("float32")
    fliqs_keras.set_formats(searchable, "int2")
    searchable(x[:32], training=True)  # calibrates the input clips of these formats
    fliqs_keras.reestimate_batch_norm(searchable, x)
    norms = [layer for layer in searchable.layers if isinstance(layer, keras.layers.BatchNormalization)]
    outputs = keras.Model(searchable.input, [layer.output for layer in norms]).predict(x, verbose=0)
    for layer, out in zip(norms, outputs):
        variance = layer.moving_variance.numpy()
        # In inference mode on the same examples, each batch norm's output has mean beta and
        # variance gamma^2 v / (v + eps): the statistics are those of the formats that run.
        np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), layer.beta.numpy(), atol=2e-4, err_msg=layer.name)
        np.testing.assert_allclose(out.var(axis=(0, 1, 2)),
                                   layer.gamma.numpy() ** 2 * variance / (variance + layer.epsilon),
                                   rtol=2e-3, atol=1e-5, err_msg=layer.name)
    int2_means = [layer.moving_mean.numpy().copy() for layer in norms]
    fliqs_keras.set_formats(searchable, "int8")
    searchable(x[:32], training=True)
    fliqs_keras.reestimate_batch_norm(searchable, x)
    assert any(not np.allclose(a, layer.moving_mean.numpy()) for a, layer in zip(int2_means, norms))


def _moving(model):
    return [(layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy())
            for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_non_finite_inputs_leave_every_batch_norm_as_it_was():
    model = _plain_model()
    before = _moving(model)
    x = _data()
    x[7, 2] = np.nan
    with pytest.raises(ValueError, match="'bn1'.*not finite"):
        fliqs_keras.reestimate_batch_norm(model, x)
    for (m0, v0), (m1, v1) in zip(before, _moving(model)):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v0, v1)


def test_bad_input_is_named():
    model = _plain_model()
    with pytest.raises(ValueError, match="no examples"):
        fliqs_keras.reestimate_batch_norm(model, tf.data.Dataset.from_tensor_slices(_data(4)).batch(2).take(0))
    with pytest.raises(ValueError, match="batch_size"):
        fliqs_keras.reestimate_batch_norm(model, _data(), batch_size=0)
    with pytest.raises(ValueError, match="max_examples"):
        fliqs_keras.reestimate_batch_norm(model, _data(), max_examples=0)
    with pytest.raises(ValueError, match="not a built functional model"):
        fliqs_keras.reestimate_batch_norm(keras.Sequential([keras.layers.BatchNormalization()]), _data())

    inner = _plain_model()
    outer_inputs = keras.Input((5,))
    nested = keras.Model(outer_inputs, inner(outer_inputs))
    with pytest.raises(ValueError, match="'.*bn1'.*nested model"):
        fliqs_keras.reestimate_batch_norm(nested, _data())

    shared_inputs = keras.Input((4,))
    shared = keras.layers.BatchNormalization(name="shared_bn")
    twice = keras.Model(shared_inputs, shared(shared(shared_inputs)))
    with pytest.raises(ValueError, match="'shared_bn' is called 2 times"):
        fliqs_keras.reestimate_batch_norm(twice, np.ones((8, 4), "float32"))


def test_a_model_without_batch_norms_is_left_alone():
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert fliqs_keras.reestimate_batch_norm(model, _data()) == 0
