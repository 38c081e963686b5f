"""ResNet-18 and ResNet-50 as plain Keras Functional models.

An ImageNet stem or a CIFAR stem for small images; ResNet-50 puts the stride
in the 3x3 convolution (the variant FLIQS counts) unless ``stride_in_1x1``.
"""

from __future__ import annotations

import keras

STEMS = ("imagenet", "cifar")


def _channels(filters: int, width: float) -> int:
    return max(8, int(round(filters * width)))


def _conv_bn(x, filters, kernel, stride, name, relu=True):
    x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _shortcut(x, filters, stride, name):
    if stride == 1 and x.shape[-1] == filters:
        return x
    return _conv_bn(x, filters, 1, stride, f"{name}_proj", relu=False)


def _basic_block(x, filters, stride, name, stride_in_1x1=False):
    del stride_in_1x1
    y = _conv_bn(x, filters, 3, stride, f"{name}_1")
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    y = keras.layers.Add(name=f"{name}_add")([y, _shortcut(x, filters, stride, name)])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _bottleneck_block(x, filters, stride, name, stride_in_1x1=False):
    y = _conv_bn(x, filters, 1, stride if stride_in_1x1 else 1, f"{name}_1")
    y = _conv_bn(y, filters, 3, 1 if stride_in_1x1 else stride, f"{name}_2")
    y = _conv_bn(y, 4 * filters, 1, 1, f"{name}_3", relu=False)
    y = keras.layers.Add(name=f"{name}_add")([y, _shortcut(x, 4 * filters, stride, name)])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _resnet(name, block, depths, input_shape, classes, stem, width, stride_in_1x1):
    if stem not in STEMS:
        raise ValueError(f"Unknown stem {stem!r}; expected one of {STEMS}.")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}.")
    inputs = keras.Input(input_shape, name="image")
    if stem == "imagenet":
        x = _conv_bn(inputs, _channels(64, width), 7, 2, "stem")
        x = keras.layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
    else:
        x = _conv_bn(inputs, _channels(64, width), 3, 1, "stem")
    for stage, (filters, depth) in enumerate(zip((64, 128, 256, 512), depths)):
        for index in range(depth):
            stride = 2 if stage > 0 and index == 0 else 1
            x = block(x, _channels(filters, width), stride, f"stage{stage + 1}_block{index + 1}", stride_in_1x1)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def resnet18(input_shape=(224, 224, 3), classes: int = 1000, stem: str = "imagenet",
             width: float = 1.0) -> keras.Model:
    """ResNet-18 (basic blocks, 2-2-2-2); the classifier outputs logits."""
    return _resnet("resnet18", _basic_block, (2, 2, 2, 2), input_shape, classes, stem, width, False)


def resnet50(input_shape=(224, 224, 3), classes: int = 1000, stem: str = "imagenet", width: float = 1.0,
             stride_in_1x1: bool = False) -> keras.Model:
    """ResNet-50 (bottleneck blocks, 3-4-6-3); the classifier outputs logits."""
    return _resnet("resnet50", _bottleneck_block, (3, 4, 6, 3), input_shape, classes, stem, width, stride_in_1x1)
