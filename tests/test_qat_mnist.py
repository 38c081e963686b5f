"""Uniform QAT on the 5,000 real MNIST digits: INT8 keeps the float accuracy, INT2 loses more on every seed."""

import keras
import numpy as np
import pytest

import fliqs_keras
from fliqs_keras import data, models


def _train(model, x, y, epochs, seed):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    keras.utils.set_random_seed(seed)
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)


@pytest.mark.slow  # nine trainings: 50 s
def test_int8_qat_matches_float_and_int2_is_measurably_lower():
    (x_train, y_train), (x_test, y_test) = data.mnist_digits(seed=0)
    keras.utils.set_random_seed(0)
    checkpoint = models.small_cnn()
    _train(checkpoint, x_train, y_train, epochs=2, seed=1)
    accuracy = {"float": [], "int8": [], "int2": []}
    for seed in (2, 3, 4):
        # Every run continues from the same float checkpoint; each seed shuffles the data its own way.
        fresh = keras.models.clone_model(checkpoint)
        fresh.set_weights(checkpoint.get_weights())
        for name in accuracy:
            candidate = fresh if name == "float" else fliqs_keras.apply(checkpoint, name)
            _train(candidate, x_train, y_train, epochs=1, seed=seed)
            accuracy[name].append(candidate.evaluate(x_test, y_test, verbose=0)[1])
        if seed == 2:
            # INT8 is applied, not a pass-through: its outputs are close to the float model's but not equal.
            int8 = fliqs_keras.apply(fresh, "int8")
            difference = np.abs(int8.predict(x_test[:64], verbose=0) - fresh.predict(x_test[:64], verbose=0))
            assert 0 < difference.max() < 1.0, difference.max()
    # Paired by seed (the same data order and start): the seeds move float and INT8 together.
    float_ = np.array(accuracy["float"])
    int8_gap, int2_gap = float_ - np.array(accuracy["int8"]), float_ - np.array(accuracy["int2"])
    assert float_.mean() > 0.9, accuracy
    assert np.abs(int8_gap).max() <= 0.005, accuracy
    assert int2_gap.min() > max(3 * np.abs(int8_gap).max(), 0.005), accuracy
