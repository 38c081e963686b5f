"""Fake quantization (quantize, then dequantize) with a straight-through gradient.

One graph serves every format: a format reaches the arithmetic as a `Grid`
tensor, never as a Python branch. Rounding equals the `ml_dtypes` casts bit for
bit, subnormals included, and saturates at the format's max.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import backend, ops

from fliqs_keras import formats

MIN_CLIP = 1e-30
_SMALLEST_NORMAL = np.float32(2.0**-126)


def grid_tensor(fmt: Any):
    """The `formats.Grid` of `fmt` (a name or a format) as a float32 tensor of shape [4]."""
    return ops.convert_to_tensor(np.asarray(formats.get(fmt).grid, np.float32))


def grid_table(fmts: Any):
    """Grids of several formats stacked as a float32 tensor of shape [len(fmts), 4].

    A layer gathers one row with the index of its current format; the row is
    what `fake_quant` takes as `fmt` inside a compiled step.
    """
    rows = [formats.get(f).grid for f in fmts]
    if not rows:
        raise ValueError("grid_table needs at least one format.")
    return ops.convert_to_tensor(np.asarray(rows, np.float32))


def _bitcast(x, dtype: str):
    # keras.ops.view cannot take a tensor whose last dimension is unknown, which
    # the shape-generic traces of `compiled` have.
    if backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.bitcast(x, dtype)
    return ops.view(x, dtype)


def _pow2(exponent):
    """2**exponent, exactly, for int32 exponents in [-126, 127]."""
    return _bitcast(ops.left_shift(exponent + 127, 23), "float32")


def _exponent(bits):
    """The unbiased exponent of float32 bit patterns (-127 for zero and subnormals)."""
    return ops.bitwise_and(ops.right_shift(bits, 23), 255) - 127


def _round_subnormal_bits(bits, quantum_exponent):
    """Rounds float32 subnormals on their bit patterns, half to even.

    CPU kernels may flush float32 subnormals to zero in any arithmetic (even
    min/max), so the values below 2**-126, which matter to bf16 and fp32, are
    rounded as integers: a subnormal's magnitude bits count units of 2**-149.
    """
    magnitude = ops.bitwise_and(bits, 0x7FFFFFFF)
    shift = ops.clip(quantum_exponent + 149, 0, 25)
    odd = ops.bitwise_and(ops.right_shift(magnitude, shift), 1)
    half_minus_one = ops.right_shift(ops.left_shift(1, shift), 1) - 1
    bias = ops.where(shift > 0, half_minus_one + odd, 0)
    rounded = ops.left_shift(ops.right_shift(magnitude + bias, shift), shift)
    return _bitcast(ops.bitwise_or(rounded, ops.bitwise_and(bits, _SIGN_BIT)), "float32")


_SIGN_BIT = np.int32(-(2**31))


def _check_clip(clip):
    """Validates a clip that is known now; returns it as a float32 tensor."""
    if isinstance(clip, (int, float, np.ndarray, np.number, list, tuple)):
        values = np.asarray(clip, np.float64)
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"clip must be finite and > 0, got {clip!r}.")
    return ops.cast(clip, "float32")


def _broadcast_clip(clip, x, axis):
    if axis is None:
        if len(clip.shape) != 0:
            raise ValueError(
                f"A clip of shape {tuple(clip.shape)} needs `axis`, the channel axis it runs along."
            )
        return clip
    rank = len(x.shape)
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for an input of rank {rank}.")
    axis %= rank
    if len(clip.shape) > 1:
        raise ValueError(f"A per-channel clip must be a vector, got shape {tuple(clip.shape)}.")
    channels = x.shape[axis]
    if len(clip.shape) == 1 and None not in (channels, clip.shape[0]) and clip.shape[0] not in (
        1,
        channels,
    ):
        raise ValueError(
            f"clip has {clip.shape[0]} values but axis {axis} of the input has {channels} channels."
        )
    shape = [1] * rank
    shape[axis] = -1
    return ops.reshape(clip, shape)


def quantize_dequantize(x, grid, scale=None):
    """Rounds ``x / scale`` onto `grid` and scales back; no clip, no gradient.

    Args:
        x: a float32 tensor.
        grid: a float32 tensor [4] (see `formats.Grid`).
        scale: None (unit scale) or a float32 tensor >= 2**-126 broadcastable to x.
    """
    low, high = grid[0], grid[1]
    mantissa_bits = ops.cast(grid[2], "int32")
    min_exponent = ops.cast(grid[3], "int32")
    y = x if scale is None else x / scale
    raw_bits = _bitcast(y, "int32")
    y = ops.clip(y, low, high)
    # Scale each value so that its quantum is 1, in two exact power-of-two steps
    # (the shift can reach 149, beyond float32's largest power of two).
    shift = mantissa_bits - ops.maximum(_exponent(_bitcast(y, "int32")), min_exponent)
    first = ops.floor_divide(shift, 2)
    second = shift - first
    units = ops.round(y * _pow2(first) * _pow2(second))
    q = units * _pow2(-first) * _pow2(-second)
    q = ops.where(
        _exponent(raw_bits) == -127,
        _round_subnormal_bits(raw_bits, min_exponent - mantissa_bits),
        q,
    )
    return q if scale is None else q * scale


def scale(grid, clip):
    """The scale a clip gives a grid (values are ``codes * scale``): ``clip / max``, floored at
    float32's smallest normal (for bf16 and fp32, whose max is near float32's own)."""
    return ops.maximum(ops.maximum(clip, MIN_CLIP) / grid[1], _SMALLEST_NORMAL)


def _clip_range(grid, clip):
    return clip * (grid[0] / grid[1]), clip


def _quantize_clipped(x, grid, clip, unit_scale):
    """Saturates `x` at the clip range, then rounds it onto the scaled grid.

    Saturation happens in the input's units because for bf16 and fp32 the scale
    ``clip / max`` is floored at float32's smallest normal, and the grid alone
    would then saturate beyond the clip. At unit scale no arithmetic comes
    before the rounding, which keeps float32 subnormals (bf16's) intact.
    """
    if unit_scale:
        return quantize_dequantize(x, grid)
    low, high = _clip_range(grid, clip)
    # minimum/maximum rather than clip: the clip may broadcast x to a larger shape.
    saturated = ops.minimum(ops.maximum(x, low), high)
    return quantize_dequantize(saturated, grid, scale(grid, clip))


def compiled(function):
    """`function` compiled by XLA into fused kernels (on the TensorFlow backend).

    Applied even where the surrounding step is a plain graph (Keras turns XLA
    off on CPU-only machines): unfused, the twenty-odd elementwise ops of a
    quantizer each make a pass over the tensor. Other backends compile whole
    steps themselves.
    """
    if backend.backend() != "tensorflow":
        return function
    import tensorflow as tf

    # Shape-generic traces: one per rank, not one per tensor shape (XLA still
    # compiles per shape, without Python tracing).
    return tf.function(function, jit_compile=True, reduce_retracing=True)


_quantize_clipped = compiled(_quantize_clipped)


def quantize_clipped(x, grid, clip):
    """`x` saturated at the clip and rounded onto `grid` scaled to it; no gradient, no checks.

    For calibration, where `clip` may broadcast against `x` in any way (one
    candidate clip per leading slice, say). `grid` is a tensor [4].
    """
    return _quantize_clipped(ops.cast(x, "float32"), grid, ops.maximum(ops.cast(clip, "float32"), MIN_CLIP), False)


def fake_quant(x, fmt: Any, clip: Any = None, axis: int | None = None):
    """Quantizes `x` to `fmt` and dequantizes it, with a straight-through gradient.

    Args:
        x: a float tensor (float16, bfloat16 or float32).
        fmt: a format name, a format object, or a grid tensor of shape [4]
            (from `grid_tensor` or a row of `grid_table`).
        clip: the value that maps to the format's largest value; a scalar, or
            a vector of per-channel clips along `axis`. None means unit scale.
        axis: the channel axis of a per-channel clip.

    Returns:
        A tensor of the same shape and dtype as `x`.
    """
    if fmt is None:
        raise ValueError("fake_quant needs a format (a name, a format object or a grid tensor of shape [4]), "
                         "got None.")
    if isinstance(fmt, (str, dict, formats.IntFormat, formats.FloatFormat)):
        grid = grid_tensor(fmt)
    else:
        grid = ops.cast(fmt, "float32")
        if tuple(grid.shape) != (4,):
            raise ValueError(
                f"fmt must be a format, a name or a grid tensor of shape [4], got shape "
                f"{tuple(grid.shape)}."
            )
    x = ops.convert_to_tensor(x)
    if not any(kind in str(x.dtype) for kind in ("float", "bfloat")):
        raise ValueError(f"fake_quant needs a float input, got dtype {x.dtype}.")
    x32 = ops.cast(x, "float32")
    unit_scale = clip is None
    if unit_scale:
        clip = grid[1]  # the clip range is the grid's own
    else:
        clip = ops.maximum(_broadcast_clip(_check_clip(clip), x32, axis), MIN_CLIP)
    quantized = _STRAIGHT_THROUGH[unit_scale](x32, grid, ops.stop_gradient(clip))
    return ops.cast(quantized, x.dtype)


def _straight_through(unit_scale: bool):
    @ops.custom_gradient
    def quantize(x, grid, clip):
        # A custom gradient rather than `q + x - stop_gradient(x)`: the sum would
        # turn -0.0 into +0.0 and break bit-exactness. The mask is built only
        # when a gradient is asked for.
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            low, high = _clip_range(grid, clip)
            inside = ops.logical_and(x >= low, x <= high)
            return ops.where(inside, upstream, ops.zeros_like(upstream)), None, None

        return _quantize_clipped(x, grid, clip, unit_scale), grad

    return quantize


_STRAIGHT_THROUGH = {True: _straight_through(True), False: _straight_through(False)}
