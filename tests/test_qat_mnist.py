"""Uniform QAT on the 5,000 real MNIST digits: INT8 keeps the float accuracy, INT2 loses some."""

import keras
import numpy as np

import fliqs_keras
from fliqs_keras import data, models


def _train(model, x, y, epochs, seed):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    keras.utils.set_random_seed(seed)
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)


def test_int8_qat_matches_float_and_int2_is_measurably_lower():
    (x_train, y_train), (x_test, y_test) = data.mnist_digits(seed=0)
    keras.utils.set_random_seed(0)
    model = models.small_cnn()
    _train(model, x_train, y_train, epochs=3, seed=1)
    # Every run continues from the same float checkpoint, with the same data order.
    int8 = fliqs_keras.apply(model, "int8")
    int2 = fliqs_keras.apply(model, "int2")
    accuracy = {}
    for name, candidate in (("float", model), ("int8", int8), ("int2", int2)):
        _train(candidate, x_train, y_train, epochs=2, seed=2)
        accuracy[name] = candidate.evaluate(x_test, y_test, verbose=0)[1]
    assert accuracy["float"] > 0.9, accuracy
    assert abs(accuracy["int8"] - accuracy["float"]) <= 0.005, accuracy
    assert accuracy["int2"] < accuracy["float"] - 0.005, accuracy
