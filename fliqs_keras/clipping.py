"""Clip thresholds per (tensor, format): switchable clipping.

Calibrators ``"max"``, ``"percentile"`` and ``"mse"`` give a clip per tensor or
per channel; `update_running` keeps an activation's clips as running
statistics, one row per format.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np
from keras import ops

from fliqs_keras import formats, quantizers

DEFAULT_FRACTIONS = tuple(float(f) for f in np.round(np.arange(0.1, 1.0001, 0.05), 4))
DEFAULT_PERCENTILE = 99.99


def _channels_last(x, axis: int | None, absolute: bool = True):
    """|x| (or x) as a matrix [elements, channels] (channels = 1 when axis is None)."""
    x = ops.cast(x, "float32")
    x = ops.abs(x) if absolute else x
    if axis is None:
        return ops.reshape(x, (-1, 1))
    rank = len(x.shape)
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}.")
    x = ops.moveaxis(x, axis, -1)
    return ops.reshape(x, (-1, x.shape[-1]))


def _shape_result(values, axis: int | None):
    return ops.reshape(values, ()) if axis is None else values


def max_abs(x, axis: int | None = None):
    """max ``|x|`` over the tensor, or per channel along `axis`."""
    return _shape_result(ops.max(_channels_last(x, axis), axis=0), axis)


def percentile(x, axis: int | None = None, q: float = DEFAULT_PERCENTILE):
    """The `q`-th percentile (0 < q <= 100) of ``|x|``, per tensor or per channel."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile q must be in (0, 100], got {q}.")
    return _shape_result(ops.quantile(_channels_last(x, axis), q / 100.0, axis=0), axis)


def _check_fractions(fractions) -> np.ndarray:
    values = np.asarray(fractions, np.float32).reshape(-1)
    if values.size == 0 or np.any(~np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"fractions must be a non-empty list of positive numbers, got {fractions!r}.")
    return values


def mse_fraction(x, fmt: Any, axis: int | None = None, fractions=DEFAULT_FRACTIONS):
    """The fraction of max ``|x|`` whose clip quantizes `x` in `fmt` with least squared error.

    All candidates are evaluated in one batched quantization ([fractions,
    elements, channels]), so calibration is one fused kernel per tensor shape.

    Args:
        x: the tensor to calibrate.
        fmt: a format, a name, or a grid tensor (see `quantizers.fake_quant`).
        axis: the channel axis for one fraction per channel; None for one fraction.
        fractions: the candidates; ties go to the smallest.
    """
    candidates = _check_fractions(fractions)
    grid = quantizers.grid_tensor(fmt) if isinstance(fmt, (str, dict, formats.IntFormat, formats.FloatFormat)) \
        else ops.cast(fmt, "float32")
    matrix = _channels_last(ops.stop_gradient(x), axis, absolute=False)
    best = _best_fraction(matrix, grid, ops.convert_to_tensor(candidates))
    return _shape_result(best, axis)


@quantizers.compiled
def _best_fraction(matrix, grid, candidates):
    peak = ops.max(ops.abs(matrix), axis=0)
    clips = candidates[:, None] * peak[None, :]
    quantized = quantizers.quantize_clipped(matrix[None], grid, clips[:, None, :])
    errors = ops.sum(ops.square(quantized - matrix[None]), axis=1)
    return ops.take(candidates, ops.argmin(errors, axis=0))


def mse(x, fmt: Any, axis: int | None = None, fractions=DEFAULT_FRACTIONS):
    """The MSE-optimal clip of `x` in `fmt` (see `mse_fraction`)."""
    return mse_fraction(x, fmt, axis, fractions) * max_abs(x, axis)


CALIBRATORS: dict[str, Callable[..., Any]] = {
    "max": lambda x, fmt, axis, **options: max_abs(x, axis, **options),
    "percentile": lambda x, fmt, axis, **options: percentile(x, axis, **options),
    "mse": mse,
}


def calibrate(x, fmt: Any, method: str = "mse", axis: int | None = None, **options):
    """The clip of `x` for `fmt` by the calibrator named `method` (see `CALIBRATORS`).

    Raises:
        ValueError: for an unknown calibrator, or an `x` with NaN or
            infinite values (when `x` is concrete: the running clips of a
            compiled step skip non-finite observations themselves).
    """
    if method not in CALIBRATORS:
        raise ValueError(f"Unknown clip calibrator {method!r}; expected one of {sorted(CALIBRATORS)}.")
    _reject_non_finite(x)
    return CALIBRATORS[method](x, fmt, axis, **options)


def _reject_non_finite(x):
    try:
        values = np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:  # noqa: BLE001 - a traced tensor has no values to check; each backend raises its own
        return
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(f"Cannot calibrate a clip on values with NaN or infinity ({bad} of {np.size(values)}).")


def calibrate_formats(x, fmts, method: str = "mse", axis: int | None = None, **options):
    """The switchable clip table of `x`: one row per format, shape [len(fmts)] or [len(fmts), C]."""
    fmts = list(fmts)
    if not fmts:
        raise ValueError("calibrate_formats needs at least one format.")
    return ops.stack([calibrate(x, fmt, method, axis, **options) for fmt in fmts])


def update_running(table, counts, index, value, momentum: float = 0.99):
    """Folds one observation into row `index` of a running clip table.

    Args:
        table: a variable [formats, ...] of running clips.
        counts: an int variable [formats]: observations per row so far. A row
            with none takes `value` as it is (no bias towards the initial value).
        index: the row (the format that was active), an int scalar tensor.
        value: the new observation, shaped like one row.
        momentum: weight of the old value, in [0, 1).

    Only the selected row changes, so a format that is not sampled keeps its
    clip. A non-finite observation is ignored rather than written.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
    rows = table.shape[0]
    selected = ops.one_hot(index, rows, dtype="bool")
    value = ops.cast(value, table.dtype)
    finite = ops.all(ops.isfinite(value))
    old = ops.take(table, index, axis=0)
    seen = ops.take(counts, index) > 0
    new = ops.where(seen, momentum * old + (1.0 - momentum) * value, value)
    new = ops.where(finite, new, old)
    mask = ops.reshape(selected, (rows,) + (1,) * (len(table.shape) - 1))
    table.assign(ops.where(mask, ops.expand_dims(new, 0), ops.convert_to_tensor(table)))
    counts.assign(counts + ops.cast(ops.logical_and(selected, finite), counts.dtype))
