"""Offline input data."""

import numpy as np
import pytest

from fliqs_keras import data


def test_mnist_digits_split_is_stratified_disjoint_and_repeatable():
    (x_train, y_train), (x_test, y_test) = data.mnist_digits(test_fraction=0.2, seed=3)
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    train_rows = {row.tobytes() for row in x_train.reshape(len(x_train), -1)}
    assert not any(row.tobytes() in train_rows for row in x_test.reshape(len(x_test), -1))
    (again, _), _ = data.mnist_digits(test_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again, x_train)
    (other, _), _ = data.mnist_digits(test_fraction=0.2, seed=4)
    assert not np.array_equal(other, x_train)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        data.mnist_digits(test_fraction=fraction)
