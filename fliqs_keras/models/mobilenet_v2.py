"""MobileNetV2 as a plain Keras Functional model, with a width multiplier.

``small_input=True`` drops the strides of the stem and the second stage, for
28x28 or 32x32 images.
"""

from __future__ import annotations

import keras

# (expansion, output channels, blocks, first stride)
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))


def _divisible(channels: float, divisor: int = 8) -> int:
    """Rounded to a multiple of 8, never below 90% of the request (the reference implementation's rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _inverted_residual(x, expansion, channels, stride, name, kernel_size=3):
    inputs = x
    hidden = x.shape[-1] * expansion
    if expansion != 1:
        x = keras.layers.Conv2D(hidden, 1, use_bias=False, name=f"{name}_expand")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"{name}_expand_bn")(x)
        x = keras.layers.ReLU(6.0, name=f"{name}_expand_relu")(x)
    x = keras.layers.DepthwiseConv2D(kernel_size, stride, padding="same", use_bias=False, name=f"{name}_depthwise")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"{name}_depthwise_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu")(x)
    x = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_project")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"{name}_project_bn")(x)
    if stride == 1 and inputs.shape[-1] == channels:
        x = keras.layers.Add(name=f"{name}_add")([inputs, x])
    return x


def stem(inputs, width: float, small_input: bool):
    """The 3x3 stem convolution with its batch norm and ReLU6."""
    x = keras.layers.Conv2D(_divisible(32 * width), 3, 1 if small_input else 2, padding="same", use_bias=False,
                            name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="stem_bn")(x)
    return keras.layers.ReLU(6.0, name="stem_relu")(x)


def head(x, classes: int):
    """The head convolution's batch norm and ReLU6, the pooling and the classifier (logits)."""
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="head_bn")(x)
    x = keras.layers.ReLU(6.0, name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.layers.Dense(classes, name="logits")(x)


def mobilenet_v2(input_shape=(224, 224, 3), classes: int = 1000, width: float = 1.0,
                 small_input: bool = False, kernel_size: int = 3, stages=BLOCKS) -> keras.Model:
    """MobileNetV2; the classifier outputs logits.

    Args:
        input_shape, classes: the images and the number of classes.
        width: the channel multiplier.
        small_input: no stride in the stem and the second stage (28x28 or 32x32 images).
        kernel_size: the depthwise kernels' side (3 in the paper).
        stages: (expansion, output channels, blocks, first stride) per stage; `BLOCKS` by default.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}.")
    inputs = keras.Input(input_shape, name="image")
    x = stem(inputs, width, small_input)
    block = 0
    for stage, (expansion, channels, repeats, stride) in enumerate(stages):
        if small_input and stage == 1:
            stride = 1
        for index in range(repeats):
            x = _inverted_residual(x, expansion, _divisible(channels * width), stride if index == 0 else 1,
                                   f"block{block}", kernel_size)
            block += 1
    x = keras.layers.Conv2D(_divisible(1280 * max(width, 1.0)), 1, use_bias=False, name="head_conv")(x)
    return keras.Model(inputs, head(x, classes), name="mobilenet_v2")
