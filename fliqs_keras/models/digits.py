"""Small models for the offline digits (28x28 MNIST, 8x8 scikit-learn digits).

`digits_resnet` and `digits_mobilenet` are the benchmark models, with cheap
sensitive layers beside costly ones; `small_cnn` is the tests' two-layer CNN.
"""

from __future__ import annotations

import keras

from fliqs_keras.models.mobilenet_v2 import _inverted_residual
from fliqs_keras.models.resnet import _basic_block, _channels, _conv_bn

# (expansion, output channels, stride) of each inverted-residual block of `digits_mobilenet`.
MOBILE_BLOCKS = ((1, 16, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1), (4, 64, 1))


def digits_resnet(input_shape=(28, 28, 1), classes: int = 10, width: float = 1.0) -> keras.Model:
    """A stem of 12 channels, then two residual blocks (24 and 48 channels, stride 2 each).

    About 3.3 M MACs at 28x28 with width 1; the classifier outputs logits.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}.")
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, _channels(12, width), 3, 1, "stem")
    for stage, filters in enumerate((24, 48)):
        x = _basic_block(x, _channels(filters, width), 2, f"stage{stage + 1}_block1")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_resnet")


def digits_mobilenet(input_shape=(28, 28, 1), classes: int = 10, width: float = 1.0) -> keras.Model:
    """A 3x3 stem of 16 channels, then five MobileNetV2 inverted-residual blocks (`MOBILE_BLOCKS`).

    About 2.6 M MACs at 28x28 with width 1, a sixth of them in the stem and
    the depthwise convolutions; 16 quantized layers. The classifier outputs
    logits.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}.")
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(_channels(16, width), 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    for block, (expansion, channels, stride) in enumerate(MOBILE_BLOCKS):
        x = _inverted_residual(x, expansion, _channels(channels, width), stride, f"block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_mobilenet")


def _pool_if_room(x):
    return keras.layers.MaxPooling2D()(x) if min(x.shape[1:3]) >= 2 else x


def small_cnn(input_shape=(28, 28, 1), classes: int = 10) -> keras.Model:
    """Two 3x3 convolutions with max pools and a dense classifier (logits).

    A pool is left out where the map has no room for it (the 8x8 digits leave
    1x1 after the second convolution).
    """
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inputs)
    x = _pool_if_room(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = _pool_if_room(x)
    outputs = keras.layers.Dense(classes, name="logits")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs, name="small_cnn")
