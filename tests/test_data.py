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


def test_sklearn_digits_split():
    (x_train, y_train), (x_test, y_test) = data.sklearn_digits(test_fraction=0.2, seed=0)
    assert x_train.shape[1:] == (8, 8, 1) and len(x_train) + len(x_test) == 1797
    assert x_train.dtype == np.float32 and x_train.min() == 0.0 and x_train.max() == 1.0
    assert abs(len(x_test) - 0.2 * 1797) <= 10 and set(np.unique(y_test)) == set(range(10))


def test_held_out_split_is_stratified_and_disjoint():
    (x, y), _ = data.mnist_digits(seed=0)
    (x_fit, y_fit), (x_held, y_held) = data.held_out_split(x, y, fraction=0.125, seed=0)
    assert len(x_fit) + len(x_held) == len(x) and len(x_held) == 500
    np.testing.assert_array_equal(np.bincount(y_held), [50] * 10)
    fit_rows = {row.tobytes() for row in x_fit.reshape(len(x_fit), -1)}
    assert not any(row.tobytes() in fit_rows for row in x_held.reshape(len(x_held), -1))
    with pytest.raises(ValueError, match="differ in length"):
        data.held_out_split(x, y[:10])
    with pytest.raises(ValueError, match="fraction"):
        data.held_out_split(x, y, fraction=1.5)


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"the network was touched: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _tiny_cifar10(data_dir, train=40, test=10):
    """A CIFAR-10 with CIFAR-10's TFDS name, version and features, written locally."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)

    def examples(count):
        return tf.data.Dataset.from_tensor_slices({
            "id": np.array([f"example_{i}" for i in range(count)]),
            "image": rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, count).astype(np.int64)})

    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="cifar10", version="3.0.2", features=features, data_dir=str(data_dir),
        split_datasets={"train": examples(train), "test": examples(test)})


def test_tfds_pipeline_reads_a_local_data_dir_offline(tmp_path, no_network):
    import tensorflow as tf

    _tiny_cifar10(tmp_path)
    splits = data.tfds_splits(held_out_percent=10)
    train = data.tfds_pipeline("cifar10", splits["train"], str(tmp_path), 8, training=True, seed=1)
    assert train.cardinality().numpy() == 4  # 36 examples, full batches of 8
    batches = list(train)
    assert len(batches) == 4
    images, labels = batches[0]
    assert images.shape == (8, 32, 32, 3) and images.dtype == tf.float32 and labels.dtype == tf.int32
    assert -3 < float(tf.reduce_min(images)) < 0 < float(tf.reduce_max(images)) < 3  # normalized
    held = data.tfds_pipeline("cifar10", splits["held_out"], str(tmp_path), 8, training=False)
    assert sum(len(y) for _, y in held) == 4
    test = data.tfds_pipeline("cifar10", "test", str(tmp_path), 4, training=False)
    assert test.cardinality().numpy() == 3 and sum(len(y) for _, y in test) == 10
    first, again = (next(iter(test))[0].numpy() for _ in range(2))
    np.testing.assert_array_equal(first, again)  # evaluation is deterministic: no augmentation


def test_tfds_pipeline_refuses_to_download_by_default(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="not prepared in data_dir"):
        data.tfds_pipeline("imagenet2012", "validation", str(tmp_path), 4, training=False)
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'mnist'"):
        data.tfds_pipeline("mnist", "train", str(tmp_path), 4, training=False)
    with pytest.raises(ValueError, match="held_out_percent"):
        data.tfds_splits(0)
