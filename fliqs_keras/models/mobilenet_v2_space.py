"""A searchable MobileNetV2 (TuNAS-style): kernel size, expansion ratio and skip per block, width per stage.

Every choice shares one weight tensor (`blocks`); at its largest choices the
network is `mobilenet_v2` of the same width with the largest kernel, layer for
layer and weight for weight.
"""

from __future__ import annotations

from typing import Sequence

import keras

from fliqs_keras import architecture, blocks
from fliqs_keras.models.mobilenet_v2 import BLOCKS, _divisible, head, stem


def _stage_width(stage: int, channels: int, widths: Sequence[float]) -> architecture.Dimension | int:
    """The width decision of a stage, or its fixed channel count where the widths round to one count."""
    counts = {}
    for multiplier in sorted(widths):
        counts[_divisible(multiplier * channels)] = multiplier  # the largest multiplier names a shared count
    if len(counts) == 1:
        return channels
    ordered = sorted(counts)
    return architecture.dimension(f"stage{stage}/width", [f"width{counts[c]:g}" for c in ordered], ordered)


def searchable_mobilenet_v2(input_shape=(224, 224, 3), classes: int = 1000, width: float = 1.0,
                            small_input: bool = False, kernel_sizes: Sequence[int] = (3, 5, 7),
                            expansions: Sequence[int] = (3, 6), widths: Sequence[float] = (0.5, 0.75, 1.0),
                            skip: bool = True, stages=BLOCKS) -> keras.Model:
    """MobileNetV2 whose blocks and stages are architecture decisions; the classifier outputs logits.

    Args:
        input_shape, classes, width, small_input, stages: as `mobilenet_v2`.
        kernel_sizes: the depthwise kernel sides each block chooses from.
        expansions: the expansion ratios each block chooses from (the first
            block keeps MobileNetV2's ratio of 1).
        widths: multipliers of each stage's output channels; a stage where
            they round to one count (multiples of 8) has no width decision.
        skip: whether a block that keeps its shape (stride 1, the stage's
            later blocks) may be skipped.

    Raises:
        ValueError: for a width <= 0, or widths whose largest is not 1.0.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}.")
    if not widths or max(widths) != 1.0:
        raise ValueError(f"widths must include 1.0 as the largest, got {list(widths)}.")
    inputs = keras.Input(input_shape, name="image")
    x = stem(inputs, width, small_input)
    block, incoming = 0, None
    for stage, (expansion, channels, repeats, stride) in enumerate(stages):
        if small_input and stage == 1:
            stride = 1
        output = _stage_width(stage, _divisible(channels * width), widths)
        for index in range(repeats):
            x = blocks.inverted_residual(
                x, f"block{block}", kernel_sizes=kernel_sizes, expansions=(1,) if expansion == 1 else expansions,
                output_channels=output, stride=stride if index == 0 else 1, input_channels=incoming,
                skippable=skip and index > 0)
            incoming = output if isinstance(output, architecture.Dimension) else None
            block += 1
    channels = _divisible(1280 * max(width, 1.0))
    if incoming is None:
        x = keras.layers.Conv2D(channels, 1, use_bias=False, name="head_conv")(x)
    else:
        x = blocks.MaskedConv2D(channels, 1, use_bias=False, input_channels=incoming, name="head_conv")(x)
    return keras.Model(inputs, head(x, classes), name="mobilenet_v2_space")
