"""Which TFLite treatment each layer's chosen formats get, and why.

TFLite runs INT8 and INT4 weights with INT8 or INT16 activations, with inputs
quantized per invoke (dynamic range), and float; every other format maps to the
nearest thing that runs, and `LayerPlan.notes` say how. The table: docs/export.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fliqs_keras import formats

_INTEGER_OPS = ("Conv1D", "Conv2D", "DepthwiseConv2D", "Dense")
_INT4_OPS = ("Conv1D", "Conv2D", "Dense")
# Their weights are constants of FULLY_CONNECTED or BATCH_MATMUL ops between float ones (softmax, the
# attention's products of two activations): integer weights, with inputs quantized per invoke.
DYNAMIC_OPS = ("EinsumDense", "MultiHeadAttention")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """The TFLite treatment of one layer."""

    layer: str
    layer_type: str
    weight_format: str | None
    activation_format: str | None
    weight_bits: int | None  # 4 or 8: integer weights; None: float weights
    activation_bits: int | None  # 8 or 16: integer inputs; None: float
    annotated: bool  # float weights that hold exact values of a narrower format
    notes: tuple[str, ...]
    dynamic: bool = False  # integer weights; inputs quantized to INT8 per invoke from their own range
    float16: bool = False  # annotated weights stored as FLOAT16 codes and a float32 scale per channel

    @property
    def tflite(self) -> str:
        """What the file stores for the layer, as the report prints it."""
        weights = f"int{self.weight_bits}" if self.weight_bits else "float16" if self.float16 else "float32"
        inputs = (f"int{self.activation_bits}" if self.activation_bits else "int8 per invoke" if self.dynamic
                  else "float32")
        return f"weights {weights}, inputs {inputs}"


def weight_widening(weight_format, storage_bits: int) -> int:
    """The integer a signed format's weight codes are multiplied by in INT`storage_bits` storage.

    The largest that keeps them in range: the stored weights are the same, and
    TFLite's int32 bias, whose step is the input step times the weight step,
    gets that many times finer.
    """
    fmt = formats.get(weight_format)
    return int((2 ** (storage_bits - 1) - 1) // (2 ** (fmt.bits - 1) - 1))


def plan_layer(layer: str, entry: dict[str, Any]) -> LayerPlan:
    """The treatment of one layer entry of a formats file (see `formats_file`)."""
    weight = formats.get(entry["weight_format"]) if entry["weight_format"] else None
    activation = formats.get(entry["activation_format"]) if entry["activation_format"] else None
    notes = []
    weight_bits = activation_bits = None
    integer_op = entry["type"] in _INTEGER_OPS
    if entry["type"] in DYNAMIC_OPS and isinstance(weight, formats.IntFormat) and weight.signed and (
            weight.bits <= 8):
        return _plan_dynamic(layer, entry, weight, activation)
    if not integer_op:
        if weight is not None:
            notes.append(f"{entry['type']}: no TFLite kernel for {weight.name} weights; exact {weight.name} "
                         "values, annotated")
        if activation is not None:
            notes.append(f"{entry['type']}: inputs run in float32 instead of {activation.name}")
        return LayerPlan(layer, entry["type"], _name(weight), _name(activation), None, None,
                         weight is not None, tuple(notes))
    if isinstance(activation, formats.IntFormat):
        activation_bits = 8 if activation.bits <= 8 else 16
        if activation.bits < 8:
            notes.append(f"inputs {activation.name} run as INT8 holding the {activation.name} grid (its step), "
                         "saturated at the clip by a float MINIMUM/MAXIMUM (TFLite has no narrower activations)")
        elif 8 < activation.bits < 16:
            notes.append(f"inputs {activation.name} run as INT16")
        elif activation.bits == 16 and not entry["input_signed"].get("input", True):
            notes.append("unsigned INT16 inputs run as signed INT16 (symmetric): half the resolution")
    elif activation is not None:
        notes.append(f"inputs {activation.name} run in float32 (TFLite has no {activation.name} kernel)")
    if isinstance(weight, formats.IntFormat) and weight.signed and weight.bits <= 8:
        weight_bits = 4 if weight.bits <= 4 else 8
        if weight_bits == 4 and entry["type"] not in _INT4_OPS:
            weight_bits = 8
            notes.append(f"{weight.name} weights stored as INT8 ({entry['type']} has no INT4 kernel)")
        elif weight.bits < 4 and activation_bits is not None and activation.bits < 4:
            weight_bits = 8
            notes.append(f"{weight.name} weights stored as INT8, not INT4: with {activation.name} inputs the "
                         "int32 bias needs the finer weight step")
        elif weight.bits not in (4, 8):
            notes.append(f"{weight.name} weights stored as INT{weight_bits}")
        widen = weight_widening(weight, weight_bits)
        if widen > 1:
            notes.append(f"codes x{widen}: the same weights, a {widen}x finer int32 bias step")
        if activation_bits is None:
            notes.append("integer weights dequantized; the op computes in float")
    elif weight is not None:
        notes.append(f"{weight.name} weights: no TFLite kernel; exact {weight.name} values, annotated")
        if activation_bits is not None:
            notes.append(f"inputs {activation.name} run in float32: an op with float weights computes in float")
            activation_bits = None
    return LayerPlan(layer, entry["type"], _name(weight), _name(activation), weight_bits, activation_bits,
                     weight is not None and weight_bits is None, tuple(notes))


def _plan_dynamic(layer: str, entry: dict[str, Any], weight: formats.IntFormat,
                  activation: formats.Format | None) -> LayerPlan:
    """Integer weights for the projections of an attention or EinsumDense layer.

    With integer inputs they run dynamic range: each invoke quantizes the
    input to INT8 from its own range (TFLite has no static integer recipe for
    the float ops between them); otherwise the op dequantizes the weights.
    """
    weight_bits = 4 if weight.bits <= 4 else 8
    notes = []
    if weight.bits not in (4, 8):
        notes.append(f"{weight.name} weights stored as INT{weight_bits}")
    widen = weight_widening(weight, weight_bits)
    if widen > 1:
        notes.append(f"codes x{widen}: the same weights")
    dynamic = isinstance(activation, formats.IntFormat)
    if dynamic:
        notes.append(f"inputs quantized to INT8 on each invoke from their own range, not on the trained "
                     f"{activation.name} grid")
    else:
        notes.append("integer weights dequantized; the op computes in float")
    if entry["type"] == "MultiHeadAttention":
        notes.append("the four projections as above; scores, softmax and the weighted sum run in float")
    return LayerPlan(layer, entry["type"], weight.name, _name(activation), weight_bits, None, False,
                     tuple(notes), dynamic=dynamic)


def plan(record: dict[str, Any]) -> list[LayerPlan]:
    """The treatment of every layer of a formats file, in its order."""
    return [plan_layer(layer, entry) for layer, entry in record["layers"].items()]


def report(plans: list[LayerPlan]) -> str:
    """A table: layer, chosen formats, what TFLite runs, and why where they differ."""
    width = max([len(p.layer) for p in plans] + [5])
    lines = [f"{'layer':<{width}}  {'chosen':<16}{'tflite':<40}notes"]
    for p in plans:
        chosen = f"{p.weight_format or 'float'}/{p.activation_format or 'float'}"
        lines.append(f"{p.layer:<{width}}  {chosen:<16}{p.tflite:<40}{'; '.join(p.notes)}")
    return "\n".join(lines)


def _name(fmt) -> str | None:
    return fmt.name if fmt is not None else None
